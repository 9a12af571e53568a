"""`fastsft doctor`: what is installed, whether it sits in the bounds we test, the GPU, the backend.

Version clashes between unsloth, trl and transformers are the breakage users report most, so each
package is checked against the range fastsft is tested with.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fastsft import backends, machine, threads

# What doctor checks; their ranges come from fastsft's own metadata (machine.tested_bounds).
CHECKED = (*(p for p in machine.PACKAGES if p != "fastsft"), "unsloth_zoo", "xformers")
OPTIONAL = ("triton", "unsloth", "unsloth_zoo", "xformers")  # a missing one is not a fault


# What each bound is for: the core's admit the current stack; the `gpu` extra's are unsloth's.
BOUND_REASONS = {
    "torch": "core >=2.6, the oldest fastsft names; gpu extra <2.15 (unsloth 2026.10's cap: pip would otherwise swap a CUDA build for 2.15)",
    "transformers": "core <=5.25, the newest tested (5.25 brings the `kernels` package); "
    "gpu extra <=5.17 (unsloth's cap)",
    "trl": "core 1.15 to 1.16, both tested on the CPU path; gpu extra <=1.15 (unsloth's cap)",
    "datasets": "core <6 (datasets 5 tested); gpu extra <5 (unsloth's cap)",
}


def installed_set(core: dict[str, str], gpu: dict[str, str]) -> str:
    """Which tested set is installed: the Unsloth-bounded one (every package the `gpu` extra bounds
    inside those bounds: unsloth may be installed beside it) or the newest core set (some package past
    them: fine on the transformers backend; `pip install 'fastsft[gpu]'` would move it back)."""
    past = []
    for pkg, spec in gpu.items():
        v = machine.version(pkg)
        if pkg in core and v is not None and Version(v) not in SpecifierSet(spec):
            past.append(f"{pkg} {v} (gpu extra: {pkg}{spec})")
    if not past:
        return "the Unsloth-bounded set: every package within the `gpu` extra's bounds (unsloth can join it)"
    return (
        "the newest core set: "
        + ", ".join(past)
        + " past the `gpu` extra's bounds; fine for the transformers backend, while pip install "
        "'fastsft[gpu]' would move them back to what unsloth accepts"
    )


def check_versions() -> list[dict]:
    """One row per CHECKED package: its version, the range fastsft is tested with, whether it is inside,
    and where it is not, the pip command that puts it back. With unsloth installed, the `gpu` extra's
    ranges (what Unsloth accepts, torch<2.15 for unsloth 2026.10 included) are hard limits too."""
    core, gpu = machine.tested_bounds()
    tested = {**core, **{pkg: spec for pkg, spec in gpu.items() if pkg not in core}}
    unsloth_bounds = {pkg: spec for pkg, spec in gpu.items() if pkg in core}
    have_unsloth = machine.version("unsloth") is not None
    rows = []
    for pkg in CHECKED:
        v, spec = machine.version(pkg), tested.get(pkg, "")
        row = {"package": pkg, "version": v, "tested": spec or "-", "ok": True, "note": ""}
        if v is None:
            row["ok"] = pkg in OPTIONAL
            row["note"] = "optional: pip install 'fastsft[gpu]'" if pkg in OPTIONAL[1:] else "not installed"
        else:
            if Version(v) not in SpecifierSet(spec):
                row["ok"], row["note"] = False, f"outside the tested range {spec}"
            if have_unsloth and pkg in unsloth_bounds and Version(v) not in SpecifierSet(unsloth_bounds[pkg]):
                row["ok"], row["note"] = False, f"unsloth needs {pkg}{unsloth_bounds[pkg]}"
            if not row["ok"]:  # the fix asks for both ranges at once, so it cannot trade one for the other
                both = SpecifierSet(spec) & SpecifierSet(unsloth_bounds.get(pkg, "") if have_unsloth else "")
                row["note"] += f": pip install '{pkg}{both}'"
        rows.append(row)
    return rows


def report(console=None) -> bool:
    """Print the doctor's table; True when nothing is out of bounds."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    rows = check_versions()
    table = Table(title="fastsft doctor: packages")
    for col in ("package", "version", "tested", "status"):
        table.add_column(col)
    for r in rows:
        status = "[green]ok[/]" if r["ok"] else f"[red]{escape(r['note'])}[/]"
        if r["ok"] and r["note"]:
            status = f"[yellow]{escape(r['note'])}[/]"  # escaped: "pip install 'fastsft[gpu]'" is not markup
        table.add_row(r["package"], r["version"] or "-", r["tested"], status)
    console.print(table)
    core, extra = machine.tested_bounds()
    console.print(f"installed: {escape(installed_set(core, extra))}", highlight=False)
    for pkg, why in BOUND_REASONS.items():
        console.print(f"  bounds of {pkg}: {escape(why)}", highlight=False)
    gpu = machine.gpu()
    if gpu:
        console.print(
            f"GPU: {gpu['name']}, {gpu['memory_gib']} GiB, compute capability {gpu['compute_capability']}, "
            f"bf16 {'yes' if gpu['bf16'] else 'no'}, CUDA {gpu['cuda']}"
        )
    else:
        console.print(
            "GPU: none (CUDA not available): training runs on the CPU with the transformers backend"
        )
    t = threads.facts()
    if t["follows_free_cores"]:
        waits = (
            f"a short spin (GOMP_SPINCOUNT={t.get('gomp_spincount')}), each step on the cores free (fastsft)"
        )
    else:
        chosen = [
            f"{k.upper()}={t[k]}" for k in ("omp_wait_policy", "gomp_spincount", "kmp_blocktime") if t.get(k)
        ]
        waits = f"{', '.join(chosen) or 'OpenMP defaults (spinning waits)'} ({t['set_by']})"
    console.print(
        f"CPU threads: {t.get('intra_op_threads', '-')} intra-op on {t['cores']} cores; waits: {waits}",
        highlight=False,
        markup=False,
    )
    backend, why = backends.choose_backend("auto")
    console.print(f'backend = "auto" picks: [bold]{backend}[/] ({escape(why)})')
    import torch

    from fastsft.kernels import triton_available

    dev = torch.device("cuda" if gpu else "cpu")
    console.print(
        "fastsft kernels: "
        + (
            "Triton"
            if triton_available(dev)
            else "PyTorch fallback (Triton needs CUDA, or TRITON_INTERPRET=1)"
        )
    )
    return all(r["ok"] for r in rows)
