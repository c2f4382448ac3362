"""The layers keep their shape: core imports neither hosts nor app, hosts import no app and
no other host, and nothing imports in a circle. Read from the source with ast, not from
what happens to be loaded."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hidiff"
HOSTS = ("diffusers", "comfy", "invokeai", "webui")
#: Host -> the other hosts it may import. InvokeAI denoises with diffusers U-Nets inside a
#: diffusers-style pipeline, so its host is the diffusers host shown one InvokeAI denoise
#: (hidiff/invokeai/run.py) rather than a second copy of it.
HOST_IMPORTS = {"invokeai": ("diffusers",)}
FORBIDDEN_IN_CORE = (
    "diffusers",
    "transformers",
    "comfy",
    "comfy_extras",
    "folder_paths",
    "nodes",
    "accelerate",
    "invokeai",
)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), at any depth of the file."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            found.add(root)
            found.update(f"{root}.{alias.name}" for alias in node.names)
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "weights" not in p.parts)
GRAPH = {module_name(p): imports(p) for p in SOURCES}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "hidiff" else ""


def test_the_tree_has_the_three_layers():
    layers = {layer(m) for m in GRAPH}
    assert {"core", "diffusers", "app"} <= layers, layers


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) == "core"))
def test_core_imports_no_host_and_no_app(module):
    for target in GRAPH[module]:
        top = target.split(".")[0]
        assert top not in FORBIDDEN_IN_CORE, f"{module} imports {target}: core is torch only"
        if top == "hidiff":
            assert layer(target) in ("core", ""), f"{module} imports {target}: core imports only core"
            assert target != "hidiff", f"{module} imports the package root, which loads the hosts"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) in HOSTS))
def test_hosts_import_no_app_and_no_other_host(module):
    own = layer(module)
    for target in GRAPH[module]:
        if target.split(".")[0] != "hidiff" or target == "hidiff":
            continue
        assert layer(target) != "app", f"{module} imports {target}: hosts never import the app"
        allowed = (own, *HOST_IMPORTS.get(own, ()))
        assert layer(target) not in HOSTS or layer(target) in allowed, f"{module} imports another host: {target}"


def test_no_import_cycle_among_hidiff_modules():
    known = set(GRAPH)
    edges = {m: {t for t in targets if t in known and t != m} for m, targets in GRAPH.items()}
    # A module's parent package runs first when it is imported; that is not an edge of the module.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_checker_sees_forbidden_imports(tmp_path):
    """The reader resolves relative imports and finds imports inside functions."""
    probe = tmp_path / "hidiff" / "core" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..diffusers import patch\n\ndef f():\n    import diffusers\n    from . import ops\n")
    found = imports(probe, tmp_path / "hidiff")
    assert {"hidiff.diffusers", "hidiff.diffusers.patch", "diffusers", "hidiff.core.ops"} <= found
    assert layer("hidiff.diffusers.patch") == "diffusers"
