"""No module of app/ imports itself back, however long the way round.

The layers contract (``lint-imports``, pyproject.toml) keeps dependencies between the
top-level packages pointing down; this test covers what it cannot see: cycles between
modules of one package or one layer (``engines.registry`` -> ``engines.hypervisor`` ->
``engines.registry`` was one). Imports under ``if TYPE_CHECKING:`` are left out: they
never run, so they cannot leave a module half-initialised, and they are how a helper
module names the type of the object it serves.
"""

from __future__ import annotations

import grimp


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Each group of modules that import one another in a cycle (strongly connected
    components of more than one module, or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    # Tarjan's algorithm, iterative: (module, the imports still to visit).
    work: list[tuple[str, list[str]]] = []

    def enter(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        work.append((module, sorted(graph.find_modules_directly_imported_by(module))))

    for root in sorted(graph.modules):
        if root in index:
            continue
        enter(root)
        while work:
            module, pending = work[-1]
            if pending:
                target = pending.pop()
                if target not in index:
                    enter(target)
                elif target in on_stack:
                    low[module] = min(low[module], index[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[module])
            if low[module] == index[module]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1 or graph.direct_import_exists(
                    importer=module, imported=module
                ):
                    found.append(sorted(component))
    return sorted(found)


def test_app_has_no_import_cycles() -> None:
    graph = grimp.build_graph("app", exclude_type_checking_imports=True)
    assert "app.engines.registry" in graph.modules  # the graph really holds app/
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_long_and_short_cycles() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in [
        ("x.a", "x.b"), ("x.b", "x.c"), ("x.c", "x.a"),  # a three-module cycle
        ("x.c", "x.d"), ("x.d", "x.e"),  # leaves the cycle: not part of it
        ("x.f", "x.g"), ("x.g", "x.f"),  # a second, separate cycle
        ("x.h", "x.a"),  # imports into a cycle without being in it
    ]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["x.a", "x.b", "x.c"], ["x.f", "x.g"]]
    graph.remove_import(importer="x.c", imported="x.a")
    graph.remove_import(importer="x.g", imported="x.f")
    assert import_cycles(graph) == []
