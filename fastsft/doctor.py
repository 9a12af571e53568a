"""`fastsft doctor`: what is installed, whether it sits in the bounds we test, the GPU, the backend.

Version clashes between unsloth, trl and transformers are the breakage users report most, so each
package is checked against the range fastsft is tested with.
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# The ranges fastsft is tested with (the core's in pyproject.toml; unsloth's own bounds for [gpu]).
TESTED = {
    "torch": ">=2.6",
    "transformers": ">=5.2,<=5.17",
    "trl": ">=1.15,<=1.16",
    "peft": ">=0.18",
    "bitsandbytes": ">=0.46",
    "triton": ">=3.2",
    "datasets": ">=3.2,<5",
    "accelerate": ">=1.4",
    "unsloth": ">=2026.10.7,<2026.11",
}
# What unsloth accepts: with unsloth installed these are hard limits.
UNSLOTH_BOUNDS = {"transformers": "<=5.17,!=5.0.0,!=5.1.0", "trl": "<=1.15", "datasets": "<5"}


def check_versions() -> list[dict]:
    rows = []
    have_unsloth = _version("unsloth") is not None
    for pkg, spec in TESTED.items():
        v = _version(pkg)
        row = {"package": pkg, "version": v, "tested": spec, "ok": True, "note": ""}
        if v is None:
            row["ok"] = pkg in ("unsloth", "triton")
            row["note"] = "optional: pip install 'fastsft[gpu]'" if pkg == "unsloth" else "not installed"
        else:
            if Version(v) not in SpecifierSet(spec):
                row["ok"], row["note"] = False, f"outside the tested range {spec}"
            if have_unsloth and pkg in UNSLOTH_BOUNDS and Version(v) not in SpecifierSet(UNSLOTH_BOUNDS[pkg]):
                row["ok"], row["note"] = False, f"unsloth needs {pkg}{UNSLOTH_BOUNDS[pkg]}"
        rows.append(row)
    return rows


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def gpu_info() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "compute_capability": f"{p.major}.{p.minor}",
        "bf16": torch.cuda.is_bf16_supported(),
        "cuda": torch.version.cuda,
    }


def report(console=None) -> bool:
    """Print the doctor's table; True when nothing is out of bounds."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .backends import choose_backend

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
    gpu = gpu_info()
    if gpu:
        console.print(
            f"GPU: {gpu['name']}, {gpu['memory_gib']} GiB, compute capability {gpu['compute_capability']}, "
            f"bf16 {'yes' if gpu['bf16'] else 'no'}, CUDA {gpu['cuda']}"
        )
    else:
        console.print("GPU: none (CUDA not available): training runs on the CPU with the transformers backend")
    backend, why = choose_backend("auto")
    console.print(f"backend = \"auto\" picks: [bold]{backend}[/] ({escape(why)})")
    import torch

    from fastsft.kernels import triton_available

    dev = torch.device("cuda" if gpu else "cpu")
    console.print(
        "fastsft kernels: "
        + ("Triton" if triton_available(dev) else "PyTorch fallback (Triton needs CUDA, or TRITON_INTERPRET=1)")
    )
    return all(r["ok"] for r in rows)
