"""Several processes (torchrun / accelerate launch): who writes, and agreeing on one run directory.

fastsft is built for one GPU; under a launcher the same `fastsft run` becomes one of N ranks. The
Trainer (through accelerate) does the data sharding, the gradient all-reduce and the token count
across ranks (`num_items_in_batch`); this module adds what a run directory needs on top: rank 0
creates it and every rank uses the same one, only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from pathlib import Path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup() -> None:
    """Join the process group early (before the model loads), so ranks can agree on the run folder."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")


def teardown() -> None:
    """Leave the process group at the end of a rank's run. A group left alive until the interpreter exits
    tears its communication threads down in no set order; a rank can then abort ("terminate called
    without an active exception", seen once under CI) after its work is done."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj):
    """`obj` from rank 0, on every rank."""
    if world_size() <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs `fastsft <argv>` as `nproc` ranks on this machine. The
    installed `fastsft` script is run (not `python -m`, which would put the current folder first on
    sys.path)."""
    import shutil
    import sys

    exe = shutil.which("fastsft") or str(Path(sys.executable).with_name("fastsft"))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--no-python", exe, *argv]  # fmt: skip
