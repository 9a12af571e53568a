"""The package's import graph: packages in one order, arrows pointing down, and no cycle.

The order, top to bottom (`LAYERS`; a package imports only from its own package or from those below it,
a package never from one beside it on the same floor):

    cli -> use -> run -> export, plan -> loss -> levers -> backends -> data -> chat
        -> threads -> recipe, kernels -> dist -> rundir -> files, limits, progress -> machine, errors

The graph is read from the source with `ast`, so imports inside functions count too: a cycle or an upward
arrow hidden in a function body still ties two packages into one. An edge `a -> b` is every `import` /
`from ... import` in a.py that names fastsft module b (or a name defined in package b's __init__). The
top-level kernels/ folder is read as `fastsft.kernels.*`, the name it is installed under. A package's
__init__ importing its own children is the one direction allowed; a child importing its package
__init__ back is a cycle like any other.

Last, the tests' own layout: every product module has a test file a newcomer finds by name (or says where
its tests are, or why it needs none).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, fastsft/ and the kernels/ folder installed as fastsft.kernels."""
    out = {module_name(p, root): p for p in sorted((root / "fastsft").rglob("*.py"))}
    for p in sorted((root / "kernels").glob("*.py")):
        out[f"fastsft.kernels.{p.stem}"] = p
    return out


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module name of a relative import `from .{level}target import ...` in `current`."""
    if level == 0:
        return target or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_edges(known: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the fastsft modules it imports anywhere in its source (function bodies included)."""
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(name, is_package, node.level, node.module)
                # `from pkg import sub` imports module pkg.sub when there is one, else a name of pkg
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
                found = subs if len(subs) == len(node.names) else [mod, *subs]
            for wanted in found:
                target = wanted
                while target and target not in known:  # `import fastsft.x.y` -> the deepest module known
                    target = target.rpartition(".")[0]
                if target == "fastsft" != wanted:
                    continue  # fastsft.kernels: the top-level kernels/ folder, checked on its own below
                if target and target != name and target.startswith("fastsft"):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(graph: dict[str, set[str]], comp: list[str]) -> str:
    members = set(comp)
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in members]
    return "{" + ", ".join(comp) + "}: " + "; ".join(edges)


def test_the_import_graph_has_no_cycle():
    graph = import_edges(modules())
    found = cycles(graph)
    assert not found, "import cycles (move the shared part into a leaf module):\n" + "\n".join(
        _describe(graph, c) for c in found
    )


def test_the_checker_sees_cycles_in_function_bodies(tmp_path):
    """A cycle made only by an import inside a function, and one through a package __init__, are found;
    a package importing its children and a child importing a sibling's parent module are not cycles."""
    pkg = tmp_path / "fastsft"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("from . import child, leaf\nLEAF = 1\n")
    (pkg / "sub" / "child.py").write_text("def g():\n    from . import LEAF\n")
    (pkg / "sub" / "leaf.py").write_text("import fastsft.errors\nfrom .. import c\n")
    (pkg / "c.py").write_text("")
    (pkg / "errors.py").write_text("")
    graph = import_edges(modules(tmp_path))
    assert graph["fastsft.sub.leaf"] == {"fastsft.c", "fastsft.errors"}
    assert sorted(map(tuple, cycles(graph))) == [
        ("fastsft.a", "fastsft.b"),
        ("fastsft.sub", "fastsft.sub.child"),
    ]


# fastsft's packages (and top-level modules), top to bottom: each floor may import the floors below it,
# never one above it nor one beside it. `use` and `export` read what `run` wrote through the run folder.
LAYERS = (
    ("cli",),  # the commands: parse, load the recipe once, print fastsft errors
    ("use",),  # a run or model folder -> chat, evaluate, serve
    ("run",),  # the executor: preflight, data, model, loss, trainer, the end-of-run export
    ("export", "plan"),  # a run -> merged / adapter / GGUF; one step simulated on meta tensors
    ("loss",),  # the training loss route and the held-out loss
    ("levers",),  # the memory levers (offloaded checkpoints, tiled MLP, 16-bit frozen weights)
    ("backends",),  # recipe -> (model, tokenizer)
    ("data",),  # recipe -> tokenized rows with masks
    ("chat",),  # templates, end of turn, the one generator, the task metric
    ("threads",),  # the CPU policy: OpenMP's waits, the intra-op threads from the cores free (kernels')
    ("recipe", "kernels"),  # the typed recipe; the Triton kernels (no fastsft import at all)
    ("dist",),  # ranks of a distributed run
    ("rundir",),  # everything a run writes
    ("files", "limits", "progress"),  # atomic writes; out of memory / disk; progress bars
    ("machine", "errors"),  # versions, device, peak memory; the error types
)
FLOOR = {name: i for i, floor in enumerate(LAYERS) for name in floor}


def package_of(module: str) -> str:
    """fastsft.run.train -> "run"; fastsft.errors -> "errors"; fastsft.kernels.ops -> "kernels"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def arrows_against_the_order(graph: dict[str, set[str]], floor: dict[str, int] = FLOOR) -> list[str]:
    """Every import from a package to one above it or beside it (on the same floor)."""
    bad = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            pa, pb = package_of(a), package_of(b)
            if pa and pb and pa != pb and floor[pa] >= floor[pb]:
                where = "beside" if floor[pa] == floor[pb] else "above"
                bad.append(f"{a} -> {b} ({pb} is {where} {pa})")
    return bad


def test_every_package_has_a_floor():
    packages = {package_of(m) for m in modules()} - {""}
    assert packages == set(FLOOR), (
        f"place {sorted(packages - set(FLOOR))} in LAYERS; drop {sorted(set(FLOOR) - packages)}"
    )


def test_imports_point_down_the_layers():
    """Top-level and in-function imports alike: a package below never reaches one above it (that would make
    the two one room: a change in the upper one could break the lower), nor one on its own floor."""
    bad = arrows_against_the_order(import_edges(modules()))
    assert not bad, (
        "imports against the package order (move the shared part down, or the caller up):\n" + "\n".join(bad)
    )


def test_the_order_checker_sees_arrows_up_and_sideways(tmp_path):
    """An import up the order in a function body and one sideways are found; one down is not."""
    pkg = tmp_path / "fastsft"
    for sub in ("top", "mid", "side", "low"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "top" / "a.py").write_text("from fastsft.mid import m\n")  # down: fine
    (pkg / "mid" / "m.py").write_text("def f():\n    from ..top import a\n")  # up, lazily
    (pkg / "side" / "s.py").write_text("import fastsft.mid.m\nfrom fastsft.low import x\n")  # sideways; down
    (pkg / "low" / "x.py").write_text("")
    floor = {"top": 0, "mid": 1, "side": 1, "low": 2}
    graph = import_edges(modules(tmp_path))
    assert arrows_against_the_order(graph, floor) == [
        "fastsft.mid.m -> fastsft.top.a (top is above mid)",
        "fastsft.side.s -> fastsft.mid.m (mid is beside side)",
    ]


# The modules everything else shares, and the only fastsft modules each may import.
LEAVES = {
    "fastsft.errors": set(),
    "fastsft.machine": set(),
    "fastsft.files": {"fastsft.errors"},
    "fastsft.chat.templates": {"fastsft.errors"},
    "fastsft.backends.common": {"fastsft.errors"},
    "fastsft.chat.generation": {"fastsft.chat.templates", "fastsft.threads"},  # (the free cores per token)
    "fastsft.cli.common": {"fastsft.errors", "fastsft.backends.common"},
}


@pytest.mark.parametrize("module", sorted(LEAVES))
def test_leaf_modules_stay_leaves(module):
    graph = import_edges(modules())
    assert graph[module] <= LEAVES[module], f"{module} imports {sorted(graph[module] - LEAVES[module])}"


def _calls(path: Path, attribute: str, receivers: set[str] | None = None) -> list[int]:
    """Lines of `path` that call `X.attribute(...)` (X any name in `receivers`, or anything)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == attribute
        ):
            recv = node.func.value
            if receivers is None or (isinstance(recv, ast.Name) and recv.id in receivers):
                lines.append(node.lineno)
    return lines


def test_one_generator_and_one_model_loader():
    """Generation (`model.generate`) lives in fastsft/chat/generation.py only, and loading a causal LM or an
    adapter (`AutoModelForCausalLM.from_pretrained`, `PeftModel.from_pretrained`) in fastsft/backends/
    only: a second copy elsewhere would drift from the end-of-turn stop, the load policy or the
    pad-token resize."""
    strays = []
    for name, path in modules().items():
        rel = path.relative_to(ROOT)
        if name != "fastsft.chat.generation":
            strays += [f"{rel}:{n}: .generate(" for n in _calls(path, "generate")]
        if not name.startswith("fastsft.backends"):
            loaders = {"AutoModelForCausalLM", "PeftModel"}
            strays += [f"{rel}:{n}: from_pretrained" for n in _calls(path, "from_pretrained", loaders)]
    assert not strays, "use fastsft.chat.generation / fastsft.backends instead:\n" + "\n".join(strays)


def test_no_module_forges_a_recipe():
    """A recipe is built from its file (`recipe.load`) in one place: no module outside fastsft/recipe/
    calls `validate` or copies `recipe.raw` to make another recipe. Reading another data file as training
    read `data.train` is `DataSpec.one_file` (fastsft/data/spec.py); a forged recipe was validated again
    and refused the evaluation settings of the run it came from."""
    strays = []
    for name, path in modules().items():
        if name.startswith("fastsft.recipe"):
            continue
        rel = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == "validate":
                    strays.append(f"{rel}:{node.lineno}: validate(...)")
            if isinstance(node, ast.Attribute) and node.attr == "raw" and isinstance(node.value, ast.Name):
                if node.value.id in ("recipe", "r"):
                    strays.append(f"{rel}:{node.lineno}: {node.value.id}.raw")
    assert not strays, (
        "build recipes with fastsft.recipe.load; derive data specs with DataSpec:\n" + "\n".join(strays)
    )


# fastsft modules that may be imported inside a function, with why: each imports torch (or Triton) when
# it loads, which `fastsft --help`, `fastsft validate` and the light modules must not pay for
LAZY = {
    "fastsft.plan": "torch at load: the meta-tensor simulation",
    "fastsft.loss.route": "torch and the kernels (Triton) at load",
    "fastsft.kernels": "torch and Triton at load",
    "fastsft.levers": "its children load torch",
    "fastsft.backends.unsloth": "imported first of all, only when the Unsloth backend is chosen",
    "fastsft.backends.transformers": "the other backend of that same choice",
    "fastsft.run.callbacks": "transformers at load, which must come after the backend's start (Unsloth first)",
}


def test_fastsft_modules_are_imported_at_the_top():
    """An import of fastsft's own code inside a function is allowed only for the heavy modules of LAZY;
    every other one stands at the top of its file, where a reader sees what the file depends on."""
    strays = []
    for name, path in modules().items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names if a.name.startswith("fastsft")]
                elif isinstance(node, ast.ImportFrom):
                    mod = _resolve(name, is_package, node.level, node.module)
                    targets = [f"{mod}.{a.name}" for a in node.names] if mod.startswith("fastsft") else []
                else:
                    continue
                for t in targets:
                    if not any(t == lazy or t.startswith(lazy + ".") for lazy in LAZY):
                        strays.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not strays, "import these at the top of the file (or add a heavy module to LAZY):\n" + "\n".join(
        sorted(set(strays))
    )


def test_kernels_import_nothing_of_fastsft():
    """kernels/ (installed as fastsft.kernels) is pure Triton + PyTorch: no import of the rest of fastsft."""
    folder = ROOT / "kernels"
    if not folder.is_dir():
        pytest.skip("no top-level kernels/ folder")
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                depth = len(path.relative_to(folder).parts) - 1  # folders below kernels/
                if node.level > depth + 1 or (node.module or "").startswith("fastsft"):
                    names = [f"{'.' * node.level}{node.module or ''}"]
            bad += [
                f"{path.relative_to(ROOT)}:{node.lineno}: {n}"
                for n in names
                if n.startswith(("fastsft", "."))
            ]
    assert not bad, "kernels/ imports fastsft:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------------
# every product module has a test file a newcomer finds by name
# ----------------------------------------------------------------------------------------------
#
# The layout: tests/ mirrors the packages one folder deep.
#   fastsft/<name>.py                 -> tests/test_<name>.py
#   fastsft/<pkg>/.../<name>.py       -> tests/<pkg>/test_<name>.py   (use/serve/wire.py -> tests/use/test_wire.py)
#   fastsft/<pkg>/__init__.py         -> tests/<pkg>/test_<pkg>.py    (use/serve/__init__ -> tests/use/test_serve.py)
#   kernels/<name>.py                 -> tests/kernels/test_<name>.py (installed as fastsft.kernels.<name>)
# and test_<name>_<topic>.py in that folder counts too (tests/export/test_gguf_quant.py for export/gguf.py).
# Test files carry no __init__.py, so a basename is one test module for pytest: two modules with one name
# (data/read.py, export/read.py) take a topic suffix apart (tests/export/test_read_run.py).

# module -> the test file that holds its tests, where that file is named for something else and is the
# better home (a split would only scatter one story over files)
TESTED_ELSEWHERE = {
    # backends: the loading policy, the fp16 load and a GGUF file as a model are each one story across
    # the backends' modules
    "fastsft.backends": "tests/backends/test_loading_policy.py",
    "fastsft.backends.common": "tests/backends/test_loading_policy.py",
    "fastsft.backends.transformers": "tests/backends/test_fp16.py",
    "fastsft.backends.gguf": "tests/use/test_model_refs.py",
    "fastsft.chat.generation": "tests/chat/test_scoring.py",  # answer_batch against one-at-a-time
    # cli: each command is tested with the feature it runs (run's failures, generate / chat / eval / export)
    "fastsft.cli.main": "tests/run/test_reliability.py",
    "fastsft.cli.use": "tests/export/test_export.py",  # test_cli_commands: generate, chat, eval, export
    "fastsft.dist": "tests/run/test_distributed.py",
    # export: every format from one trained run (a module-scoped fixture); the transaction around each
    "fastsft.export.adapter": "tests/export/test_export.py",
    "fastsft.export.merged": "tests/export/test_export.py",
    "fastsft.export.transaction": "tests/export/test_export.py",
    # levers: each lever against the plain checkpointed step, one harness
    "fastsft.levers._recompute": "tests/levers/test_levers.py",
    "fastsft.levers.frozen16": "tests/levers/test_levers.py",
    "fastsft.levers.offload": "tests/levers/test_levers.py",
    "fastsft.levers.tiled_layer": "tests/levers/test_levers.py",
    "fastsft.levers.tiled_mlp": "tests/levers/test_levers.py",
    # plan: the simulated step against the real one, which is what each part is for
    "fastsft.plan.attention": "tests/plan/test_plan.py",
    "fastsft.plan.autocast": "tests/plan/test_plan.py",
    "fastsft.plan.model": "tests/plan/test_plan.py",
    "fastsft.plan.simulate": "tests/plan/test_plan.py",
    "fastsft.plan.tracker": "tests/plan/test_plan.py",
    # run: the before / after numbers and the loop's callbacks act in a whole run
    "fastsft.run.answers": "tests/run/test_before_cache.py",  # before-numbers, cache, answers after
    "fastsft.run.callbacks": "tests/run/test_reliability.py",  # checkpoints, signals, non-finite steps
    # serve: the real server, and the same under hostile load
    "fastsft.use.serve.app": "tests/use/test_serve.py",
    "fastsft.use.serve.engine": "tests/use/test_serve_attacks.py",
    "fastsft.use.serve.transport": "tests/use/test_serve_attacks.py",
    # kernels: the fused linear loss's parts against its reference, through the public function
    "fastsft.kernels": "tests/kernels/test_layout.py",  # the package itself is the folder mapping
    "fastsft.kernels.linear_forward": "tests/kernels/test_linear_cross_entropy.py",
    "fastsft.kernels.online_tiles": "tests/kernels/test_linear_cross_entropy.py",
    "fastsft.kernels.ops": "tests/kernels/test_linear_cross_entropy.py",
}

# modules that need no test file of their own, with why
NEEDS_NO_TEST = {
    "fastsft": "empty",
    "fastsft.cli": "re-exports entry",
    "fastsft.cli.__main__": "`python -m fastsft.cli`: two lines calling entry",
    "fastsft.chat": "a table of contents (docstring only)",
    "fastsft.loss": "a table of contents (docstring only)",
    "fastsft.run": "a table of contents (docstring only)",
    "fastsft.use": "re-exports answer, evaluation and load",
    "fastsft.kernels._triton": "two environment probes every kernel test goes through",
}


def test_file_for(module: str, path: Path) -> tuple[str, str]:
    """(folder, stem) of the test file that a module's tests go in: ("tests/data", "test_read")."""
    parts = module.split(".")[1:]
    if not parts:
        return "tests", "test_fastsft"
    is_package = path.name == "__init__.py" or module == "fastsft.kernels"  # fastsft/kernels.py: a package
    folder = "tests" if len(parts) == 1 and not is_package else f"tests/{parts[0]}"
    return folder, f"test_{parts[-1]}"


test_file_for.__test__ = False  # a helper, not a test


def test_files(root: Path = ROOT) -> list[Path]:
    return sorted(
        p.relative_to(root) for folder in ("tests", "benchmarks") for p in (root / folder).rglob("test_*.py")
    )


test_files.__test__ = False


def modules_without_tests(root: Path = ROOT, elsewhere=None, none=None) -> list[str]:
    """Product modules with no test file by name and no entry in TESTED_ELSEWHERE / NEEDS_NO_TEST."""
    elsewhere = TESTED_ELSEWHERE if elsewhere is None else elsewhere
    none = NEEDS_NO_TEST if none is None else none
    found = {(p.parent.as_posix(), p.stem) for p in test_files(root)}
    missing = []
    for module, path in modules(root).items():
        folder, stem = test_file_for(module, path)
        named = any(f == folder and (s == stem or s.startswith(stem + "_")) for f, s in found)
        if not named and module not in elsewhere and module not in none:
            missing.append(f"{path.relative_to(root)}: add {folder}/{stem}.py")
    return missing


def test_every_module_has_a_test_file_by_name():
    missing = modules_without_tests()
    assert not missing, (
        "these modules have no test file a newcomer finds by name (write one, or name the file that tests "
        "them in TESTED_ELSEWHERE, or say in NEEDS_NO_TEST why none is needed):\n" + "\n".join(missing)
    )


def test_the_test_maps_are_current():
    """Every entry names a module that exists, and a test file that exists; a module that has gained a test
    file by name leaves the maps (they only shrink)."""
    known = modules()
    listed = {**TESTED_ELSEWHERE, **NEEDS_NO_TEST}
    stale = [f"{m}: no such module" for m in listed if m not in known]
    stale += [f"{m}: {f} does not exist" for m, f in TESTED_ELSEWHERE.items() if not (ROOT / f).is_file()]
    stale += [f"{m}: in both maps" for m in TESTED_ELSEWHERE.keys() & NEEDS_NO_TEST.keys()]
    unnamed = {line.split(":")[0] for line in modules_without_tests(elsewhere={}, none={})}
    stale += [
        f"{m}: has a test file by name now, take it out of the map"
        for m in listed
        if m in known and known[m].relative_to(ROOT).as_posix() not in unnamed
    ]
    assert not stale, "\n".join(stale)


def test_test_file_names_are_unique():
    """pytest imports tests/ and benchmarks/ files by basename (no __init__.py): two with one name fail the
    collection of both ("import file mismatch")."""
    seen: dict[str, list[str]] = {}
    for p in test_files():
        seen.setdefault(p.name, []).append(p.as_posix())
    assert not [v for v in seen.values() if len(v) > 1], [v for v in seen.values() if len(v) > 1]


def test_the_test_file_checker_sees_a_module_without_tests(tmp_path):
    (tmp_path / "kernels").mkdir()
    for rel in (
        "fastsft/__init__.py",
        "fastsft/top.py",
        "fastsft/pkg/__init__.py",
        "fastsft/pkg/sub/deep.py",
        "fastsft/pkg/named.py",
        "fastsft/pkg/bare.py",
        "kernels/op.py",
        "fastsft/alone.py",
        "tests/test_top.py",
        "tests/pkg/test_pkg.py",
        "tests/pkg/test_deep.py",
        "tests/pkg/test_named_topic.py",
        "tests/kernels/test_op.py",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "benchmarks").mkdir()
    got = modules_without_tests(tmp_path, elsewhere={}, none={"fastsft": "empty"})
    assert got == [
        "fastsft/alone.py: add tests/test_alone.py",
        "fastsft/pkg/bare.py: add tests/pkg/test_bare.py",
    ]
    assert (
        modules_without_tests(
            tmp_path, elsewhere={"fastsft.alone": "x"}, none={"fastsft": "", "fastsft.pkg.bare": ""}
        )
        == []
    )
