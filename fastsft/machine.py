"""Facts about this machine and this install: package versions and the ranges fastsft is tested with,
the device, the peak memory, fastsft's cache folder.

A leaf: it imports nothing of fastsft, so the run (run.json, report), `fastsft doctor`, the guards and
the benchmarks all ask it without importing each other.
"""

from __future__ import annotations

import os
import platform
import resource
from importlib import metadata
from pathlib import Path

# What a version report lists (run.json, the unsloth CPU check); `fastsft doctor` checks these against
# `tested_bounds()`.
PACKAGES = (
    "fastsft",
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "triton",
    "datasets",
    "accelerate",
    "unsloth",
)


def version(package: str) -> str | None:
    """The installed version of `package`, None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions(extra: tuple[str, ...] = ()) -> dict:
    """{"python": ..., package: version or None} for `PACKAGES` and `extra`, plus CUDA's on a GPU."""
    out = {"python": platform.python_version()}
    for pkg in (*PACKAGES, *extra):
        out[pkg] = version(pkg)
    cuda = _torch_cuda_version()
    if cuda:
        out["cuda"] = cuda
    return out


def tested_bounds() -> tuple[dict[str, str], dict[str, str]]:
    """(core, gpu): the version range of each requirement as fastsft's installed metadata declares it
    (pyproject.toml's `dependencies`, then its `gpu` extra), so the ranges live in one place. A package
    named in both (trl) appears in both: the gpu extra's range is what Unsloth accepts."""
    from packaging.requirements import Requirement

    core: dict[str, str] = {}
    gpu: dict[str, str] = {}
    try:
        requires = metadata.requires("fastsft") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return core, gpu
    for line in requires:
        req = Requirement(line)
        marker = str(req.marker) if req.marker else ""
        if "extra" not in marker:
            core[req.name] = str(req.specifier)
        elif req.marker.evaluate({"extra": "gpu"}):
            gpu[req.name] = str(req.specifier)
    return core, gpu


def _torch_cuda_version() -> str | None:
    import torch

    return torch.version.cuda if torch.cuda.is_available() else None


def gpu() -> dict | None:
    """The first CUDA device (name, memory, compute capability, bf16, CUDA version), None without one."""
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


def device_description() -> str:
    """One line naming where this process computes: the GPU (memory, sm_XY) or the CPU model and cores."""
    g = gpu()
    if g:
        return f"{g['name']} ({g['memory_gib']:.0f} GiB, sm_{g['compute_capability'].replace('.', '')})"
    return f"CPU {cpu_model()} ({os.cpu_count()} cores)"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_gib() -> tuple[float, str]:
    """(peak, kind): the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max allocated"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / 2**20, "cpu peak RSS"


def cache_root() -> Path:
    """fastsft's cache folder: $FASTSFT_CACHE, else $XDG_CACHE_HOME/fastsft, else ~/.cache/fastsft."""
    root = os.environ.get("FASTSFT_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastsft"
