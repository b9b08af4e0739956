"""The package's layering (README, Architecture): what may import what, read from the source itself, lazy
imports inside functions included."""

from __future__ import annotations

import ast
import collections

from conftest import REPO

PACKAGE = REPO / "trainer"


def _imports() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported module) -> where, for every `trainer.*` import; a part is a subpackage
    (`engine`, `storage`) or a top-level module (`log`)."""
    out: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for f in sorted(PACKAGE.rglob("*.py")):
        part = f.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("trainer."):
                    out[(part, name)].append(f"{f.relative_to(REPO)}:{node.lineno}")
    return out


def _part(module: str) -> str:
    return module.split(".")[1]


def test_no_part_of_the_package_imports_another_in_a_circle() -> None:
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for src, module in _imports():
        if _part(module) != src:
            graph[src].add(_part(module))

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            v = todo.pop()
            if v == goal:
                return True
            if v not in seen:
                seen.add(v)
                todo.extend(graph.get(v, ()))
        return False

    circles = sorted((a, b) for a, targets in graph.items() for b in targets if reaches(b, a))
    assert not circles, circles


def test_checkpoint_and_the_tasks_import_nothing_from_upload_and_the_engine_no_particular_task() -> None:
    imports = _imports()
    wrong = {
        (src, module): where
        for (src, module), where in imports.items()
        if (src in ("checkpoint", "tasks", "models", "data") and _part(module) == "upload")
        or (src == "engine" and module.startswith("trainer.tasks.") and module != "trainer.tasks.base")
        or (src == "engine" and _part(module) == "models")
    }
    assert not wrong, wrong
