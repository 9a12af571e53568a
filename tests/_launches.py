"""Counts launches of fastsft's Triton kernels, for tests that must prove a kernel ran.

Importing this module wraps the kernel object that `fastsft.kernels.cross_entropy` launches
(`_ce_kernel[grid](...)` looks the global up at each call), so production code carries no test hook:
    from _launches import launch_counts, reset_launch_counts
"""

from collections import Counter

from fastsft.kernels import cross_entropy as _ce

launch_counts: Counter = Counter()


def reset_launch_counts() -> None:
    launch_counts.clear()


class _Counted:
    """The Triton JIT function, counting each `kernel[grid]` (one launch per call of the result)."""

    def __init__(self, kernel, name: str):
        self.kernel, self.name = kernel, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            launch_counts[self.name] += 1
            return launch(*args, **kwargs)

        return counted

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


if hasattr(_ce, "_ce_kernel") and not isinstance(_ce._ce_kernel, _Counted):  # no triton: nothing launches
    _ce._ce_kernel = _Counted(_ce._ce_kernel, "cross_entropy")
