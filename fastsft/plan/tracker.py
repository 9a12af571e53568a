"""Live device bytes of a training step, counted op by op: a `TorchDispatchMode` that sees every tensor
an aten (or custom) op makes and follows its storage until the last reference goes.

The same counting runs over real tensors (the proof test: CPU tensors) and over `meta` tensors (the
plan: shapes, no data), so a simulated peak is the peak the real step would show under the same
counting. Each storage is charged once, with the label (`tracker.part(...)`) active when it was made;
at the peak the live bytes are kept per label: the parts of the peak.

Custom ops are opaque to the mode (their inner ops run below it): one whose kernel holds scratch memory
beyond its outputs declares it in `WORKSPACE` (op name -> bytes from its arguments), counted on top of
the live bytes and the op's outputs while the op runs, and asked of the caching allocator (when one is
given) as one request freed when the op returns, so that it can grow the reserved segments as it does
on the GPU (FA2's backward: its float32 dq accumulator and, with grouped-query attention, K and V's
gradients expanded to every query head; ~2.4 GiB for Llama-3.1-8B at 78K tokens).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# op name (str(OpOverload), e.g. "fastsft.linear_cross_entropy.default") -> fn(args, kwargs) -> bytes of
# scratch the op's kernel holds while it runs, beyond its outputs
WORKSPACE: dict[str, Callable] = {}


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of every storage on `device` ("meta", "cpu", ...) made while active.

    `round_to`: each storage is charged rounded up to this many bytes (the CUDA caching allocator's
    block size, see `plan.device`); `rounding` is an optional fn(nbytes) -> charged bytes."""

    def __init__(self, device: str = "meta", rounding: Callable[[int], int] | None = None, allocator=None):
        super().__init__()
        self.allocator = allocator  # a plan.device.CachingAllocator: reserved memory too
        self.device = device
        self.rounding = rounding or (lambda n: n)
        self.live = 0
        self.peak = 0
        self.by_part: dict[str, int] = {}
        self.peak_parts: dict[str, int] = {}
        self.peak_at = ""
        self._label = "other"
        self.phase = "forward"
        self._seen: dict[int, tuple[int, str]] = {}  # storage -> (bytes, part)
        self._blocks: dict[int, object] = {}  # storage -> the allocator's block

    # -- labels ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def part(self, label: str):
        """Storages made inside are charged to `label`."""
        old, self._label = self._label, label
        try:
            yield
        finally:
            self._label = old

    def adopt(self, tensors, label: str) -> None:
        """Charge tensors made before tracking began (the weights) to `label`."""
        for t in tensors:
            self._charge(t, label)

    def relabel(self, t: torch.Tensor, label: str) -> None:
        """Charge an already counted tensor's storage to `label` from now on."""
        if not isinstance(t, torch.Tensor) or t.device.type != self.device:
            return
        key = t.untyped_storage()._cdata
        if key in self._seen:
            n, old = self._seen[key]
            self._seen[key] = (n, label)
            self.by_part[old] -= n
            self.by_part[label] = self.by_part.get(label, 0) + n

    # -- counting -------------------------------------------------------------------------------
    def _charge(self, t: torch.Tensor, label: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._seen:
            return
        n = self.rounding(st.nbytes())
        self._seen[key] = (n, label)
        if self.allocator is not None:
            self._blocks[key] = self.allocator.malloc(st.nbytes())
        self.live += n
        self.by_part[label] = self.by_part.get(label, 0) + n
        weakref.finalize(st, self._free, key)
        self._mark()

    def _free(self, key) -> None:
        n, label = self._seen.pop(key, (0, None))
        block = self._blocks.pop(key, None)
        if block is not None:
            self.allocator.release(block)
        if label is not None:
            self.live -= n
            self.by_part[label] -= n

    def _mark(self, extra: int = 0, extra_label: str = "", where: str = "") -> None:
        if self.live + extra > self.peak:
            self.peak = self.live + extra
            self.peak_parts = {k: v for k, v in self.by_part.items() if v}
            if extra:
                self.peak_parts[extra_label] = self.peak_parts.get(extra_label, 0) + extra
            self.peak_at = where or self._label

    def reset_peak(self) -> None:
        self.peak = self.live
        self.peak_parts = {k: v for k, v in self.by_part.items() if v}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        ws = WORKSPACE.get(name)
        scratch = int(ws(args, kwargs)) if ws is not None else 0
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:  # a kernel's outputs are allocated before it runs: beside its scratch
            self._charge(t, self._label)
        if scratch:
            self._mark(scratch, f"{self._label} (kernel scratch)", name)
            if self.allocator is not None:  # the scratch is a real request: it can grow the reserved segments
                self.allocator.release(self.allocator.malloc(scratch))
        return out


__all__ = ["MemoryTracker", "WORKSPACE"]
