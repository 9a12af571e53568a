"""What a CUDA device adds to the bytes a step's tensors hold: the only two constants of the plan.

- Allocator rounding: PyTorch's CUDA caching allocator hands out blocks in multiples of 512 bytes
  (c10/cuda/CUDACachingAllocator.cpp, `kMinBlockSize = 512`, `round_size`), and a request above
  `kLargeBuffer` (20 MiB) gets a segment of its own rounded up to `kRoundLarge` (2 MiB). A tensor costs
  its rounded block; `torch.cuda.max_memory_allocated` counts the same blocks.
- CUDA context: what the driver, the CUDA runtime and PyTorch's kernels hold before the first tensor
  (outside the allocator, so outside `max_memory_allocated`, inside the GPU's memory). With CUDA 12's
  lazy module loading (`CUDA_MODULE_LOADING=LAZY`, the default since PyTorch 1.13 on CUDA >= 11.7) it is
  ~0.5 GiB on A100 / H100 class GPUs (PyTorch's "CUDA semantics" notes; nvidia-smi after `torch.cuda.init()`
  and a matmul), plus cuBLAS's workspace (CUBLAS_WORKSPACE_CONFIG's default ":4096:8", 8 x 4 MiB).
"""

from __future__ import annotations

import re

MiB = 2**20
GiB = 2**30
MIN_BLOCK = 512  # kMinBlockSize
LARGE_BUFFER = 20 * MiB  # kLargeBuffer
ROUND_LARGE = 2 * MiB  # kRoundLarge
CUDA_CONTEXT = 512 * MiB + 8 * 4 * MiB  # context + cuBLAS workspace (see the module docstring)


def allocator_rounding(nbytes: int) -> int:
    """The bytes the CUDA caching allocator reserves for a request of `nbytes`."""
    if nbytes == 0:
        return 0
    size = -(-nbytes // MIN_BLOCK) * MIN_BLOCK
    if size > LARGE_BUFFER:
        size = -(-size // ROUND_LARGE) * ROUND_LARGE
    return size


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '80 GiB', '24' (GiB) -> bytes. A GPU sold as "24 GB" has 24 GiB (an RTX 4090:
    24,564 MiB; an A100 80GB: 81,920 MiB), so GB is read as GiB, as nvidia-smi and the GPU tables mean it."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GiB, 80GB, 16)")
    value, unit = float(m.group(1)), m.group(2) or "gib"
    return int(value * (MiB if unit.startswith("m") else GiB))
