"""Measure key/value downsampling choices on the shipped toy model (docs/speed.md).

1. Captures the real token maps entering the top stage's self-attentions (attn1) while the
   toy model generates at 4x its native size under HiDiffusion, at a few steps.
2. On each captured map, with the block's own trained attention, compares against the
   exact windowed attention (MSW-MSA, full keys/values):
   * where keys/values shrink: inside each window, or on the whole map before it is cut
     into windows (the shrunk map then cut into the same 2x2 grid, shift divided by f);
   * the method: nearest, average, area;
   and, without windows, each method against full attention.
   The figure is the relative L2 error of the attention output, ||y - ref|| / ||ref - mean(ref)||.
3. Times one windowed self-attention at SD 1.5 1024x1024's top stage (128x128 tokens,
   320 channels, 8 heads, random weights) with keys/values shrunk 1x, 2x, 4x.

Run: HIDIFF_TEST_THREADS=1 .venv/bin/python tools/kv_measure.py [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional

import torch

from hidiff.app.eval import DOCS_PROMPTS
from hidiff.core import ops


def capture(steps: int = 10, sides: tuple = (64,), seeds: tuple = (0, 1)) -> list:
    import hidiff
    from hidiff.app.toy.pipeline import load_toy_pipeline
    from hidiff.diffusers.model import is_transformer_block

    pipe = load_toy_pipeline()
    unet = pipe.unet
    maps: dict = {}
    got: list = []
    handles = []
    for path in ("down_blocks.0", "up_blocks.3"):
        for transformer in unet.get_submodule(path).attentions:
            handles.append(
                transformer.register_forward_pre_hook(
                    lambda m, a, t=transformer: maps.__setitem__(id(t), tuple(a[0].shape[-2:]))
                )
            )
            for sub in transformer.modules():
                if is_transformer_block(sub):

                    def grab(m, a, k, t=transformer):
                        x = a[0] if a else k["hidden_states"]
                        h, w = maps[id(t)]
                        if x.shape[1] == h * w:
                            got.append((x.detach().clone(), h, w, m))

                    # registered before hidiff's hooks: sees the whole map
                    handles.append(sub.attn1.register_forward_pre_hook(grab, with_kwargs=True))
    hidiff.apply_hidiffusion(pipe)
    for seed in seeds:
        for side in sides:
            pipe(
                "one red circle",
                height=side,
                width=side,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            )
    hidiff.remove_hidiffusion(pipe)
    for h in handles:
        h.remove()
    return got


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / (ref - ref.mean(dim=1, keepdim=True)).norm())


@torch.no_grad()
def windowed(attn, x, h, w, shift, factor=1, method=ops.KV_METHOD, where="inside"):
    win = ops.window_partition(x, h, w, shift)
    wh, ww = ops.window_sides(h, w)
    kwargs: dict = {}
    if factor == 1:
        if win.key_bias is not None:
            kwargs["attention_mask"] = win.key_bias
        return ops.window_merge(attn(win.tokens, **kwargs), win)
    if where == "inside":
        valid = win.key_bias[:, 0, :] == 0 if win.key_bias is not None else None
        kv = ops.kv_downsample(win.tokens, wh, ww, factor, method, valid=valid)
        keys, kvalid = kv.tokens, kv.valid
    else:  # before: shrink the whole map, then cut it into the 2x2 grid
        kv = ops.kv_downsample(x, h, w, factor, method)
        kshift = (shift[0] // factor, shift[1] // factor)
        kwin = ops.window_partition(kv.tokens, kv.height, kv.width, kshift)
        keys = kwin.tokens
        kvalid = kwin.key_bias[:, 0, :] == 0 if kwin.key_bias is not None else None
    if kvalid is not None:
        kwargs["attention_mask"] = ops.key_bias(kvalid, x.dtype)
    return ops.window_merge(attn(win.tokens, encoder_hidden_states=keys, **kwargs), win)


@torch.no_grad()
def quality(got: list) -> dict:
    out: dict = {}
    for x, h, w, attn in got:
        for shift in [(0, 0), ops.shift_from_uniform(0.6, h, w), ops.shift_from_uniform(0.3, h, w)]:
            ref = windowed(attn, x, h, w, shift)
            for factor in (2, 4):
                for method in ops.KV_METHODS:
                    for where in ("inside", "before"):
                        y = windowed(attn, x, h, w, shift, factor, method, where)
                        out.setdefault(f"windows {where} {method} x{factor}", []).append(rel(y, ref))
        full = attn(x)
        for factor in (2, 4):
            for method in ops.KV_METHODS:
                kv = ops.kv_downsample(x, h, w, factor, method)
                y = attn(x, encoder_hidden_states=kv.tokens)
                out.setdefault(f"no windows {method} x{factor}", []).append(rel(y, full))
    return {k: (statistics.mean(v), max(v), len(v)) for k, v in out.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per picture (B x 3 x H x W in [0, 1]): 7x7 uniform windows, the usual constants."""
    import torch.nn.functional as F

    c1, c2 = 0.01**2, 0.03**2

    def blur(x):
        return F.avg_pool2d(x, 7, 1)

    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma**2, blur(b * b) - mb**2, blur(a * b) - ma * mb
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def toy_eval(
    samples: int = 2, steps: int = 20, scales: tuple = (2, 4), window: bool = True, guidance: Optional[float] = None
) -> list:
    """hidiff eval's figures (duplication, right shape, s/image) with kv_downsample 1, 2, 4 at
    kv_levels 1 and 2, and each picture's PSNR/SSIM against the same seed with kv_downsample 1."""
    from hidiff.app import eval as ev
    from hidiff.app.eval import EVAL_GUIDANCE, generate
    from hidiff.app.toy.count import count_objects, summarize
    from hidiff.app.toy.pipeline import load_toy_pipeline

    pipe = load_toy_pipeline()
    guidance = EVAL_GUIDANCE if guidance is None else guidance  # hidiff eval's
    batch = [p for p in DOCS_PROMPTS for _ in range(samples)]
    rows = []
    for scale in scales:
        size = scale * pipe.native_size
        ref = None
        for factor, levels in ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2)):
            options = {"kv_downsample": factor, "kv_levels": levels, "window_attn": window}
            ev.HIDIFF_OPTIONS["_kv"] = options
            generate(pipe, "_kv", batch, size, 1, 0, guidance)  # untimed warm-up step
            t0 = time.perf_counter()
            pictures = generate(pipe, "_kv", batch, size, steps, 0, guidance)
            seconds = time.perf_counter() - t0
            del ev.HIDIFF_OPTIONS["_kv"]
            if ref is None:
                ref = pictures
            row = {
                "size": size,
                "kv_downsample": factor,
                "kv_levels": levels,
                "windows": window,
                "guidance": guidance,
                "steps": steps,
                **summarize([count_objects(p) for p in pictures], batch),
                "s_per_image": seconds / len(batch),
                "psnr_vs_kv1": float(psnr(pictures, ref).mean()) if factor > 1 else None,
                "ssim_vs_kv1": float(ssim(pictures, ref).mean()) if factor > 1 else None,
            }
            rows.append(row)
            print(row, flush=True)
    return rows


@torch.no_grad()
def timing(repeats: int = 5, side: int = 128, channels: int = 320, heads: int = 8) -> dict:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads).eval()
    res: dict = {}
    for h, w in ((side, side), (side + 1, side + 1)):
        x = torch.randn(1, h * w, channels)
        shift = ops.shift_from_uniform(0.6, h, w)
        for label, kwargs in (
            ("full attention", None),
            ("windows", dict(factor=1)),
            ("windows + kv x2 inside", dict(factor=2, where="inside")),
            ("windows + kv x2 before", dict(factor=2, where="before")),
            ("windows + kv x4 inside", dict(factor=4, where="inside")),
        ):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                if kwargs is None:
                    attn(x)
                else:
                    windowed(attn, x, h, w, shift, **kwargs)
                times.append(time.perf_counter() - t0)
            res[f"{h}x{w} {label}"] = min(times)
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--eval", action="store_true", help="also the toy eval table (about 10 minutes)")
    parser.add_argument("--sides", default="64,56,72", help="sizes the token maps are captured at")
    parser.add_argument("--samples", type=int, default=2, help="--eval: samples per prompt")
    parser.add_argument("--steps", type=int, default=20, help="--eval: denoising steps (hidiff eval's default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sides = tuple(int(s) for s in args.sides.split(","))
    q = {}
    if not args.skip_quality:
        got = capture(sides=sides)
        q = quality(got)
        print(f"{len(got)} captured top-stage token maps (toy model, sides {sides}, 10 steps, 2 seeds)")
    for k, (mean, worst, n) in sorted(q.items()):  # noqa: B007
        print(f"  {k:<32} mean rel. error {mean:.4f}  worst {worst:.4f}  ({n} cases)")
    t = {} if args.skip_timing else timing()
    for k, v in t.items():
        print(f"  {k:<40} {v * 1000:8.1f} ms")
    ev = toy_eval(samples=args.samples, steps=args.steps) if args.eval else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"quality": q, "timing_s": t, "eval": ev, "threads": args.threads}, f, indent=2)


if __name__ == "__main__":
    main()
