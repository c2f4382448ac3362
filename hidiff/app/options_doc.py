"""The options table of docs/options.md, made from :func:`hidiff.core.config.option_specs`.

``python -m hidiff.app.options_doc`` rewrites the table between its markers in docs/options.md;
tests/app/test_options_doc.py fails while the file's table is not what this makes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.config import OptionSpec, option_specs
from .args import config_flag

BEGIN = "<!-- options table: made by `python -m hidiff.app.options_doc` from option_specs(); do not edit -->"
END = "<!-- end of the options table -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "options.md"


def options_table() -> str:
    """The Markdown table: one row per HiDiffusionConfig field, in field order."""
    rows = ["| option | flag | default | values | meaning |", "|---|---|---|---|---|"]
    for spec in option_specs():
        cells = (f"`{spec.name}`", f"`{config_flag(spec)}`", _default(spec), _values(spec), spec.help)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def _default(spec: OptionSpec) -> str:
    if spec.default is None:
        return f"`None` ({spec.none_label})"
    return f"`{spec.default!r}`" if not isinstance(spec.default, float) else f"`{spec.default:g}`"


def _values(spec: OptionSpec) -> str:
    if spec.choices is not None:
        text = ", ".join(f"`{c!r}`" for c in spec.choices)
    elif spec.kind == "bool":
        text = "`True`, `False`"
    else:
        text = f"{'int' if spec.kind == 'int' else 'number'} in {spec.range_text()}"
    return f"{text}, `None`" if spec.optional else text


def with_table(document: str) -> str:
    """``document`` with the text between the markers replaced by the current table."""
    try:
        head, rest = document.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"{DOC} lacks the table's markers {BEGIN!r} ... {END!r}") from None
    return f"{head}{BEGIN}\n{options_table()}\n{END}{tail}"


def main() -> int:
    DOC.write_text(with_table(DOC.read_text()))
    print(f"wrote the options table of {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
