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
# The largest --gpu-memory taken: 4 TiB, ten times past any one GPU (the largest hold under 300 GiB), so a
# typo is refused rather than planned (a 400-digit number overflowed, 1e26 bytes searched for lengths
# whose tensors overflow torch's size arithmetic).
MAX_GPU_MEMORY = 4096 * GiB
MAX_LENGTH = 2**24  # the longest sequence plan searches (data.max_length's bound)


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
    size = value * (MiB if unit.startswith("m") else GiB)
    if not size >= MiB:
        raise ValueError(f"{text!r} is less than 1 MiB; give the GPU's memory, e.g. 24GiB")
    if size > MAX_GPU_MEMORY:
        raise ValueError(
            f"{_short(text)!r} is more than {MAX_GPU_MEMORY // GiB:,} GiB, far past any one GPU (the largest hold "
            "under 300 GiB); give the memory of the GPU to plan for, e.g. 80GiB"
        )
    return int(size)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------------------------
# The caching allocator's reserved memory (what nvidia-smi and torch.cuda.max_memory_reserved show)
# ----------------------------------------------------------------------------------------------

SMALL_SIZE = 1 * MiB  # kSmallSize: requests up to this come from the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: a small pool's segment
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: below this a large request gets a kLargeBuffer segment


class _Block:
    __slots__ = ("seg", "size", "free", "prev", "next", "small")

    def __init__(self, seg, size, small, prev=None, next=None):
        self.seg, self.size, self.small, self.free, self.prev, self.next = seg, size, small, False, prev, next


class CachingAllocator:
    """PyTorch's CUDA caching allocator, the parts that decide reserved memory (one stream, default
    settings: no max_split_size, no expandable segments; c10/cuda/CUDACachingAllocator.cpp): requests
    rounded (`allocator_rounding`), small (<= 1 MiB) and large pools, best fit among cached free blocks
    of the pool, a block split when what is left is >= 512 B (small) or > 1 MiB (large), a new segment
    otherwise (2 MiB small; 20 MiB for large requests under 10 MiB; the request rounded to 2 MiB above),
    freed blocks cached and merged with free neighbours of their segment, never returned to the device
    (no OOM pressure: `reserved_peak` is torch.cuda.max_memory_reserved on a GPU with room to spare)."""

    def __init__(self, expandable: bool = False):
        self.free_blocks = {True: [], False: []}  # small? -> free blocks
        self.reserved = 0
        self.reserved_peak = 0
        # expandable_segments:True (PYTORCH_CUDA_ALLOC_CONF; Unsloth sets it): the large pool is one
        # segment of virtual memory mapped in 2 MiB pages; a request no cached block fits extends the
        # segment's free tail block (mapping only the missing pages) or appends pages at its end
        self.expandable = expandable
        self.tail: _Block | None = None  # the large pool's last block, when expandable

    def malloc(self, nbytes: int) -> _Block:
        size = -(-max(nbytes, 1) // MIN_BLOCK) * MIN_BLOCK
        small = size <= SMALL_SIZE
        pool = self.free_blocks[small]
        fit = min((b for b in pool if b.size >= size), key=lambda b: b.size, default=None)
        if fit is None and self.expandable and not small:
            fit = self._extend(size)
        elif fit is None:
            seg = (
                SMALL_BUFFER
                if small
                else (LARGE_BUFFER if size < MIN_LARGE_ALLOC else -(-size // ROUND_LARGE) * ROUND_LARGE)
            )
            self.reserved += seg
            self.reserved_peak = max(self.reserved_peak, self.reserved)
            fit = _Block(object(), seg, small)
        else:
            pool.remove(fit)
        rest = fit.size - size
        if (small and rest >= MIN_BLOCK) or (not small and rest > SMALL_SIZE):
            tail = _Block(fit.seg, rest, small, prev=fit, next=fit.next)
            if fit.next is not None:
                fit.next.prev = tail
            fit.next, fit.size = tail, size
            tail.free = True
            pool.append(tail)
            if self.tail is fit:
                self.tail = tail
        fit.free = False
        return fit

    def _extend(self, size: int) -> _Block:
        tail = self.tail
        if tail is not None and tail.free:
            self.free_blocks[False].remove(tail)
            grow = -(-(size - tail.size) // ROUND_LARGE) * ROUND_LARGE
            tail.size += grow
            fit = tail
        else:
            grow = -(-size // ROUND_LARGE) * ROUND_LARGE
            fit = _Block(self, grow, False, prev=tail)
            if tail is not None:
                tail.next = fit
        self.reserved += grow
        self.reserved_peak = max(self.reserved_peak, self.reserved)
        self.tail = fit
        return fit

    def release(self, b: _Block) -> None:
        pool = self.free_blocks[b.small]
        for nb in (b.prev, b.next):
            if nb is not None and nb.free:
                pool.remove(nb)
                b.size += nb.size
                if nb is b.prev:
                    b.prev = nb.prev
                    if nb.prev is not None:
                        nb.prev.next = b
                else:
                    b.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = b
                if self.tail is nb:
                    self.tail = b
        b.free = True
        pool.append(b)
