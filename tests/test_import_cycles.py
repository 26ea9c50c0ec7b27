"""No import cycle in ``hms_tasks``: the import graph of its modules is acyclic.

The graph is read from the source with :mod:`ast`, so it sees every import, including those
inside functions (a function-local import hides a cycle from Python, not from a reader).
Imports under ``if TYPE_CHECKING:`` are left out: they never run.

An edge goes from a module to the module it names: ``from hms_tasks.cache import core`` is an
edge to ``hms_tasks.cache.core``; ``from hms_tasks.cache import get_or_build`` an edge to the
package ``hms_tasks.cache`` itself (its ``__init__``). Parent packages a dotted import passes
through are not edges: Python has them in ``sys.modules`` before their submodules run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import hms_tasks

ROOT = Path(hms_tasks.__file__).parent
PACKAGE = "hms_tasks"

#: Cycles (strongly connected components) outside the cache that other work removes; each is
#: listed sorted. Empty this as they go: a cycle not listed here fails the test.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child.test):
            for sub in child.orelse:
                yield from _imports(sub)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _imports(child)


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the package that module ``name`` (at ``path``) imports."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        for target in targets:
            # ``import a.b.c`` names module a.b.c; keep the longest prefix that is a module.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(name, path, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(tuple(sorted(component)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_finder_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    # The finder has teeth: a cycle hidden by a function-local import is found, and one
    # under TYPE_CHECKING is not.
    known = {"hms_tasks.x", "hms_tasks.x.a", "hms_tasks.x.b", "hms_tasks.x.c"}
    a = tmp_path / "a.py"
    a.write_text("from hms_tasks.x import b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from . import a\n")
    c = tmp_path / "c.py"
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from hms_tasks.x import a\n")
    edges = {"hms_tasks.x.a": imported("hms_tasks.x.a", a, known),
             "hms_tasks.x.b": imported("hms_tasks.x.b", b, known),
             "hms_tasks.x.c": imported("hms_tasks.x.c", c, known)}
    assert edges["hms_tasks.x.c"] == set()
    assert cycles(edges) == [("hms_tasks.x.a", "hms_tasks.x.b")]


def test_no_import_cycle_in_the_cache() -> None:
    found = [c for c in cycles(graph()) if any(m.startswith("hms_tasks.cache") for m in c)]
    assert found == []


def test_no_import_cycle() -> None:
    found = cycles(graph())
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert new == [], "import cycles (strongly connected modules):\n" + "\n".join(
        " <-> ".join(c) for c in new)
    gone = KNOWN_CYCLES - set(found)
    assert not gone, f"no longer cycles, drop them from KNOWN_CYCLES: {sorted(gone)}"
