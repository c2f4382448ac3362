"""What ``hidiff bench`` shows of its result: the table it prints and the chart ``--plot`` writes."""

from __future__ import annotations

from typing import Optional

from .args import PUBLISHED


def format_table(result: dict) -> str:
    lines = [
        f"{_title(result)}, median of {result['repeats']}"
        f"{' (per phase: one U-Net call per distinct phase, composed over the schedule)' if result.get('per_phase') else ''}",
        f"{'mode':<13} {'total s':>9} {'s/step RAU':>11} {'s/step rest':>12} {'speed-up':>9} "
        f"{'FLOP bound':>11} {'of bound':>9} {'GFLOP':>9} {'peak MB':>9}",
    ]
    for name, r in result["modes"].items():
        rau, rest = r["step_s"]["rau"], r["step_s"]["plain"]
        lines.append(
            f"{name:<13} {r['total_s']:9.2f} {_f(rau):>11} {_f(rest):>12} {r['speedup']:8.2f}x "
            f"{r['flop_speedup']:10.2f}x {r['speedup'] / r['flop_speedup']:8.0%} {r['flops'] / 1e9:9.1f} "
            f"{r['peak_memory_bytes'] / 2**20:9.0f}"
        )
    parts = result.get("components")
    if parts is not None:
        lines.append(
            f"model {result['model']}: text encoders {parts['text_encoders_s']:.2f} s for {parts['prompts']} prompts, "
            f"VAE decode {parts['vae_decode_s']:.2f} s for {parts['images']} image(s) (once each, outside the loop)"
        )
    ref = result.get("published")
    if ref is not None:
        ours, theirs = result["modes"]["hidiff"], result["modes"][PUBLISHED]
        paired = ""
        if len(ours["totals_s"]) > 1:
            # each repetition's pair ran back to back: their ratios show the spread the medians hide
            paired = (
                " (per repetition: "
                + ", ".join(f"{a / b:.2f}x" for a, b in zip(ours["totals_s"], theirs["totals_s"]))
                + ")"
            )
        lines.append(
            f"published: hidiffusion {ref['hidiffusion']} on diffusers {ref['diffusers']} ({ref['python']}); "
            f"hidiff takes {ours['total_s'] / theirs['total_s']:.2f}x its time{paired}"
        )
    return "\n".join(lines)


def _title(result: dict) -> str:
    name = f"{result['model']} ({result['family']})" if result.get("model") else result["family"]
    return (
        f"{name}{' (tiny)' if result['tiny'] else ''} {result['width']}x{result['height']}, "
        f"batch {result['batch']}, {result['steps']} steps, {result['device']} {result['dtype']}, "
        f"{result['threads']} threads"
    )


def _f(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_plot(result: dict, path: str) -> None:
    """A PNG: total time per mode, and measured speed-up next to the FLOP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["modes"])
    modes = [result["modes"][n] for n in names]
    x = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.bar_label(left.bar(x, [m["total_s"] for m in modes], color="#4c72b0"), fmt="%.1f", fontsize=8)
    left.set_ylabel("seconds (denoising loop)")
    left.set_title("total time")
    width = 0.38
    right.bar([i - width / 2 for i in x], [m["speedup"] for m in modes], width, label="measured", color="#4c72b0")
    right.bar(
        [i + width / 2 for i in x], [m["flop_speedup"] for m in modes], width, label="FLOP bound", color="#dd8452"
    )
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_ylabel("speed-up over baseline")
    right.set_title("speed-up")
    for bars in right.containers:
        right.bar_label(bars, fmt="%.2fx", fontsize=8)
    right.set_ylim(0, 1.25 * max(max(m["speedup"], m["flop_speedup"]) for m in modes))
    right.legend(loc="upper left")
    for ax in (left, right):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names)
    fig.suptitle(f"hidiff bench: {_title(result)}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
