"""What every ``hidiff`` command shares, in one place: the usage error and exit codes, the
choice lists, the HiDiffusion config flags, and the checks of numeric flags.

A check is a plain function that returns its value or raises ``ValueError`` with what is
wrong and what to pass instead; :func:`flag` makes one an argparse type (bad input stops the
command at parse time, before anything is loaded) and :func:`check_value` runs one on a value
that came from elsewhere (a PNG's metadata), raising :class:`UsageError`.

This module sits below every other command module of ``hidiff.app``: it imports none of them.
"""

from __future__ import annotations

import argparse
import inspect
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..core.cfgpp import SAMPLERS as CFGPP_SAMPLERS
from ..core.cfgpp import check_guidance
from ..core.config import HiDiffusionConfig, OptionSpec, option_spec, option_specs
from ..diffusers.unet_configs import FULL_UNET_CONFIGS

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


# ------------------------------------------------------------------ choice lists
#: The random-weight / skeleton U-Net families (``hidiff info --model``, ``hidiff bench --family``).
FAMILY_NAMES = tuple(FULL_UNET_CONFIGS)
#: --scheduler name -> (diffusers class, config overrides, A1111 sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp-2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        "DPM++ 2M",
    ),
    "dpmpp-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
#: The --scheduler names that --cfgpp runs with (hidiff.enable_cfgpp's samplers).
CFGPP_SCHEDULERS = CFGPP_SAMPLERS
AUTO = "auto"
DTYPES = ("float32", "float16", "bfloat16")
VAE_TILING = (AUTO, "on", "off")

#: Modes of ``hidiff bench`` and methods of ``hidiff eval``: the stock model, HiDiffusion and
#: its one-part ablations (name -> apply_hidiffusion options), and the published package.
BASELINE = "baseline"
HIDIFF_METHODS: dict[str, dict] = {"hidiff": {}, "raunet": {"window_attn": False}, "msw": {"raunet": False}}
PUBLISHED = "published"
ALL = "all"
#: What a plain ``hidiff bench`` runs (plus ``published`` given a reference Python).
DEFAULT_BENCH_MODES = (BASELINE, "hidiff")

SEED_MAX = 2**64 - 1


# ------------------------------------------------------------------ checks (value -> value, or ValueError)
def positive(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def side_multiple_of(multiple: int) -> Callable[[int], int]:
    """The check of an image side for a model whose latents are ``multiple`` pixels a cell."""

    def side(value: int) -> int:
        if value <= 0 or value % multiple:
            raise ValueError(
                f"sizes must be positive multiples of {multiple} (the model's VAE scales by {multiple}), "
                f"got {value}; e.g. {max(multiple, value // multiple * multiple)}"
            )
        return value

    return side


#: Every supported family's VAE scales by 8.
image_side = side_multiple_of(8)


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def img2img_strength(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must lie in (0, 1] (the share of the steps that repaint the input image), got {value}")
    return value


def seed(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"must lie in [0, 2**64 - 1] (a seed is a 64-bit unsigned number), got {value}")
    return value


def cfgpp_lambda(value: float) -> float:
    """CFG++'s lam, checked by hidiff.enable_cfgpp's own rule."""
    try:
        return check_guidance(value)
    except TypeError as error:
        raise ValueError(str(error)) from None


def denoising_steps(steps: int, strength: float) -> None:
    """img2img / inpaint run int(steps * strength) steps: refuse zero, naming the least strength that runs one."""
    if int(steps * strength) >= 1:
        return
    least = math.ceil(1e4 / steps) / 1e4
    while int(steps * least) < 1:  # float rounding
        least = math.nextafter(least, 2.0)
    raise UsageError(
        f"--strength {strength} with {steps} steps denoises int({steps} x {strength}) = 0 steps; "
        f"pass --strength {least:g} or more (or more --steps)"
    )


def names(values: Sequence[str], choices: Sequence[str], noun: str) -> list[str]:
    """``values`` if each is one of ``choices``; ValueError naming the unknown ones."""
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ValueError(f"unknown {noun}(s) {unknown}; choose from {', '.join(choices)}")
    return list(values)


def png_path(path: Path, why: str) -> Path:
    """``path`` as a PNG: ``.png`` added to a name without a suffix, any other suffix refused."""
    if not path.suffix:
        return path.with_name(path.name + ".png")
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path} is not a .png file name: {why}; name a .png file, e.g. {path.with_suffix('.png')}")
    return path


# ------------------------------------------------------------------ checks as argparse types, and on other values
def flag(check: Callable[[Any], Any], parse: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse ``type``: the text parsed (``int`` or ``float``), then checked."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            kind = "a whole number" if parse is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        try:
            return check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def comma_list(
    choices: Optional[Sequence[str]] = None, noun: str = "name", item: Optional[Callable[[str], Any]] = None
) -> Callable[[str], list]:
    """An argparse ``type`` for ``a,b,c``: each part one of ``choices``, or converted by ``item``
    (an argparse type); ``all`` alone passes through when it is among the choices."""

    def convert(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} names no {noun}; pass a comma-separated list")
        if item is not None:
            return [item(p) for p in parts]
        try:
            return names(parts, choices or (), noun)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = noun
    return convert


def file_name(text: str) -> str:
    """An argparse ``type`` for a file to write (``-``: standard output): not a folder."""
    if text != "-" and Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file in it, e.g. {Path(text) / 'hidiff.out'}")
    return text


def png_file(text: str) -> str:
    """An argparse ``type`` for a chart or picture written as PNG."""
    try:
        return str(png_path(Path(file_name(text)), "it is written as a PNG"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def check_value(flag_name: str, value: Any, check: Callable[[Any], Any]) -> Any:
    """``check(value)``, its ValueError a UsageError that names the flag."""
    try:
        return check(value)
    except ValueError as error:
        raise UsageError(f"{flag_name}: {error}") from None


# ------------------------------------------------------------------ the parser
class ArgumentParser(argparse.ArgumentParser):
    """Bad usage is one line on stderr (not the whole usage block) and exit code 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=flag(positive), help="torch CPU threads")


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_method_flags(parser: argparse.ArgumentParser, flag_name: str, methods: Sequence[str], default: str) -> None:
    """``--modes`` / ``--methods``: a comma-separated subset of ``methods`` and ``published`` (or ``all``
    where ``methods`` has it); and ``--reference-python``, the Python that runs ``published``."""
    noun = flag_name.lstrip("-").rstrip("s")
    parser.add_argument(
        flag_name,
        type=comma_list((*methods, PUBLISHED), noun),
        help=f"comma-separated subset of {','.join(m for m in methods if m != ALL)},{PUBLISHED}"
        f"{f' or {ALL}' if ALL in methods else ''} (default: {default}, plus {PUBLISHED} with --reference-python)",
    )
    parser.add_argument(
        "--reference-python",
        metavar="PATH",
        help=f"a Python with the published hidiffusion package (0.1.10, diffusers 0.27.x): adds the {noun} "
        f"{PUBLISHED!r}",
    )


def keywords_for(function: Callable, args: argparse.Namespace, **given: Any) -> dict[str, Any]:
    """The keyword arguments of ``function`` that ``args`` has (same names), then ``given``."""
    found = {name: getattr(args, name) for name in inspect.signature(function).parameters if hasattr(args, name)}
    return {**found, **given}


# ------------------------------------------------------------------ the HiDiffusion config flags
#: What a choice flag holds when given its none_label (``--preset auto``): None over a base config,
#: which a flag not given (None) is not.
NONE_GIVEN = object()
#: Flags not spelled after their field (``--name-with-dashes``): the short ratio flags of earlier
#: releases, and ``--controlnet-mode`` (generate's ``--controlnet`` is the ControlNet model).
_FLAG_NAMES = {"t1_ratio": "--t1", "t2_ratio": "--t2", "controlnet": "--controlnet-mode"}


def config_flag(spec: OptionSpec) -> str:
    """The flag of a HiDiffusionConfig field."""
    return _FLAG_NAMES.get(spec.name, "--" + spec.name.replace("_", "-"))


def config_dest(spec: OptionSpec) -> str:
    """The argparse dest of a field's flag (named after the flag, so it never meets another flag's)."""
    return config_flag(spec)[2:].replace("-", "_")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every HiDiffusionConfig field, made from its OptionSpec (help, kind, choices, range)."""
    group = parser.add_argument_group("HiDiffusion options (see hidiff.HiDiffusionConfig and docs/options.md)")
    add_option_flags(group, [spec.name for spec in option_specs()])


def add_kv_flag(parser: Any) -> None:
    """--kv-downsample and --kv-levels alone (``hidiff bench``, whose other config flags are its modes)."""
    add_option_flags(parser, ["kv_downsample", "kv_levels"])


def add_option_flags(parser: Any, names: Sequence[str]) -> None:
    for name in names:
        spec = option_spec(name)
        parser.add_argument(config_flag(spec), dest=config_dest(spec), help=_flag_help(spec), **_flag_kind(spec))


def _flag_help(spec: OptionSpec) -> str:
    if spec.default is None:
        default = spec.none_label
    elif spec.kind == "bool":
        default = "on" if spec.default else "off"
    else:
        default = f"{spec.default:g}" if isinstance(spec.default, float) else str(spec.default)
    return f"{spec.help} (default: {default})".replace("%", "%%")


def _flag_kind(spec: OptionSpec) -> dict[str, Any]:
    """The argparse keywords of a field's flag: its action or type, and its choices."""
    if spec.kind == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if spec.kind == "choice":
        words = (*spec.choices, spec.none_label) if spec.optional else tuple(spec.choices or ())
        return {"type": _choice_flag(spec), "metavar": "{" + ",".join(words) + "}"}
    if spec.kind == "int" and spec.choices:
        return {"type": int, "choices": spec.choices}
    return {"type": flag(_spec_check(spec), float if spec.kind == "float" else int)}


def _choice_flag(spec: OptionSpec) -> Callable[[str], Any]:
    """An argparse type for a choice field; an optional one takes its none_label for None."""

    def convert(text: str) -> Any:
        if spec.optional and text == spec.none_label:
            return NONE_GIVEN
        if text not in (spec.choices or ()):
            choices = ", ".join((*spec.choices, spec.none_label) if spec.optional else spec.choices or ())
            what = spec.name.replace("_", " ")
            raise argparse.ArgumentTypeError(f"invalid choice: unknown {what} {text!r}; choose from {choices}")
        return text

    convert.__name__ = spec.name
    return convert


def _spec_check(spec: OptionSpec) -> Callable[[Any], Any]:
    """A check (value -> value, or ValueError) from a field's spec; its message without the field's name,
    which the flag's name stands in for."""

    def check(value: Any) -> Any:
        try:
            spec.check(value)
        except (TypeError, ValueError) as error:
            raise ValueError(str(error).removeprefix(spec.name + " ")) from None
        return value

    check.__name__ = spec.name
    return check


def config_from_args(args: argparse.Namespace, base: Optional[HiDiffusionConfig] = None) -> HiDiffusionConfig:
    """The HiDiffusionConfig of the flags given, on top of ``base`` (a config, or the defaults)."""
    options = _given_options(args)
    try:
        return HiDiffusionConfig.from_options(base, **options)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fields whose flags were given (an optional choice given as its none_label sets None)."""
    values = {spec.name: getattr(args, config_dest(spec), None) for spec in option_specs()}
    return {name: None if value is NONE_GIVEN else value for name, value in values.items() if value is not None}
