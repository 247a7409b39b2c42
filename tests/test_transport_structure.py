"""The trio layer's parts keep to their interfaces: no part reads or writes
another's private attributes, and its modules import each other without a circle.

Read from the source with :mod:`ast`, so nothing has to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tunnel" / "transport"

#: Functions that may use the private side of the object they build.
FACTORIES = {("_connection", "open_connection")}


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.glob("*.py"))}


class _Reaching(ast.NodeVisitor):
    def __init__(self, module: str) -> None:
        self.module = module
        self.function: list[str] = []
        self.found: list[str] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function.append(node.name)
        self.generic_visit(node)
        self.function.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = node.attr
        private = name.startswith("_") and not name.startswith("__")
        owner = node.value
        own = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
        outer = self.function[0] if self.function else ""
        if private and not own and (self.module, outer) not in FACTORIES:
            self.found.append(f"{self.module}:{node.lineno} {ast.unparse(node)}")
        self.generic_visit(node)


def test_no_part_reaches_into_another() -> None:
    found: list[str] = []
    for module, tree in _modules().items():
        visitor = _Reaching(module)
        visitor.visit(tree)
        found += visitor.found
    assert found == []


def test_the_modules_import_each_other_without_a_circle() -> None:
    graph: dict[str, set[str]] = {}
    modules = _modules()
    for module, tree in modules.items():
        graph[module] = set()
        for node in ast.walk(tree):  # type-only and deferred imports count too
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in modules:
                graph[module].add(node.module)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
