"""Issue 13: the modules of hidiff.app import each other without a cycle, and what they share
(flags, checks, choice lists, loading) sits in modules below the commands."""

from __future__ import annotations

import ast
from pathlib import Path

import hidiff.app

APP = Path(hidiff.app.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(APP).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def app_imports() -> dict[str, set[str]]:
    """Module (relative to hidiff.app, ``""`` for the package) -> the hidiff.app modules it imports."""
    modules = {_module_name(p): p for p in APP.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        package = [p for p in package if p]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                if node.level - 1 > len(package):
                    continue  # above hidiff.app
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module + ".").startswith("hidiff.app."):
                target = node.module[len("hidiff.app.") :]
            else:
                continue
            for candidate in [target, *(f"{target}.{a.name}".lstrip(".") for a in node.names)]:
                if candidate in modules and candidate != name:
                    found.add(candidate)
        graph[name] = found
    return graph


def test_the_app_import_graph_has_no_cycle():
    graph = app_imports()
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [name, target])}")
            if target not in state:
                visit(target, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_commands_sit_above_what_they_share():
    graph = app_imports()
    assert graph["args"] == set()  # the shared flags, checks and choices import no command
    assert graph["loading"] <= {"args", "toy.pipeline"}  # the shipped toy is a model it loads by name
    assert graph["reference"] == set()
    for command in ("generate", "bench", "eval"):
        assert "cli" not in graph[command]
    assert "generate" not in graph["bench"] and "bench" not in graph["eval"]


def test_batch_and_edit_use_generate_s_public_modules_not_the_command():
    """generate is split by job; the other commands import the jobs (request, validation, inputs,
    pipeline, run, output, metadata), never the generate command module itself."""
    graph = app_imports()
    for command in ("batch", "edit"):
        assert "generate" not in graph[command], command
    assert graph["batch"] >= {"request", "pipeline", "run", "metadata", "inputs"}
    assert graph["validation"] <= {"args", "request", "memory_plan"}  # no I/O module
    for job in ("request", "validation", "inputs", "pipeline", "run", "output", "metadata"):
        assert not graph[job] & {"generate", "batch", "edit", "cli"}, job
