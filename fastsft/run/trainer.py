"""The trainer: TRL's SFTTrainer with the loss routed through fastsft.

- `FastSFTTrainer.compute_loss`: one forward through the loss route serves the loss and the metrics;
  it counts the tokens trained on, the run's loss sum and the held-out loss as a token-weighted mean.
- `read_totals`: the run's totals a checkpoint holds (`TOTALS`, written by callbacks.AtomicCheckpoints
  into each checkpoint, carried across resumes).
- `warmup_warning`: a warm-up that never ends within the run (callbacks.ProgressAndMetrics prints it).

The callbacks a run adds to the loop are fastsft.run.callbacks.

Trainer internals still relied on, each pinned by tests/run/test_trainer.py for the tested versions:
`_load_from_checkpoint` (dtypes after a resume), `model_accepts_loss_kwargs` (who divides by the
token count), `evaluation_loop`'s positional `metric_key_prefix`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastsft import dist

STAGING = ".staging"  # under checkpoints/: the Trainer's output_dir, where a checkpoint is written
TOTALS = "fastsft_totals.json"  # in each checkpoint: the run's totals up to it, carried across resumes


class FastSFTTrainerMixin:
    """fastsft's part of FastSFTTrainer (`make_trainer_class` puts it over TRL's SFTTrainer).

    One forward serves loss and metrics: `compute_loss` is replaced, so TRL's fused lm-head
    (TRL 1.15's has no CPU path) and its second no-grad forward for metrics never run."""

    def __init__(self, *args, loss_route, nonfinite_guard=None, **kwargs):
        self.loss_route = loss_route
        self.nonfinite_guard = nonfinite_guard
        self.phase = "train"  # named in an out-of-memory message
        super().__init__(*args, **kwargs)
        # Our loss divides by num_items_in_batch itself; make the Trainer always count it and
        # never divide again by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.tokens_seen = 0
        self._tokens_local = None
        self._trained_local = None  # trained tokens of this segment, on this rank
        self._trained_logged = (0, 0)  # (global step, trained tokens) at the last train log
        # Totals of the whole run, across resumes: the earlier segments' (from the checkpoint's
        # TOTALS file) plus this one's. loss_sum is the sum of the optimizer steps' losses.
        self.totals_before = {"loss_sum": 0.0, "tokens": 0, "train_seconds": 0.0}
        self._loss_sum = None
        self.segment_start = None  # time.perf_counter() when this segment's training began
        # Held-out loss as the token-weighted mean over every scored token (not a mean of batch means)
        self._eval_nll = None
        self._eval_tokens = None
        # our progress line replaces the Trainer's raw log dicts and tqdm bars
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        dist.shard_on_cpu(self)  # FSDP on CPU ranks: accelerate would run plain DDP

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.loss_route(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        if model.training and self.nonfinite_guard is not None:
            self.nonfinite_guard.observe_loss(loss)
        if model.training:
            import torch

            d = loss.detach().float()
            d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # a skipped step adds nothing
            self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
        if model.training and "labels" in inputs:
            from fastsft.loss.route import IGNORE_INDEX, shift_left

            # trained tokens (labels that carry loss): the health check scales its spike test to them
            t = (shift_left(inputs["labels"]) != IGNORE_INDEX).sum()
            if self._trained_local is None:  # this segment's first step: count from where it resumed
                self._trained_logged = (self.state.global_step, 0)
            self._trained_local = t if self._trained_local is None else self._trained_local + t
        if model.training and ("attention_mask" in inputs or "input_ids" in inputs):
            # counted on the device; read (one sync, one all-reduce) only when a row is logged.
            # A packed (padding-free) batch has no attention mask and no padding: every id counts.
            mask = inputs.get("attention_mask")
            n = (
                mask.sum()
                if mask is not None
                else inputs["input_ids"].new_tensor(inputs["input_ids"].numel())
            )
            self._tokens_local = n if self._tokens_local is None else self._tokens_local + n
        if not model.training and "labels" in inputs:
            from fastsft.loss.route import IGNORE_INDEX, shift_left

            # the route's loss is the mean over this batch's scored tokens: weight it by their count
            n = (shift_left(inputs["labels"]) != IGNORE_INDEX).sum()
            nll = loss.detach().float() * n
            self._eval_nll = nll if self._eval_nll is None else self._eval_nll + nll
            self._eval_tokens = n if self._eval_tokens is None else self._eval_tokens + n
        return (loss, outputs) if return_outputs else loss

    def segment_tokens(self) -> int:
        """Tokens trained on in this segment, over every rank (a collective: all ranks call it)."""
        if self._tokens_local is None:
            return 0
        return int(self.accelerator.reduce(self._tokens_local.detach().clone(), "sum"))

    def totals(self) -> dict:
        """The whole run's totals up to now (a collective: all ranks call it)."""
        import torch

        loss = self._loss_sum if self._loss_sum is not None else torch.zeros((), device=self.args.device)
        loss = float(self.accelerator.reduce(loss.detach().clone(), "mean"))
        seconds = time.perf_counter() - self.segment_start if self.segment_start is not None else 0.0
        b = self.totals_before
        return {
            "step": self.state.global_step,
            "loss_sum": b["loss_sum"] + loss,
            "tokens": b["tokens"] + self.segment_tokens(),
            "train_seconds": b["train_seconds"] + seconds,
        }

    def log(self, logs, *args, **kwargs):
        if self.model.training and self._tokens_local is not None:
            # the whole run's count (TRL's own num_tokens is counted in the compute_loss we replace)
            self.tokens_seen = self.totals_before["tokens"] + self.segment_tokens()
            logs["num_tokens"] = self.tokens_seen
        if self.model.training and self._trained_local is not None and "loss" in logs:
            trained = int(self.accelerator.reduce(self._trained_local.detach().clone(), "sum"))
            step, before = self._trained_logged
            if self.state.global_step > step and trained >= before:
                logs["trained_tokens_per_step"] = (trained - before) / (self.state.global_step - step)
            self._trained_logged = (self.state.global_step, trained)
        return super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        self._eval_nll = self._eval_tokens = None
        out = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        if self._eval_tokens is not None and f"{prefix}_loss" in out.metrics:
            nll = float(self.accelerator.reduce(self._eval_nll.detach().clone(), "sum"))
            n = int(self.accelerator.reduce(self._eval_tokens.detach().clone(), "sum"))
            if n:
                out.metrics[f"{prefix}_loss"] = nll / n
        self._eval_nll = self._eval_tokens = None
        return out

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # A private Trainer method (no public hook runs between the adapter load and the optimizer's
        # creation); tests/run/test_trainer.py pins its signature for the tested transformers range.
        # PEFT's load_adapter upcasts bf16 adapters to float32, while SFTTrainer keeps QLoRA
        # adapters in bf16: put back the dtypes the run trained with, or a resumed run diverges.
        target = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for n, p in target.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])

    # Set by the run: fn(compute) -> (metrics, reused), the base model's held-out metrics from the
    # before-numbers' cache (fastsft.run.before); None: always computed
    base_eval = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        self.phase = "eval"
        try:
            if (
                self.base_eval is None
                or self.state.global_step != 0
                or eval_dataset is not None
                or metric_key_prefix != "eval"  # the cached metrics carry eval_ names
            ):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            # step 0 (eval_on_start): the base model's held-out loss, the same on every run of this base,
            # data and settings; a reused one is logged and handed to the callbacks as the Trainer would
            metrics, reused = self.base_eval(
                lambda: super(FastSFTTrainerMixin, self).evaluate(None, ignore_keys, metric_key_prefix)
            )
            if reused:
                self.log(dict(metrics))
                self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics
        finally:
            self.phase = "train"

    def save_model(self, *args, **kwargs):
        self.phase = "save"  # the checkpoint callback's on_save (or the end of the run) sets it back
        return super().save_model(*args, **kwargs)


def make_trainer_class():
    """FastSFTTrainer: the mixin over TRL's SFTTrainer (imported here, lazily: trl must come after
    unsloth, which `backends.load_model` imports first)."""
    from trl import SFTTrainer

    return type("FastSFTTrainer", (FastSFTTrainerMixin, SFTTrainer), {})


def read_totals(checkpoint: Path) -> dict:
    """The run's totals up to `checkpoint` (written by AtomicCheckpoints.on_save)."""
    try:
        t = json.loads((checkpoint / TOTALS).read_text(encoding="utf-8"))
        return {
            "loss_sum": float(t["loss_sum"]),
            "tokens": int(t["tokens"]),
            "train_seconds": float(t["train_seconds"]),
        }
    except (OSError, ValueError, KeyError, TypeError):  # a checkpoint of an older fastsft
        return {"loss_sum": 0.0, "tokens": 0, "train_seconds": 0.0}


def warmup_warning(args, steps: int) -> str | None:
    """What is wrong when the warm-up is not shorter than the run's `steps` optimizer steps (known once
    the data is read, with num_train_epochs): the learning rate never reaches its peak. None otherwise.
    (With max_steps set, the recipe refuses this before anything loads.)"""
    warmup = args.get_warmup_steps(steps)
    if steps <= 0 or warmup < steps:
        return None
    key = f"warmup_steps = {warmup}" if args.warmup_steps >= 1 else f"warmup_ratio = {args.warmup_steps:g}"
    return (
        f"[train] {key} is not shorter than this run's {steps} optimizer step(s): the learning rate stays below "
        f"learning_rate = {args.learning_rate:g} (at most {args.learning_rate * steps / warmup:.2g}) for the "
        f"whole run. Set warmup_steps below {steps}, or a warmup_ratio under 1 (e.g. 0.05)"
    )
