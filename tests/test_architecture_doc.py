"""docs/architecture.md names every module under hidiff/: the tree is read when the test runs, so a
module added by anyone fails it until the page names it (and a module the page names must exist)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def modules(root: Path = ROOT) -> set[str]:
    """Every module of hidiff/ by its path: ``hidiff/x/y.py``, and a package as ``hidiff/x/``."""
    found = set()
    for path in (root / "hidiff").rglob("*.py"):
        relative = path.relative_to(root)
        if "weights" in relative.parts:
            continue
        found.add(f"{relative.parent.as_posix()}/" if path.name == "__init__.py" else relative.as_posix())
    found.discard("hidiff/")  # the top package: hidiff/__init__.py
    found.add("hidiff/__init__.py")
    return found


def named() -> set[str]:
    """The module paths the page's tables name (first cell of each row)."""
    return set(re.findall(r"^\| `(hidiff/[\w/]*(?:\.py)?)` \|", DOC.read_text(), flags=re.MULTILINE))


def test_every_module_under_hidiff_is_named():
    missing = sorted(modules() - named())
    assert not missing, f"docs/architecture.md does not name {missing}: add a row for each to 'Every module'"


def test_every_module_named_exists():
    gone = sorted(named() - modules())
    assert not gone, f"docs/architecture.md names {gone}, which are not in hidiff/ any more"


def test_an_unnamed_module_fails(tmp_path):
    """The check itself: a module the page does not name is reported."""
    package = tmp_path / "hidiff" / "newhost"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "thing.py").write_text("")
    assert modules(tmp_path) == {"hidiff/newhost/", "hidiff/newhost/thing.py", "hidiff/__init__.py"}
    assert modules(tmp_path) - named() == {"hidiff/newhost/", "hidiff/newhost/thing.py"}
