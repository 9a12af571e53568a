"""fastsft's Triton kernels (installed as `fastsft.kernels`).

- `fused_cross_entropy(logits, labels, ...)`: cross-entropy with label smoothing (and optional z-loss
  and softcap), loss and gradient in one pass over the logits.
- `fused_linear_cross_entropy(hidden, weight, labels, ...)`: the same from the last hidden states and
  the lm_head, in token chunks, without ever holding the full logits.

Both take `backend="triton" | "torch" | "auto"`; `reference.py` holds the float64 definition they are
tested against. `launch_counts` counts Triton launches (tests use it to prove the kernels ran).
"""

from ._triton import interpreting, triton_available
from .cross_entropy import fused_cross_entropy, launch_counts, reset_launch_counts
from .linear_cross_entropy import chunk_rows, fused_linear_cross_entropy
from .reference import cross_entropy_reference, linear_cross_entropy_reference

__all__ = [
    "fused_cross_entropy",
    "fused_linear_cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy_reference",
    "launch_counts",
    "reset_launch_counts",
    "triton_available",
    "interpreting",
    "chunk_rows",
]
