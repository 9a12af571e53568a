"""What keeps a long run safe: signals, non-finite steps, out-of-memory, disk space, the memory estimate.

- `StopOnSignal`: the first SIGINT/SIGTERM finishes the current optimizer step, writes a checkpoint
  and stops (callbacks.StopAtSignal); a second one exits at once. `sigterm_interrupts`: SIGTERM outside
  the loop stops as Ctrl-C does.
- `NonFiniteGuard`: a NaN/inf loss or gradient norm is never applied to the weights (checked by
  callbacks.NonFiniteCheck); after `train.max_nonfinite_steps` such steps the run stops and says why.
- `explain_oom`, `is_oom`, `check_disk`: out-of-memory advice and the free-space check, from
  `fastsft.limits` (an export uses them too), named here among the run's guards.
- `estimate_memory`: the peak GPU memory a recipe will need, printed before training.
- `explain_stop`: each way the training loop can stop (non-finite steps, out of memory, a failed write,
  a second Ctrl-C) as the fastsft error to raise and what run.json records; `interrupted_message` and
  `every_step_nonfinite` for the stops seen after the loop.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from fastsft.errors import FastSFTError, Interrupted, TrainingStopped
from fastsft.files import WriteFailed, describe_os_error, is_write_error
from fastsft.limits import OOM_KNOBS, GiB, check_disk, explain_oom, is_oom

# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------


class StopOnSignal:
    """Context manager: installs SIGINT/SIGTERM handlers; `requested` is set by the first signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log=print):
        self.log = log
        self.requested: str | None = None
        self._old = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            self.log(f"\n{name} again: stopping now, without a checkpoint")
            raise KeyboardInterrupt
        self.requested = name
        self.log(
            f"\n{name}: finishing this step, then writing a checkpoint (press Ctrl-C again to quit at once)"
        )

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM outside the training loop (setup, the answers after, exports) stops the run as Ctrl-C does
    (Interrupted, exit 143), so its cleanup (the lock file) happens; inside the loop StopOnSignal's
    checkpointing stop applies."""
    import threading

    def _interrupt(signum, frame):
        raise Interrupted("SIGTERM before or after training: nothing to resume from", signal_name="SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.getsignal(signal.SIGTERM)
    if old is not signal.SIG_DFL:  # a caller's own handler stays
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------------------------
# Non-finite loss or gradient
# ----------------------------------------------------------------------------------------------


class NonFinite(TrainingStopped):
    pass


NONFINITE_CAUSES = (
    "the usual causes: a learning rate too high for this model (try 10x lower, or more warm-up), "
    'fp16 overflow (use bf16 where the GPU has it: model.dtype = "bf16"), or a bad data row '
    "(fastsft data preview shows what the trainer sees)"
)


class NonFiniteGuard:
    """Tracks non-finite losses on the device (no sync per micro-batch) and checks them, with the
    gradient norm, once per optimizer step. A bad step's gradients are dropped before the optimizer
    runs, so the weights never see a NaN."""

    def __init__(self, max_bad_steps: int, *, check_grads: bool = True, log=print):
        self.max_bad_steps = max_bad_steps
        self.check_grads = check_grads  # off under fp16, whose scaler skips inf steps itself
        self.log = log
        self.bad_steps = 0
        self._flag = None
        self.last_bad = None

    def observe_loss(self, loss) -> None:
        import torch

        bad = ~torch.isfinite(loss.detach()).all()
        self._flag = bad if self._flag is None else (self._flag | bad)

    def check(self, step: int, model, optimizer) -> None:
        import torch

        what = None
        if self._flag is not None and bool(self._flag):
            what = "loss"
        elif self.check_grads and model is not None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                if not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
                    what = "gradient"
        self._flag = None
        if what is None:
            return
        self.bad_steps += 1
        self.last_bad = (step, what)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient
        if model is not None:
            for p in model.parameters():
                p.grad = None
        if self.bad_steps > self.max_bad_steps:
            raise NonFinite(
                f"step {step}: the {what} is NaN or infinite "
                f"({self.bad_steps} non-finite step(s), train.max_nonfinite_steps = {self.max_bad_steps}). "
                f"The step was not applied; {NONFINITE_CAUSES}."
            )
        self.log(
            f"warning: step {step}: non-finite {what}; step skipped ({self.bad_steps}/{self.max_bad_steps})"
        )


def checkpoint_bytes(model) -> int:
    """One checkpoint: the trainable weights, their gradients' optimizer state (AdamW: 2 x fp32)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(n * (4 + 8) * 1.1) + 16 * 2**20


# ----------------------------------------------------------------------------------------------
# Memory estimate
# ----------------------------------------------------------------------------------------------


def estimate_memory(model, recipe, loss_kernel: str) -> dict:
    """Bytes per part of the peak GPU memory of a training step (an estimate, about +-20%)."""
    cfg = getattr(model, "config", None)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    hidden = int(getattr(text_cfg, "hidden_size", 0) or 0)
    layers = int(getattr(text_cfg, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(text_cfg, "vocab_size", 0) or 0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = trainable * (4 + 4 + 8)  # fp32 weight, gradient, AdamW's two moments
    t, d = recipe.train, recipe.data
    tokens = t.per_device_train_batch_size * d.max_length
    act_bytes = 2  # bf16 / fp16 activations
    per_layer = tokens * hidden * 34 * act_bytes  # Korthikanti et al., without the attention matrix (SDPA)
    if t.gradient_checkpointing:
        activations = layers * tokens * hidden * act_bytes + per_layer
    else:
        activations = layers * per_layer
    if loss_kernel == "fastsft-linear":
        import torch

        from fastsft.kernels.cross_entropy import resolve_backend
        from fastsft.kernels.memory_plan import loss_memory

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_trains = bool(getattr(getattr(head, "weight", None), "requires_grad", False))
        # the kernel's own count: its chunk or tiles (from the default budget, on the path the model's
        # device takes: Triton on a GPU, the PyTorch twin elsewhere) and the gradients it holds
        backend = resolve_backend("auto", next(model.parameters()).device)
        loss = loss_memory(tokens, hidden, vocab, torch.bfloat16, backend=backend, weight_grad=head_trains)
    elif loss_kernel == "fastsft":
        loss = tokens * vocab * act_bytes  # the logits, the gradient written over them
    else:
        loss = tokens * vocab * (act_bytes + 4 + 4)  # logits, float32 upcast, float32 gradient
    parts = {"weights": weights, "lora_and_optimizer": lora, "activations": activations, "loss": loss}
    parts["total"] = int(sum(parts.values()) * 1.1 + 0.5 * GiB)  # allocator slack, CUDA context
    return parts


def gpu_memory() -> int | None:
    """The total memory of the GPU this process trains on, or None on the CPU."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def describe_estimate(parts: dict, device_total: int | None) -> tuple[str, bool]:
    """(one line, whether it clearly will not fit)."""
    fmt = ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in parts.items() if k != "total")
    line = f"memory estimate: {parts['total'] / GiB:.2f} GiB ({fmt} GiB)"
    if device_total:
        line += f"; the GPU has {device_total / GiB:.1f} GiB"
        return line, parts["total"] > device_total
    return line + " (for a GPU; this run is on the CPU)", False


def warn_wont_fit(parts: dict, device_total: int) -> str:
    knobs = "; ".join(OOM_KNOBS)
    return (
        f"warning: this recipe needs about {parts['total'] / GiB:.1f} GiB and the GPU has "
        f"{device_total / GiB:.1f} GiB; it will likely run out of memory. Knobs, in order: {knobs}"
    )


# ----------------------------------------------------------------------------------------------
# How a run stopped
# ----------------------------------------------------------------------------------------------


def interrupted_message(run_dir: Path, step: int, checkpoint: Path | None) -> str:
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (stopped before the first)"
    cmd = f"fastsft run --resume {run_dir}"
    return f"interrupted at step {step}; kept {where}. Resume with:\n  {cmd}"


def every_step_nonfinite(steps_run: int, last: tuple[int, str] | None) -> str:
    """The message of a run whose every step (`steps_run`) was non-finite (`last`: NonFiniteGuard.last_bad)."""
    return (
        f"every step of the run ({steps_run}) had a NaN or infinite {last[1] if last else 'loss'}; "
        f"no step was applied and nothing was learned. {NONFINITE_CAUSES}."
    )


@dataclass
class Stopped:
    """How the training loop stopped: run.json's `status` and `error`, and the fastsft error raised in the
    exception's place (None: the exception itself goes on). `best_effort`: recording it may fail (the
    disk that stopped the run is full), and the error is raised all the same."""

    status: str
    message: str
    error: FastSFTError | None
    best_effort: bool = False


def explain_stop(e: BaseException, run_dir, phase: str, staging: Path) -> Stopped | None:
    """The stop for an exception out of the training loop (None: re-raise it as it is, unrecorded).
    `run_dir` is the run's RunDir, `phase` the trainer's (named in the message), `staging` the
    checkpoint folder the Trainer writes into."""
    if isinstance(e, NonFinite):
        kept = run_dir.latest_checkpoint()
        msg = f"{e} Last good checkpoint: {kept[1] if kept else 'none'}."
        return Stopped("stopped: non-finite", msg, NonFinite(msg))
    if is_oom(e):
        err = explain_oom(e, phase)
        return Stopped("stopped: out of memory", str(err), err)
    if is_write_error(e):
        return write_failed(e, run_dir, phase, staging)
    if isinstance(e, KeyboardInterrupt):
        return Stopped("killed", "interrupted twice; no checkpoint written", None)
    return None


def write_failed(e: BaseException, run_dir, phase: str, staging: Path) -> Stopped:
    """A write that failed during training (a full disk): the half-written checkpoint in `staging` is
    removed, and the message says how to go on."""
    shutil.rmtree(staging, ignore_errors=True)  # frees the space it took
    if isinstance(e, WriteFailed):
        what = str(e)
    elif isinstance(e, OSError):
        what = describe_os_error(e, getattr(e, "filename", None) or run_dir.path)
    else:
        what = f"cannot write in {run_dir.path}: {str(e).strip().splitlines()[0]}"
    kept = run_dir.latest_checkpoint()
    msg = f"{what} (during {phase}). The run stopped; " + (
        f"its last complete checkpoint is {kept[1]}. Free some space, then resume: fastsft run --resume {run_dir.path}"
        if kept
        else "it had no complete checkpoint yet. Free some space, then start it again with --overwrite."
    )
    return Stopped("stopped: write failed", msg, WriteFailed(msg), best_effort=True)


__all__ = [
    "StopOnSignal",
    "sigterm_interrupts",
    "NonFiniteGuard",
    "NonFinite",
    "explain_oom",
    "is_oom",
    "check_disk",
    "checkpoint_bytes",
    "estimate_memory",
    "describe_estimate",
    "interrupted_message",
    "every_step_nonfinite",
    "Stopped",
    "explain_stop",
    "write_failed",
]
