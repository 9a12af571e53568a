"""The import graph of fastsft/ (top-level and function-level imports; importing a.b.c counts as
importing a.b too, whose __init__ runs first, except from inside a.b: a module of a package is running, so
its package's __init__ has run already) has no cycle through the modules of a run."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fastsft"
# the modules a run goes through; the other cycles (backends <-> its children, a package <-> its children) are
# being broken separately: add their modules here once they are
NO_CYCLE = {
    "fastsft.run.train",
    "fastsft.run.trainer",
    "fastsft.run.resume",
    "fastsft.run.records",
    "fastsft.run.answers",
    "fastsft.run.guard",
    "fastsft.dist",
    "fastsft.machine",
    "fastsft.run.sft_args",
    "fastsft.recipe",
    "fastsft.recipe.schema",
    "fastsft.cli.doctor",
    "fastsft.rundir",
    "fastsft.run.report",
    "fastsft.files",
    "fastsft.errors",
}


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = ["fastsft", *p.relative_to(PKG).with_suffix("").parts]
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
                prefix = ".".join(x for x in (base, node.module or "") if x)
                names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            for name in names:
                named = name
                while name.startswith("fastsft."):
                    # a.b.c's parents are imported first, except mod's own packages (imported already)
                    if name in mods and name != mod and (name == named or not mod.startswith(name + ".")):
                        deps.add(name)
                    name = name.rpartition(".")[0]
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module."""
    reach = {m: set() for m in graph}
    for m in graph:
        todo = list(graph[m])
        while todo:
            n = todo.pop()
            if n not in reach[m]:
                reach[m].add(n)
                todo.extend(graph.get(n, ()))
    comps = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph}
    return [set(c) for c in comps if len(c) > 1]


def test_the_graph_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_goes_through_a_run():
    found = [sorted(c) for c in cycles(import_graph()) if c & NO_CYCLE]
    assert not found, found
