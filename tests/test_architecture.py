"""The package's shape, checked: no import cycle (lazy imports inside functions included), and the scan
core never imports the planted benchmark."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "raymem"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """raymem module -> the raymem modules it imports anywhere in its body."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raymem"):
                # `from raymem import runtime` imports the module raymem.runtime
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if candidate in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("raymem")}
        graph[name] = {m for m in found if m in modules and m != name and m != "raymem"}
    return graph


def test_no_import_cycle():
    graph = imports()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_scan_core_does_not_import_the_benchmark():
    graph = imports()
    core = [m for m in graph if not m.startswith("raymem.planted") and m not in ("raymem.cli", "raymem.demo")]
    assert {m for m in core if any(dep.startswith("raymem.planted") for dep in graph[m])} == set()


def test_the_graph_is_read():
    graph = imports()
    assert "raymem.label_inputs" in graph["raymem.label"] and "raymem.sources" in graph["raymem.join"]
