"""The layers import only downwards (deployments -> flows -> tasks -> modal_jobs), and tasks/ has no import cycle:
the executor interface in one module, the implementations beside it, a factory above both."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["modal_jobs", "tasks", "flows", "deployments"]  # each may import only from those before it
# The `vlmpipe` command sits above every layer (its `deploy` registers the deployments); it lives in flows/ only
# because that is where the console script points.
ABOVE_ALL = {"flows.cli"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules(package: str) -> dict[str, set[str]]:
    return {f"{package}.{path.stem}": _imports(path) for path in (REPO / package).glob("*.py")}


def test_no_import_cycle_in_tasks():
    graph = {module: {i for i in imports if i in _modules("tasks")} for module, imports in _modules("tasks").items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(module for module in graph if reaches(module, module, {module}))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_layers_import_only_downwards():
    for rank, package in enumerate(LAYERS):
        above = tuple(LAYERS[rank + 1:])
        for module, imports in _modules(package).items():
            if module in ABOVE_ALL:
                continue
            upward = sorted(i for i in imports if i.split(".")[0] in above)
            assert upward == [], f"{module} imports from a layer above it: {upward}"
