"""HiDiffusion against plain txt2img in one running Stable Diffusion WebUI (AUTOMATIC1111, Forge, reForge).

A benchmark, not a test: against a WebUI already running with this repository as an extension
and its API on (``--api``), it sends the same txt2img request without and with HiDiffusion,
interleaved (plain, HiDiffusion, then HiDiffusion, plain, ...: a slow drift of the machine
weighs on both alike), ``--repeats`` times each, after one warm-up request at ``--warmup-size``
(model loading and first-call costs). It reports every request's time and the ratio of the
medians, HiDiffusion / plain.

What it measures: the wall time of each HTTP request, from sending it to having the answer:
text encoding, sampling, VAE decode and PNG encoding, as a user waits for it. With
``--server-log`` (the file the WebUI's console goes to) it also reads the sampling time of
each request from the WebUI's own progress bar (``100%|...| N/N [mm:ss<...``, to the second).

Each answer is checked: the image has the asked size, and the infotext has ``HiDiffusion: True``
in the HiDiffusion requests and no HiDiffusion entry in the plain ones (else the figures would
compare plain with plain).

    python tools/webui_bench.py --url http://127.0.0.1:7860 --size 1024 --steps 6 \\
        --sampler Euler --cfg 1 --repeats 1 --server-log /path/to/server.log

Standard library only: it runs in any Python 3.9+.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Optional

#: The WebUI's sampling progress bar at its end (tqdm): ``100%|####| 6/6 [02:57<00:00, ...``.
BAR_DONE = re.compile(r"(Total progress: )?100%\|[^|\r\n]*\|\s*(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def post(url: str, path: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        url.rstrip("/") + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{path}: HTTP {e.code}: {e.read()[:2000].decode(errors='replace')}") from None


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit("the WebUI answered an image that is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def sampling_seconds(log_text: str, steps: int) -> Optional[float]:
    """The elapsed time of the last finished ``steps``-step progress bar in ``log_text`` (not the
    "Total progress" bar), or None."""
    found = None
    for line in re.split(r"[\r\n]", log_text):
        for match in BAR_DONE.finditer(line):
            overall, done, total, hours, minutes, seconds = match.groups()
            if not overall and int(done) == int(total) == steps:
                found = int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)
    return None if found is None else float(found)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.log_offset = os.path.getsize(args.server_log) if args.server_log else 0

    def body(self, size: int, hidiffusion: bool) -> dict:
        a = self.args
        body: dict[str, Any] = {
            "prompt": a.prompt,
            "negative_prompt": "",
            "steps": a.steps,
            "cfg_scale": a.cfg,
            "width": size,
            "height": size,
            "seed": a.seed,
            "sampler_name": a.sampler,
            "scheduler": a.scheduler,
            "batch_size": 1,
            "n_iter": 1,
            "send_images": True,
            "save_images": False,
        }
        if hidiffusion:
            body["alwayson_scripts"] = {"HiDiffusion": {"args": json.loads(a.hidiff_args)}}
        return body

    def request(self, size: int, hidiffusion: bool) -> dict[str, Any]:
        started = time.perf_counter()
        answer = post(self.args.url, "/sdapi/v1/txt2img", self.body(size, hidiffusion), self.args.timeout)
        wall = time.perf_counter() - started
        image = base64.b64decode(answer["images"][0])
        if png_size(image) != (size, size):
            raise SystemExit(f"asked {size}x{size}, the WebUI answered {png_size(image)}")
        infotext = json.loads(answer["info"])["infotexts"][0]
        if hidiffusion and "HiDiffusion: True" not in infotext:
            raise SystemExit(f"HiDiffusion did not run (is the extension installed?); infotext: {infotext}")
        if not hidiffusion and "HiDiffusion" in infotext:
            raise SystemExit(f"a plain request ran with HiDiffusion; infotext: {infotext}")
        sampling = None
        if self.args.server_log:
            with open(self.args.server_log, errors="replace") as f:
                f.seek(self.log_offset)
                gained = f.read()
            self.log_offset += len(gained.encode(errors="replace"))
            sampling = sampling_seconds(gained, self.args.steps)
        return {"mode": "hidiffusion" if hidiffusion else "plain", "wall_s": wall, "sampling_s": sampling}


def ratio(results: list[dict], key: str) -> Optional[tuple[float, float, float]]:
    plain = [r[key] for r in results if r["mode"] == "plain"]
    hidiff = [r[key] for r in results if r["mode"] == "hidiffusion"]
    if not plain or not hidiff or None in plain or None in hidiff:
        return None
    p, h = statistics.median(plain), statistics.median(hidiff)
    return p, h, h / p


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the running WebUI, e.g. http://127.0.0.1:7860")
    parser.add_argument("--size", type=int, default=1024, help="square image side in pixels (default 1024)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--scheduler", default="Automatic")
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--repeats", type=int, default=1, help="requests per mode (default 1)")
    parser.add_argument(
        "--warmup-size", type=int, default=512, help="side of the one warm-up request (plain); 0: none (default 512)"
    )
    parser.add_argument(
        "--hidiff-args",
        default="[true]",
        help="the HiDiffusion script's API arguments as a JSON list (default [true]: on, library defaults)",
    )
    parser.add_argument("--server-log", help="the WebUI's console log, to read each request's sampling time")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds one request may take")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    for name in ("size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        hidiff_args = json.loads(args.hidiff_args)
    except json.JSONDecodeError as e:
        parser.error(f"--hidiff-args is not JSON ({e}); give a list such as [true]")
    if not isinstance(hidiff_args, list) or not hidiff_args or hidiff_args[0] is not True:
        parser.error("--hidiff-args must be a JSON list starting with true (HiDiffusion on), e.g. [true]")
    if args.server_log and not os.path.isfile(args.server_log):
        parser.error(f"--server-log {args.server_log}: no such file")

    bench = Bench(args)
    print(
        f"{args.url}: txt2img {args.size}x{args.size}, {args.steps} steps {args.sampler} ({args.scheduler}), "
        f"cfg {args.cfg}, seed {args.seed}; HiDiffusion args {args.hidiff_args}; {args.repeats} per mode, interleaved"
    )
    if args.warmup_size:
        t0 = time.perf_counter()
        bench.request(args.warmup_size, False)
        print(f"warm-up {args.warmup_size}x{args.warmup_size} plain: {time.perf_counter() - t0:.1f} s")
    results = []
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for hidiffusion in order:
            result = dict(bench.request(args.size, hidiffusion), repeat=repeat)
            results.append(result)
            sampling = "" if result["sampling_s"] is None else f", sampling {result['sampling_s']:.0f} s"
            print(f"  {repeat}  {result['mode']:<11}  request {result['wall_s']:.1f} s{sampling}", flush=True)

    summary = {}
    for key, what in (("wall_s", "request (text encoding + sampling + VAE decode)"), ("sampling_s", "sampling")):
        r = ratio(results, key)
        if r is not None:
            summary[key] = {"plain_median_s": r[0], "hidiffusion_median_s": r[1], "ratio": r[2]}
            print(f"{what}: plain {r[0]:.1f} s, HiDiffusion {r[1]:.1f} s (medians): HiDiffusion / plain = {r[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
