"""Several processes (torchrun / accelerate launch): who writes, and agreeing on one run directory.

fastsft is built for one GPU; under a launcher the same `fastsft run` becomes one of N ranks. The
Trainer (through accelerate) does the data sharding, the gradient all-reduce and the token count
across ranks (`num_items_in_batch`); this module adds what a run directory needs on top: rank 0
creates it and every rank uses the same one, only rank 0 writes files and prints; the torchrun
command line, on one host or several (`Hosts`), and the refusal of a resume whose checkpoint lacks a
rank's files; and the TrainingArguments of the recipe's `[distributed] strategy` (DDP, FSDP, DeepSpeed
ZeRO-3), which shard on CPU ranks (gloo) as on GPUs (`shard_on_cpu`, `local_parameters`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import FastSFTError, RecipeError, RunDirError
from .rundir import RunDir


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(timeout: float = 600) -> None:
    """Join the process group early (before the model loads), so ranks can agree on the run folder.
    accelerate's PartialState picks the backend (NCCL on GPUs, gloo on the CPU) from the launcher's
    environment; the Trainer's TrainingArguments later rebuild their state on the same group.

    `timeout` ([distributed] timeout, seconds) bounds every collective: a rank that waits longer for a
    stopped or stuck one fails (gloo raises; NCCL's watchdog, on by default, aborts the communicator),
    and the launcher then stops every rank and names them (`launch`)."""
    if world_size() <= 1:
        return
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    kwargs = {"timeout": timedelta(seconds=timeout)}
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        if (
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true"
        ):  # DeepSpeed's init takes no device_id
            kwargs["device_id"] = torch.device("cuda", local_rank())  # NCCL bound to this rank's GPU at once
    else:
        _load_cpu_rank_locations()
    PartialState(cpu=not torch.cuda.is_available(), **kwargs)


def _load_cpu_rank_locations() -> None:
    """Let torch.load restore onto "cpu:<rank>". Under several CPU ranks accelerate's device is
    "cpu:<rank>", and the Trainer resumes the optimizer with map_location=args.device, a location torch
    cannot restore by itself ("don't know how to restore data location ... cpu:1"). A deserializer
    registered through torch's public extension point maps it to the CPU; nothing else changes."""
    import torch

    global _CPU_RANKS_REGISTERED
    if not _CPU_RANKS_REGISTERED:
        torch.serialization.register_package(
            30, lambda obj: None, lambda obj, location: obj if location.startswith("cpu:") else None
        )
        _CPU_RANKS_REGISTERED = True


_CPU_RANKS_REGISTERED = False


def teardown() -> None:
    """Leave the process group at the end of a rank's run, so that its communication threads stop while
    the interpreter still runs. This alone did not stop the rare abort at exit ("terminate called without
    an active exception"); a finished rank also leaves through `leave`."""
    if world_size() <= 1:
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available()).destroy_process_group()


def leave() -> None:
    """End a rank of a distributed run whose work is done, without C++'s exit-time destructors. A CPU
    rank was seen to abort there ("terminate called without an active exception": 4 times in about 60
    sharded test runs on a busy 2-core machine; faulthandler showed no Python frame, i.e. after the
    interpreter had finished), and torchrun then stops the other ranks, rank 0 perhaps still writing
    the report. Python's own exit work runs first (atexit handlers, then the streams are flushed)."""
    if world_size() <= 1:
        return
    import atexit
    import sys

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def broadcast(obj):
    """`obj` from rank 0, on every rank."""
    if world_size() <= 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world_size() <= 1:
        return [obj]
    import torch.distributed as td

    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def together(fn):
    """`fn()` on every rank; a fastsft error met by any rank is raised on all of them, so that no rank
    is left waiting in a collective for one that stopped (on several hosts each sees its own files)."""
    try:
        out, err = fn(), None
    except FastSFTError as e:
        out, err = None, e
    if world_size() <= 1:
        if err is not None:
            raise err
        return out
    messages = [m for m in gather_object(str(err) if err is not None else None) if m]
    if err is not None:
        raise err
    if messages:
        raise RunDirError(messages[0])
    return out


def missing_rank_files(run_path: Path, checkpoint: Path, ranks: int):
    """The error for a checkpoint that lacks a rank's own part (None when every rank's is there). Each
    rank writes its RNG state (`rng_state_<rank>.pth`) into the checkpoint, where it stands on that
    rank's host: on hosts that do not share the run directory, rank 0's copy lacks the others'."""
    missing = (
        [r for r in range(ranks) if not (checkpoint / f"rng_state_{r}.pth").is_file()] if ranks > 1 else []
    )
    if not missing:
        return None
    return RunDirError(
        f"--resume {run_path}: {checkpoint} lacks the files of rank(s) {', '.join(map(str, missing))} "
        "(rng_state_<rank>.pth): each rank writes its part of a checkpoint into the run directory on its own "
        "host, so on several hosts the run directory must be a folder they all share (NFS, a cluster "
        f"filesystem). Copy those files from the other hosts' {checkpoint.name} into this one, then resume again."
    )


def check_resume_files(run_dir, ranks: int) -> None:
    """Before any rank starts: refuse a resume whose newest checkpoint lacks a rank's files."""
    run = RunDir.open(run_dir, lock=False)
    found = run.latest_checkpoint()
    err = missing_rank_files(run.path, found[1], ranks) if found else None
    if err is not None:
        raise err


@dataclass(frozen=True)
class Hosts:
    """torchrun's multi-node launch, as `fastsft run` takes it: `nnodes` hosts, this one `node_rank`,
    meeting at `master_addr:master_port` (static) or at the rendezvous endpoint `rdzv_endpoint`."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None

    def torchrun_args(self) -> list[str]:
        if self.nnodes <= 1:
            return ["--standalone"]
        if self.rdzv_endpoint:  # elastic rendezvous: every host names the same endpoint and id
            return [
                f"--nnodes={self.nnodes}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={self.rdzv_endpoint}",
                "--rdzv-id=fastsft",
            ]
        out = [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            f"--master-addr={self.master_addr}",
        ]
        return out + ([f"--master-port={self.master_port}"] if self.master_port else [])


def launch_command(nproc: int, argv: list[str], hosts: Hosts = Hosts()) -> list[str]:
    """The torchrun command line that runs `fastsft <argv>` as `nproc` ranks on this machine (of
    `hosts.nnodes` machines). The installed `fastsft` script is run (not `python -m`, which would put
    the current folder first on sys.path)."""
    import shutil
    import sys

    exe = shutil.which("fastsft") or str(Path(sys.executable).with_name("fastsft"))
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *hosts.torchrun_args(),
        f"--nproc_per_node={nproc}",
        "--no-python",
        exe,
        *argv,
    ]


# ----------------------------------------------------------------------------------------------
# The recipe's [distributed] strategy as TrainingArguments
# ----------------------------------------------------------------------------------------------


class RankLost(FastSFTError):
    """A rank of a distributed run stopped (died, or was killed by the launcher after another failed)."""

    exit_code = 1


def launch(nproc: int, argv: list[str], hosts: Hosts = Hosts(), *, run_dir=None) -> int:
    """Run `fastsft <argv>` as `nproc` ranks through torchrun, in this process (its elastic agent), and
    return 0 when every rank finished. Rank 0 prints to this console; the other ranks' output goes to
    files under a log folder, their stderr shown here too (only rank 0 prints in a run). A rank that
    stops ends every rank, and this raises RankLost: one paragraph naming the lost rank, its exit (code
    or signal), its log, and the command that resumes the run, instead of torch's ChildFailedError
    traceback and table."""
    import logging
    import shutil
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    cmd = launch_command(nproc, argv, hosts)
    logs = Path(tempfile.mkdtemp(prefix="fastsft-ranks-"))
    # Rank 0 prints to this console; ranks 1.. to files, their stderr also here (a warning, an abort).
    others = range(1, nproc)
    files = [
        f"--redirects={','.join(f'{r}:3' for r in others)}",
        f"--tee={','.join(f'{r}:2' for r in others)}",
    ]
    args = [f"--log-dir={logs}", *(files if nproc > 1 else []), *cmd[3:]]
    # torch's agent logs each failure and each rank it stops (and a traceback): told once, below.
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.CRITICAL)
    try:
        torchrun(parse_args(args))
    except ChildFailedError as e:
        raise RankLost(_lost_rank_paragraph(e.failures, logs, hosts, run_dir)) from None
    finally:
        elastic.setLevel(level)
    shutil.rmtree(logs, ignore_errors=True)  # every rank finished: their stderr was shown here
    return 0


# What a collective raises when another rank is gone (gloo) or did not come in time (gloo, NCCL).
LOST_CONTACT = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "Watchdog caught collective operation timeout",
)


def lost_contact(e: BaseException) -> RankLost | None:
    """For a rank whose collective failed because another rank stopped or is stuck: the short error it
    prints instead of the backend's traceback (the launcher then names the lost rank). None otherwise."""
    if world_size() <= 1 or not isinstance(e, RuntimeError):
        return None
    text = str(e)
    found = [m for m in LOST_CONTACT if m in text]
    if not found:
        return None
    return RankLost(
        f"rank {rank()}: lost contact with the other ranks in a collective ({found[0]}): another rank "
        "stopped, or did not come within [distributed] timeout; the launcher names it below."
    )


def _lost_rank_paragraph(failures: dict, logs: Path, hosts: Hosts, run_dir) -> str:
    """The paragraph for ranks that stopped: {global rank: torch's ProcessFailure}."""
    import signal

    # The ranks that the launcher stopped itself (SIGTERM) after the first failure are not the lost one.
    lost = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    parts = []
    for global_rank, f in sorted(lost.items()):
        if f.exitcode < 0:
            try:
                how = f"was killed by signal {signal.Signals(-f.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-f.exitcode}"
        else:
            how = f"exited with code {f.exitcode}"
        found = sorted(logs.glob(f"*/attempt_*/{f.local_rank}/stderr.log"))
        where = f"its log: {found[-1]}" if found and f.local_rank else "its output is above"
        parts.append(f"rank {global_rank} (pid {f.pid}) {how}; {where}")
    resume = f"fastsft run --resume {run_dir}" if run_dir else "fastsft run --resume RUN_DIR"
    return (
        f"a rank of the distributed run stopped, so every rank was stopped: {'; '.join(parts)}. A rank killed from "
        "outside (out of memory: see `dmesg`; a job scheduler) or stuck past [distributed] timeout ends "
        f"the run. Resume it from its last checkpoint with `{resume}` (logs of every rank: {logs})."
    )


def distributed_kwargs(recipe, *, dtype: str) -> dict:
    """TrainingArguments for `[distributed] strategy` when this process is one of several ranks."""
    if world_size() <= 1:
        return {}
    check_distributed(recipe)
    d, t = recipe.distributed, recipe.train
    timeout = {"ddp_timeout": int(d.timeout)}  # the group is made by setup; the Trainer's state agrees
    if d.strategy == "ddp":
        # LoRA leaves most parameters frozen; none of the trainable ones go unused
        return {"ddp_find_unused_parameters": False, **timeout}
    if d.strategy == "fsdp":
        return {
            **timeout,
            "fsdp": True,
            "fsdp_config": {
                "version": 2,
                # FSDP recomputes per wrapped layer; the Trainer's checkpointing would all-gather twice
                "activation_checkpointing": bool(t.gradient_checkpointing),
                "state_dict_type": "FULL_STATE_DICT",
            },
            "gradient_checkpointing": False,
        }
    if d.deepspeed_config:
        return {"deepspeed": str(recipe.resolve_path(d.deepspeed_config)), **timeout}
    return {"deepspeed": zero3_config(dtype), **timeout}


def sharded(recipe) -> bool:
    """Whether this rank holds only a shard of the weights (FSDP or ZeRO-3 over several ranks)."""
    return world_size() > 1 and recipe.distributed.strategy != "ddp"


SHARDED_ANSWERS = (
    "the answers after training are not generated in the run under {strategy}: each rank holds a shard "
    "of the weights; ask the saved weights: fastsft generate {run} -p PROMPT"
)


def check_distributed(recipe) -> None:
    """Refuse, before any rank starts, a strategy this machine cannot run."""

    where = str(recipe.path) if recipe.path else None
    strategy = recipe.distributed.strategy
    if strategy == "deepspeed-zero3":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RecipeError(
                '[distributed] strategy = "deepspeed-zero3" needs DeepSpeed: pip install deepspeed '
                '(or use strategy = "fsdp", which needs nothing more)',
                path=where,
            ) from None


def shard_on_cpu(trainer) -> None:
    """Make the Trainer's accelerator shard with FSDP2 when the ranks are CPU processes (gloo).

    accelerate keeps FSDP for GPUs: on the CPU its state stays MULTI_CPU and the Trainer's FSDP plugin
    is dropped without a word, so `prepare()` would wrap the model in plain DDP (same losses, every
    rank holding every parameter). Set its state to FSDP with the Trainer's own plugin before the first
    `prepare()`: the model then goes through accelerate's FSDP2 path (`fully_shard`), the same code as
    on GPUs. DeepSpeed needs nothing of the kind: it picks its CPU accelerator by itself."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if trainer.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    # both shared states, as AcceleratorState.__init__ sets them: a later PartialState() would put back
    # MULTI_CPU, and the save would then skip FSDP's full state dict
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True


def local_parameters(model) -> int:
    """The parameters this rank holds: its shard's elements under FSDP2 (DTensor) or ZeRO-3
    (`ds_numel` is the whole tensor, `ds_tensor` this rank's partition), every element otherwise."""
    n = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            n += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            n += p.to_local().numel()
        else:
            n += p.numel()
    return n


def zero3_config(dtype: str) -> dict:
    """fastsft's DeepSpeed ZeRO-3 config; "auto" values are filled in by transformers from the recipe."""
    return {
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
