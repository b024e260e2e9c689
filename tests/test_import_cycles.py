"""No import circles in the source, counting imports inside functions.

    .venv/bin/python -m pytest tests/test_import_cycles.py

A circle hidden behind a function-level import still ties two modules into one: neither can be read,
tested or moved without the other, and the import order decides which half of it exists when. Each
module's imports are read with `ast` (tests/support/source_imports.py, as `test_layering` reads them), an
edge is drawn to every imported name that is one of our modules, and the strongly connected components of
that graph with more than one module (or a module importing itself) are the circles.
"""

from __future__ import annotations

from source_imports import imported_modules, source_files


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: the modules of `sources` it imports}, from {module: (source text, is_package)}."""
    return {module: {name for _, name in imported_modules(text, module, is_package=is_package)
                     if name in sources and name != module}
            for module, (text, is_package) in sources.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of two or more modules (Tarjan), each sorted."""
    order, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return found


def test_source_has_no_import_circles():
    sources = {module: (path.read_text(), is_package) for path, module, is_package in source_files()}
    graph = import_graph(sources)
    assert sum(len(deps) for deps in graph.values()) > 100  # the edges were found, not an empty graph
    assert not circles(graph), "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles(graph))


def test_a_circle_through_an_import_inside_a_function_is_found():
    sources = {"logitcache.stages.train.a": ("from logitcache.stages.train.b import f\n", False),
               "logitcache.stages.train.b": ("def f():\n    from logitcache.stages.train import a\n", False),
               "logitcache.stages.train.c": ("import logitcache.stages.train.a\n", False)}
    assert circles(import_graph(sources)) == [["logitcache.stages.train.a", "logitcache.stages.train.b"]]
    sources["logitcache.stages.train.b"] = ("def f():\n    import json\n", False)
    assert circles(import_graph(sources)) == []
