"""Running out of the machine: out-of-memory advice and the free-space check, shared by a run
(`fastsft.run.guard`) and an export (`fastsft.export.transaction`), below both.

- `is_oom` / `explain_oom`: CUDA out-of-memory turned into the knobs worth turning, in order.
- `check_disk`: free space before checkpoints and exports.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fastsft.errors import FastSFTError, OutOfMemory, RunDirError
from fastsft.machine import peak_memory_gib

GiB = 2**30


# ----------------------------------------------------------------------------------------------
# Out of memory
# ----------------------------------------------------------------------------------------------

OOM_KNOBS = (
    "train.per_device_train_batch_size (halve it and double gradient_accumulation_steps: same batch)",
    "data.max_length (shorter sequences; see `fastsft data preview` for the lengths)",
    "train.gradient_checkpointing = true",
    'loss.kernel = "fastsft-linear" (no full logits)',
    "data.packing = true (no padding waste)",
)


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def explain_oom(exc: BaseException, phase: str) -> FastSFTError:
    peak, kind = peak_memory_gib()
    knobs = "\n".join(f"  {i}. {k}" for i, k in enumerate(OOM_KNOBS, 1))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OutOfMemory(
        f"out of memory during {phase} (peak {peak:.2f} GiB, {kind}): {first}\n"
        f"Lower the memory with these recipe keys, in the order worth trying:\n{knobs}"
    )


# ----------------------------------------------------------------------------------------------
# Disk space
# ----------------------------------------------------------------------------------------------


def check_disk(path: Path, needed_bytes: int, what: str, *, flag: str = "--output-dir", error=None) -> None:
    """Refuse (`error`, RunDirError by default) when `path`'s file system has less than `needed_bytes` free."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.statvfs(probe).f_flag & os.ST_RDONLY:  # its free space reads 0: not a full disk
        raise (error or RunDirError)(
            f"{path} is on a read-only file system: nothing can be written there. Choose another {flag}."
        )
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise (error or RunDirError)(
            f"{what} needs about {needed_bytes / GiB:.2f} GiB in {path}, but only {free / GiB:.2f} GiB is free. "
            f"Free some space or choose another {flag}."
        )


__all__ = ["GiB", "OOM_KNOBS", "check_disk", "explain_oom", "is_oom"]
