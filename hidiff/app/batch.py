"""``hidiff batch PROMPTS --out DIR``: many images from a prompt file, resumable, sharded over processes.

Each line of PROMPTS (a text file, one prompt a line, or JSONL with per-line settings) is
one :class:`~hidiff.app.request.Request`, the command line giving the defaults; ``--batch N``
makes N jobs of it (seeds ``seed``, ``seed + 1``, ...). Every job has a file name made from its
line number, prompt and a digest of its settings, so that a rerun knows what is done: a PNG of
that name that reads back whole. Images are written to a hidden temporary name and renamed, and
``manifest.jsonl`` gets one line per image finished (done or failed), so a run killed at any
moment and run again ends with the same set of files as one that was never stopped.

Under ``accelerate launch`` each process (accelerate's ``PartialState``: process index and
count, and its device) takes the jobs whose index is its process index modulo the count and
loads the pipeline once. What an image is depends only on its line (the seed comes from the
line, never from the process), so image i is the same whatever the number of processes.

Requests, loading, scheduler, CFG++, HiDiffusion and the PNG metadata are ``hidiff generate``'s
(:mod:`hidiff.app.request`, :mod:`~hidiff.app.pipeline`, :mod:`~hidiff.app.run`, :mod:`~hidiff.app.metadata`).
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
from . import generate_flags, pipeline, run
from .args import (
    EXIT_FAILURE,
    EXIT_OK,
    SEED_MAX,
    UsageError,
    add_threads_flag,
    check_value,
    config_dest,
    set_threads,
)
from .batch_files import (
    MANIFEST,
    append_manifest,
    is_done,
    partial_name,
    read_manifest,
    recorded_run,
    remove_partials,
)
from .batch_processes import Progress, process_state, run_device
from .inputs import checked_inputs
from .metadata import png_text, save_png
from .request import CHECKS, Request, of_type

EXIT_INTERRUPTED = 130  # as a shell reports SIGINT
PROMPTS_JSONL_SUFFIXES = (".jsonl", ".ndjson")
#: Request fields a JSONL line may set; the model, its ControlNet and the device and dtype it is
#: loaded with are the command line's (each process loads them once).
LINE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(Request)
    if f.name not in ("model", "config_folder", "controlnet", "device", "dtype", "hidiff_config")
)
#: HiDiffusionConfig options a JSONL line may set (key -> field), made from option_specs(): each by its field's
#: name and by its flag's; ``controlnet`` (the ControlNet model, a Request field) only as ``controlnet_mode``.
CONFIG_KEYS = {
    key: spec.name
    for spec in option_specs()
    for key in (spec.name, config_dest(spec))
    if key not in {f.name for f in dataclasses.fields(Request)}
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
    generate_flags.add_arguments(parser)
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
    hints = get_type_hints(Request)
    fields, config = {}, {}
    for key, value in item.items():
        name = str(key).replace("-", "_")
        if name in LINE_FIELDS:
            if not of_type(value, hints[name]):
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
    request: Optional[Request]
    name: Optional[str]
    error: Optional[str] = None
    settings: Optional[dict] = None  # what the line asked for, when it has no request


def build_jobs(base: Request, lines: list[Line]) -> list[Job]:
    """The jobs of every line, in file order. A line's default seed is ``base.seed`` (0 if unset) plus
    (line number - 1) x its batch; its image k has that seed + k."""
    jobs: list[Job] = []
    base_config = base.config
    for line in lines:
        try:
            config = HiDiffusionConfig.from_options(base_config, **line.config)
            request = dataclasses.replace(base, **line.fields, hidiff_config=config.to_dict())
            check_value("--batch", request.batch, CHECKS["batch"])
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


def file_name(line: int, k: Optional[int], request: Request) -> str:
    """``LLLLL[-K]-prompt-words-DIGEST.png``: the line number, the image of the line, the prompt's first
    words, and a digest of every setting (so a changed setting makes another file)."""
    settings = {k: v for k, v in dataclasses.asdict(request).items() if k not in _PLACE_FIELDS}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:_DIGEST_CHARS]
    words = re.sub(r"[^a-z0-9]+", "-", request.prompt.lower()).strip("-")[:40].strip("-") or "image"
    return f"{line:05d}{'' if k is None else f'-{k}'}-{words}-{digest}.png"


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

    def get(self, request: Request) -> tuple[Any, Any]:
        for pipe, _, scheduler in self.by_task.values():  # they share the U-Net and VAE: all of them
            reset(pipe, scheduler)
        if request.task not in self.by_task:
            if not self.by_task:
                try:
                    pipe, layout, self.torch_device = pipeline.load(dataclasses.replace(request, device=self.device))
                except Exception as error:
                    raise LoadError(error) from error
            else:
                pipe, layout = self._rebuild(request)
            self.by_task[request.task] = (pipe, layout, pipe.scheduler)
        pipe, layout, _ = self.by_task[request.task]
        return pipe, layout

    def _rebuild(self, request: Request) -> tuple[Any, Any]:
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
    images = checked_inputs(request)
    pipe, layout = pipes.get(request)
    device = pipes.torch_device
    try:
        request, _ = pipeline.configure(request, pipe, layout, images, device)
        if request.hidiff:
            hidiff.apply_hidiffusion(pipe, config=request.config)
        made = run.run_pipeline(request, pipe, images, device, "hidiff" if request.hidiff else "plain", True)
        temporary = out / partial_name(job.name)
        save_png(made.images[0], temporary, png_text(request, 0, made, pipe, device))
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, out / job.name)
    finally:
        if hidiff.is_patched(pipe):
            hidiff.remove_hidiffusion(pipe)
    return {
        "settings": dataclasses.asdict(request),
        "seconds": round(made.seconds, 3),
        "preset": made.preset,
        "device": str(device),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
    out = _output_folder(args)
    lines = read_prompts(args.prompts)
    base, _ = generate_flags.request_from_args(args)
    from .loading import model_source

    model_source(base.model)  # a bad local path, before anything is loaded
    if not any(line.fields.keys() - {"prompt"} or line.config for line in lines):
        checked_inputs(base)  # the flags alone make every request: a bad one is a usage error
    jobs = build_jobs(base, lines)
    _make_folder(out)

    state, rank, count = process_state()
    set_threads(args)  # after accelerate, which sets its own thread count in CPU processes without OMP_NUM_THREADS
    manifest = out / MANIFEST
    mine = [job for job in jobs if job.index % count == rank]
    pending = _pending(mine, out, manifest, rank)
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
        f"process {rank + 1}/{count}: {progress.made} made, {len(mine) - len(pending)} already done, "
        f"{progress.failed} failed, of {len(mine)} in {elapsed:.1f} s ({progress.rate():.1f} images/min)",
        file=sys.stderr,
        flush=True,
    )
    if count > 1:
        state.wait_for_everyone()
    return _summary(jobs, out, manifest, rank)


def _output_folder(args: argparse.Namespace) -> Path:
    """--out, refused when missing or a file; generate's own flags refused."""
    for name, what in (("compare", "--compare"), ("from_image", "--from-image"), ("overwrite", "--overwrite")):
        if getattr(args, name):
            raise UsageError(f"{what} is for hidiff generate; batch skips the images already made (delete to remake)")
    if not args.out:
        raise UsageError("--out DIR is required: the folder of the images and manifest.jsonl")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder")
    return out


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create the folder ({error})") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {out} is not writable")


def _pending(mine: list[Job], out: Path, manifest: Path, rank: int) -> list[Job]:
    """This process's jobs not done yet. A done one that a run killed before its manifest line left
    unrecorded is recorded now; temporary files of killed runs are removed."""
    remove_partials(out, {job.name for job in mine if job.name})
    recorded = {e.get("file") for e in read_manifest(manifest) if e.get("status") == "done"}
    pending = []
    for job in mine:
        if not (job.name and is_done(out / job.name)):
            pending.append(job)
        elif job.name not in recorded:
            append_manifest(manifest, entry(job, "done", rank, recovered=True, **recorded_run(out / job.name)))
    return pending


def _summary(jobs: list[Job], out: Path, manifest: Path, rank: int) -> int:
    """The whole batch's line (process 0) and exit code: what is missing of every process's jobs."""
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
