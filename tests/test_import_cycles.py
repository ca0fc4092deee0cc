"""No import cycles inside ``text3dsam_cli``: the imports between its modules form a DAG.

Every import statement counts, at module level and inside functions (a function-level import is how a cycle
hides: ``io/readers.py`` used to import ``io/dicom.py`` inside ``read_volume`` because ``dicom.py`` imported
``readers.py``); only ``if TYPE_CHECKING:`` blocks, which never run, are left out. ``from text3dsam_cli.io
import formats`` is an edge to ``text3dsam_cli.io.formats`` when that is a module, else to ``text3dsam_cli.io``;
an import of ``a.b.c`` also runs ``a.b``'s ``__init__``, so it is an edge to every package on the way, except the
importing module's own packages (they are always initialised before it). Lazy imports of heavy libraries stay
fine: only edges between the package's own modules are looked at.
"""

from __future__ import annotations

import ast
from pathlib import Path

import text3dsam_cli

PACKAGE = "text3dsam_cli"
ROOT = Path(text3dsam_cli.__file__).parent

#: Cycles being removed on other branches, as sorted module pairs, each with the branch that removes it (none).
KNOWN_CYCLES: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def _with_packages(target: str, importer: str, modules: dict[str, Path]) -> set[str]:
    """``target`` and the packages above it that are not the importer's own."""
    own = {importer.rsplit(".", k)[0] for k in range(1, importer.count(".") + 1)}
    parts = target.split(".")
    names = {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
    return {n for n in names if n in modules and n not in own and n != importer}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (module level or inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rsplit(".", 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    edges |= _with_packages(target, name, modules)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_function_level_imports_and_skips_type_checking() -> None:
    graph = import_graph()
    assert "text3dsam_cli.io.itk" in graph["text3dsam_cli.io.dicom"]
    assert "text3dsam_cli.io.formats" in graph["text3dsam_cli.io.readers"]
    assert "text3dsam_cli.io.images" in graph["text3dsam_cli.io.formats"]  # inside NIfTI.read
    assert "text3dsam_cli.io.volume" not in graph["text3dsam_cli.io.formats"]  # under TYPE_CHECKING only
    assert "text3dsam_cli.io.readers" not in graph["text3dsam_cli.io.dicom"]


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    for a, b in KNOWN_CYCLES:  # tolerated only as that one pair of edges
        graph[a].discard(b)
        graph[b].discard(a)
    cycles = find_cycles(graph)
    assert cycles == [], f"import cycles in {PACKAGE}: {cycles}"
