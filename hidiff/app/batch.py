"""``hidiff batch PROMPTS --out DIR``: many images from a prompt file, resumable, sharded over processes.

Each line of PROMPTS (a text file, one prompt a line, or JSONL with per-line settings) is
one :class:`~hidiff.app.generate.Request`, the command line giving the defaults; ``--batch N``
makes N jobs of it (seeds ``seed``, ``seed + 1``, ...). Every job has a file name made from its
line number, prompt and a digest of its settings, so that a rerun knows what is done: a PNG of
that name that reads back whole. Images are written to a hidden temporary name and renamed, and
``manifest.jsonl`` gets one line per image finished (done or failed), so a run killed at any
moment and run again ends with the same set of files as one that was never stopped.

Under ``accelerate launch`` each process (accelerate's ``PartialState``: process index and
count, and its device) takes the jobs whose index is its process index modulo the count and
loads the pipeline once. What an image is depends only on its line (the seed comes from the
line, never from the process), so image i is the same whatever the number of processes.

Requests, loading, scheduler, CFG++, HiDiffusion and the PNG metadata are ``hidiff generate``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

from ..core.config import HiDiffusionConfig, option_specs
from . import generate
from .args import AUTO, EXIT_FAILURE, EXIT_OK, SEED_MAX, UsageError, add_threads_flag, config_dest, set_threads

MANIFEST = "manifest.jsonl"
EXIT_INTERRUPTED = 130  # as a shell reports SIGINT
PROMPTS_JSONL_SUFFIXES = (".jsonl", ".ndjson")
#: Request fields a JSONL line may set; the model, its ControlNet and the device and dtype it is
#: loaded with are the command line's (each process loads them once).
LINE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(generate.Request)
    if f.name not in ("model", "config_folder", "controlnet", "device", "dtype", "hidiff_config")
)
#: HiDiffusionConfig options a JSONL line may set (key -> field), made from option_specs(): each by its field's
#: name and by its flag's; ``controlnet`` (the ControlNet model, a Request field) only as ``controlnet_mode``.
CONFIG_KEYS = {
    key: spec.name
    for spec in option_specs()
    for key in (spec.name, config_dest(spec))
    if key not in {f.name for f in dataclasses.fields(generate.Request)}
}
_PATH_FIELDS = ("image", "mask", "control_image")
#: Request fields left out of the file name's digest: where an image is made, not what it is.
_PLACE_FIELDS = ("device",)
_DIGEST_CHARS = 12


# ------------------------------------------------------------------ the command line
BATCH_DESCRIPTION = (
    "Images for every line of PROMPTS (text: one prompt a line; .jsonl: one JSON object a line with prompt, "
    "negative_prompt, seed, width, height, steps, guidance and any other generate option), the flags giving the "
    "defaults. Resumable: a rerun skips the images already made. Under `accelerate launch` the lines are shared "
    "out over the processes. Writes DIR/manifest.jsonl. Exit codes: 0 all done, 1 some failed, 2 bad usage."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", metavar="PROMPTS", help="a text file (one prompt a line) or a .jsonl file")
    generate.add_arguments(parser)
    for action in parser._actions:  # generate's --out names a file; here it is the output folder
        if action.dest == "out":
            action.help = "output folder (created if missing): the PNGs and manifest.jsonl"
            action.metavar = "DIR"
        elif action.dest in ("compare", "from_image", "overwrite"):  # generate's only: refused if given
            action.help = argparse.SUPPRESS
        elif action.dest == "quiet":
            action.help = "no progress lines (the summary stays)"
    add_threads_flag(parser)


# ------------------------------------------------------------------ the prompt file
@dataclass
class Line:
    """One line of the prompt file: its number (from 1), the Request fields and HiDiffusion options it sets."""

    number: int
    fields: dict
    config: dict


def read_prompts(path: str) -> list[Line]:
    """The lines of a prompt file; anything malformed is a UsageError naming the line."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"PROMPTS {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"PROMPTS {path} cannot be read as UTF-8 text ({error})") from None
    jsonl = file.suffix.lower() in PROMPTS_JSONL_SUFFIXES
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or (not jsonl and stripped.startswith("#")):
            continue
        if jsonl:
            lines.append(_json_line(stripped, number, f"{path}:{number}", file.parent))
        else:
            lines.append(Line(number, {"prompt": stripped}, {}))
    if not lines:
        raise UsageError(f"PROMPTS {path} has no prompt (blank lines{'' if jsonl else ' and # comments'} are skipped)")
    return lines


def _json_line(text: str, number: int, where: str, folder: Path) -> Line:
    try:
        item = json.loads(text)
    except ValueError as error:
        raise UsageError(f"{where}: not a JSON object ({error})") from None
    if not isinstance(item, dict):
        raise UsageError(f'{where}: a JSONL line must be an object, e.g. {{"prompt": "...", "seed": 1}}')
    hints = get_type_hints(generate.Request)
    fields, config = {}, {}
    for key, value in item.items():
        name = str(key).replace("-", "_")
        if name in LINE_FIELDS:
            if not generate._of_type(value, hints[name]):
                raise UsageError(f"{where}: {key} is {value!r}, of the wrong type")
            if name in _PATH_FIELDS and value:  # relative to the prompt file
                value = str((folder / value).resolve()) if not os.path.isabs(value) else value
            fields[name] = value
        elif name in CONFIG_KEYS:
            config[CONFIG_KEYS[name]] = value
        else:
            known = ", ".join(sorted({*LINE_FIELDS, *CONFIG_KEYS}))
            raise UsageError(
                f"{where}: unknown key {key!r} (the model, ControlNet, device and dtype come from the command line); "
                f"known keys: {known}"
            )
    return Line(number, fields, config)


# ------------------------------------------------------------------ jobs
@dataclass
class Job:
    """One image: its place in the whole batch, its line, its request (batch 1) and file name, or why it cannot run."""

    index: int
    line: int
    k: int  # the image of its line (--batch N makes N)
    request: Optional[generate.Request]
    name: Optional[str]
    error: Optional[str] = None
    settings: Optional[dict] = None  # what the line asked for, when it has no request


def build_jobs(base: generate.Request, lines: list[Line]) -> list[Job]:
    """The jobs of every line, in file order. A line's default seed is ``base.seed`` (0 if unset) plus
    (line number - 1) x its batch; its image k has that seed + k."""
    jobs: list[Job] = []
    base_config = base.config
    for line in lines:
        try:
            config = HiDiffusionConfig.from_options(base_config, **line.config)
            request = dataclasses.replace(base, **line.fields, hidiff_config=config.to_dict())
            generate.check_value("--batch", request.batch, generate.CHECKS["batch"])
        except (TypeError, ValueError, UsageError) as error:
            settings = {**line.fields, **line.config}
            jobs.append(Job(len(jobs), line.number, 0, None, None, f"{type(error).__name__}: {error}", settings))
            continue
        count = request.batch
        first = request.seed if line.fields.get("seed") is not None else (base.seed or 0) + (line.number - 1) * count
        for k in range(count):
            seed = first + k
            if seed > SEED_MAX:
                error = f"UsageError: seed {seed} of image {k} is above 2**64 - 1"
                jobs.append(Job(len(jobs), line.number, k, None, None, error, {**line.fields, "seed": seed}))
                continue
            one = dataclasses.replace(request, seed=seed, batch=1)
            jobs.append(Job(len(jobs), line.number, k, one, file_name(line.number, k if count > 1 else None, one)))
    return jobs


def file_name(line: int, k: Optional[int], request: generate.Request) -> str:
    """``LLLLL[-K]-prompt-words-DIGEST.png``: the line number, the image of the line, the prompt's first
    words, and a digest of every setting (so a changed setting makes another file)."""
    settings = {k: v for k, v in dataclasses.asdict(request).items() if k not in _PLACE_FIELDS}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:_DIGEST_CHARS]
    words = re.sub(r"[^a-z0-9]+", "-", request.prompt.lower()).strip("-")[:40].strip("-") or "image"
    return f"{line:05d}{'' if k is None else f'-{k}'}-{words}-{digest}.png"


# ------------------------------------------------------------------ outputs and manifest
def is_done(path: Path) -> bool:
    """A PNG of that name that reads back whole and carries hidiff metadata (a JSON object)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format != "PNG" or not isinstance(json.loads(image.info[generate.METADATA_KEY]), dict):
                return False
            image.verify()  # every chunk there, its CRC right
        return True
    except Exception:  # PIL raises many types on a broken file
        return False


def recorded_run(path: Path) -> dict:
    """The manifest fields of a finished PNG, from its metadata."""
    from PIL import Image

    with Image.open(path) as image:
        data = json.loads(image.info[generate.METADATA_KEY])
    run = data.get("run", {})
    return {
        "settings": data.get("request"),
        "seconds": run.get("seconds"),
        "preset": run.get("preset"),
        "device": run.get("device"),
    }


def append_manifest(path: Path, entry: dict) -> None:
    """One JSON line, appended under a lock (several processes share the file); a line cut short by a
    killed run is ended first, so that the new one stands on its own."""
    data = (json.dumps(entry) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # Windows: appends of one write are not interleaved in practice
            pass
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
    finally:
        os.close(fd)  # releases the lock


def read_manifest(path: Path) -> list[dict]:
    """The manifest's entries (a line cut short by a killed run is skipped)."""
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            for text in f:
                try:
                    entry = json.loads(text)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
    except FileNotFoundError:
        pass
    return entries


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _partial_name(name: str) -> str:
    return f".{name}.partial-{os.getpid()}.png"  # .png: PIL picks the format from the suffix


def remove_partials(out: Path, names: set) -> None:
    """Temporary files that a killed run of these jobs left."""
    for entry in os.listdir(out):
        if entry.startswith(".") and ".partial-" in entry:
            if entry[1:].split(".partial-")[0] in names:
                try:
                    os.remove(out / entry)
                except FileNotFoundError:
                    pass


# ------------------------------------------------------------------ processes
def process_state() -> tuple[Any, int, int]:
    """(accelerate's state, process index, process count): 0 of 1 without ``accelerate launch``."""
    import torch
    from accelerate import PartialState

    # PartialState makes CPU processes a process group only when told they are CPU processes:
    # `accelerate launch --cpu` says so, a machine without CUDA too
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    )
    state = PartialState(cpu=cpu, timeout=datetime.timedelta(hours=24))  # the last barrier waits for the slowest
    return state, state.process_index, state.num_processes


def run_device(request: generate.Request, state: Any) -> str:
    """The device string of this process: --device as given, or (auto) accelerate's device for it."""
    if request.device != AUTO:
        return request.device
    device = state.device
    # accelerate's CPU processes are on "cpu:0", which some kernels treat unlike "cpu" (last-bit differences)
    return "cpu" if device.type == "cpu" else str(device)


class Progress:
    """Images done, images per minute and ETA of one process, as lines on stderr."""

    def __init__(self, rank: int, count: int, total: int, quiet: bool) -> None:
        self.who, self.total, self.quiet = f"[process {rank + 1}/{count}]", total, quiet
        self.start, self.made, self.failed = time.perf_counter(), 0, 0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return 60 * (self.made + self.failed) / elapsed if elapsed > 0 else 0.0

    def step(self, failed: bool) -> None:
        self.made += not failed
        self.failed += failed
        if self.quiet:
            return
        done, rate = self.made + self.failed, self.rate()
        eta = (self.total - done) / rate * 60 if rate else 0.0
        print(
            f"{self.who} {done}/{self.total} images ({self.failed} failed), {rate:.1f} images/min, "
            f"ETA {_duration(eta)}",
            file=sys.stderr,
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


# ------------------------------------------------------------------ running
class LoadError(Exception):
    """The model could not be loaded: the batch stops (every line would fail the same way)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Pipelines:
    """This process's pipeline, loaded on first use; a job of another task (img2img, inpaint) gets the
    same components in that task's pipeline class."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.by_task: dict[str, tuple[Any, Any, Any]] = {}  # task -> (pipe, layout, its own scheduler)
        self.torch_device: Any = None

    def get(self, request: generate.Request) -> tuple[Any, Any]:
        for pipe, _, scheduler in self.by_task.values():  # they share the U-Net and VAE: all of them
            reset(pipe, scheduler)
        if request.task not in self.by_task:
            if not self.by_task:
                try:
                    pipe, layout, self.torch_device = generate.load(dataclasses.replace(request, device=self.device))
                except Exception as error:
                    raise LoadError(error) from error
            else:
                pipe, layout = self._rebuild(request)
            self.by_task[request.task] = (pipe, layout, pipe.scheduler)
        pipe, layout, _ = self.by_task[request.task]
        return pipe, layout

    def _rebuild(self, request: generate.Request) -> tuple[Any, Any]:
        import diffusers

        from .loading import _rebuild, pipeline_class_name

        first, layout, _ = next(iter(self.by_task.values()))
        if layout.inpainting and request.task != "inpaint":
            raise UsageError(f"{request.model} is an inpainting model (9-channel U-Net): give image and mask")
        controlnet = getattr(first, "controlnet", None)
        name = pipeline_class_name(layout.kind, request.task, controlnet is not None)
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise UsageError(f"this diffusers ({diffusers.__version__}) has no {name}")
        return _rebuild(first, cls, controlnet), layout


def reset(pipe: Any, scheduler: Any) -> None:
    """A pipeline as loaded: no HiDiffusion, no CFG++, its own scheduler, no VAE tiling."""
    import hidiff

    if hidiff.is_patched(pipe):
        hidiff.remove_hidiffusion(pipe)
    hidiff.disable_cfgpp(pipe)
    pipe.scheduler = scheduler
    if getattr(getattr(pipe, "vae", None), "use_tiling", False):  # the toy model has no VAE
        pipe.vae.disable_tiling()


def make_image(job: Job, pipes: Pipelines, out: Path) -> dict:
    """Run one job and write its PNG (temporary name, then renamed); returns its manifest fields."""
    import hidiff

    request = job.request
    assert request is not None and job.name is not None
    images = generate.check_request(request)
    pipe, layout = pipes.get(request)
    device = pipes.torch_device
    try:
        request = generate.configure(request, pipe, layout, images, device)
        if request.hidiff:
            hidiff.apply_hidiffusion(pipe, config=request.config)
        run = generate.run_pipeline(request, pipe, images, device, "hidiff" if request.hidiff else "plain", True)
        temporary = out / _partial_name(job.name)
        generate.save_png(run.images[0], temporary, generate.png_text(request, 0, run, pipe, device))
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, out / job.name)
    finally:
        if hidiff.is_patched(pipe):
            hidiff.remove_hidiffusion(pipe)
    return {
        "settings": dataclasses.asdict(request),
        "seconds": round(run.seconds, 3),
        "preset": run.preset,
        "device": str(device),
    }


def entry(job: Job, status: str, rank: int, **fields: Any) -> dict:
    settings = dataclasses.asdict(job.request) if job.request is not None else job.settings
    return {
        "file": job.name,
        "status": status,
        "error": None,
        "line": job.line,
        "image": job.k,
        "seed": (settings or {}).get("seed"),
        "settings": settings,
        "time": _now(),
        "seconds": None,
        "process": rank,
        **fields,
    }


def run_job(job: Job, pipes: Pipelines, out: Path, manifest: Path, rank: int, progress: Progress) -> None:
    """Make one image and record it; a failing line is recorded with its error (the model not loading stops all)."""
    if job.error is not None:
        append_manifest(manifest, entry(job, "failed", rank, error=job.error))
        progress.step(failed=True)
        return
    try:
        made = make_image(job, pipes, out)
    except LoadError as failure:
        raise failure.error from None
    except Exception as error:  # a bad size or input image, out of memory: recorded, and the rest go on
        _free_cache(pipes.torch_device)
        append_manifest(manifest, entry(job, "failed", rank, error=f"{type(error).__name__}: {error}"))
        progress.step(failed=True)
        return
    append_manifest(manifest, entry(job, "done", rank, **made))
    progress.step(failed=False)


def main(args: argparse.Namespace) -> int:
    """``hidiff batch``: every check of the command line and the prompt file first, then the jobs of this process."""
    for name, what in (("compare", "--compare"), ("from_image", "--from-image"), ("overwrite", "--overwrite")):
        if getattr(args, name):
            raise UsageError(f"{what} is for hidiff generate; batch skips the images already made (delete to remake)")
    if not args.out:
        raise UsageError("--out DIR is required: the folder of the images and manifest.jsonl")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder")
    lines = read_prompts(args.prompts)
    base, _ = generate.request_from_args(args)
    from .loading import model_source

    model_source(base.model)  # a bad local path, before anything is loaded
    if not any(line.fields.keys() - {"prompt"} or line.config for line in lines):
        generate.check_request(base)  # the flags alone make every request: a bad one is a usage error
    jobs = build_jobs(base, lines)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create the folder ({error})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out} is not writable")

    state, rank, count = process_state()
    set_threads(args)  # after accelerate, which sets its own thread count in CPU processes without OMP_NUM_THREADS
    manifest = out / MANIFEST
    mine = [job for job in jobs if job.index % count == rank]
    remove_partials(out, {job.name for job in mine if job.name})
    recorded = {e.get("file") for e in read_manifest(manifest) if e.get("status") == "done"}
    pending, skipped = [], 0
    for job in mine:
        if job.name and is_done(out / job.name):
            skipped += 1
            if job.name not in recorded:  # made by a run killed before it wrote the manifest line
                append_manifest(manifest, entry(job, "done", rank, recovered=True, **recorded_run(out / job.name)))
        else:
            pending.append(job)
    pipes = Pipelines(run_device(base, state))
    progress = Progress(rank, count, len(pending), args.quiet)
    try:
        for job in pending:
            run_job(job, pipes, out, manifest, rank, progress)
    except KeyboardInterrupt:
        print(
            f"hidiff batch: interrupted after {progress.made} image(s); rerun the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    elapsed = time.perf_counter() - progress.start
    print(
        f"process {rank + 1}/{count}: {progress.made} made, {skipped} already done, {progress.failed} failed, "
        f"of {len(mine)} in {elapsed:.1f} s ({progress.rate():.1f} images/min)",
        file=sys.stderr,
        flush=True,
    )
    if count > 1:
        state.wait_for_everyone()
    missing = [job for job in jobs if not (job.name and (out / job.name).exists())]
    if rank == 0:
        print(
            f"batch: {len(jobs) - len(missing)}/{len(jobs)} images in {out}, {len(missing)} failed "
            f"(lines {', '.join(str(n) for n in sorted({j.line for j in missing})[:20]) or 'none'}); "
            f"manifest {manifest}"
        )
    return EXIT_FAILURE if missing else EXIT_OK


def _free_cache(device: Any) -> None:
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.empty_cache()
