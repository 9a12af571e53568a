"""Whether and how Triton can run here.

Triton compiles for CUDA devices; with `TRITON_INTERPRET=1` set before triton is first imported, its
interpreter runs the same kernels on CPU tensors (slowly, exactly): that is how CI checks them.
"""

from __future__ import annotations

import os

import torch

try:  # triton is a Linux-only dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

# The interpreter is chosen when `@triton.jit` runs, i.e. when our kernel modules are imported.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return triton is not None and _INTERPRET_AT_IMPORT


def triton_available(device: torch.device | str | None = None) -> bool:
    """Can the Triton kernels run on tensors of `device` (default: CUDA if present, else CPU)?"""
    if triton is None:
        return False
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if _INTERPRET_AT_IMPORT:
        return kind == "cpu"
    return kind == "cuda" and torch.cuda.is_available()
