"""The TrainerCallbacks a run adds to TRL's loop, each a class.

- `ProgressAndMetrics`: the progress line (step, loss, tokens/s, ETA, memory) and metrics.jsonl.
- `AtomicCheckpoints`: the Trainer writes each checkpoint into `args.output_dir`, which is
  `checkpoints/.staging`; `on_save` renames it into `checkpoints/` with the run's totals, then rotates
  older ones out, so a resumable checkpoint always exists.
- `LocalParameters`: run.json's `local_parameters` under several ranks.
- `StopAtSignal`, `NonFiniteCheck`: fastsft.run.guard's StopOnSignal and NonFiniteGuard in the loop.
- `HealthWatch`: fastsft.run.health's diagnosis after every log.
- `FollowFreeCores`: on the CPU, each step on the intra-op threads the cores other processes leave free.

This module imports transformers when it loads, so the run imports it only once the backend has started
(Unsloth must be imported before transformers), and `fastsft --help` does not pay for it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from fastsft import dist, threads
from fastsft.files import apply_umask, write_text
from fastsft.machine import peak_memory_gib
from fastsft.progress import StepTimer, bar
from fastsft.run import health
from fastsft.run.trainer import TOTALS, warmup_warning
from fastsft.rundir import RUN_JSON, RunDir


class ProgressAndMetrics(TrainerCallback):
    """Progress line (step, loss, tokens/s, ETA, memory) on `console` and metrics.jsonl rows in `run`, on
    the main process. `tokens_before`: the tokens of the run's earlier segments (a resume)."""

    def __init__(self, run: RunDir, console, *, tokens_before: int = 0):
        self.run, self.console = run, console
        self.t0 = None
        self.last_t = None
        self.last_tokens = tokens_before  # num_tokens counts the whole run, across resumes
        # the ETA from measured steps: the first logged interval (start-up) left out, then the
        # median of the recent steps' times (not elapsed / steps, which the start-up inflates)
        self.timer = StepTimer()
        self.eval_bar = None  # an evaluation's progress, from its first batch to on_evaluate

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.last_t = time.perf_counter()
        self.timer.start(state.global_step, self.t0)
        warning = warmup_warning(args, state.max_steps)
        if warning and state.is_world_process_zero:
            self.console.print(f"warning: {warning}", highlight=False, markup=False, soft_wrap=True)

    def on_prediction_step(self, args, state, control, **kw):
        """An evaluation's progress (the base model's at step 0 among them): fastsft.progress.bar."""
        if not state.is_world_process_zero:
            return
        if self.eval_bar is None:
            loader = kw.get("eval_dataloader")
            total = len(loader) if loader is not None and hasattr(loader, "__len__") else None
            step = state.global_step
            what = "base model: held-out loss (step 0)" if step == 0 else f"held-out loss at step {step}"
            self.eval_bar = bar(self.console, total, what + ", batches")
            self.eval_advance = self.eval_bar.__enter__()
        self.eval_advance(1)

    def on_evaluate(self, args, state, control, **kw):
        if self.eval_bar is not None:
            self.eval_bar.__exit__(None, None, None)
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if "loss" in logs:
            tokens = int(logs.get("num_tokens", 0))
            dt = max(now - self.last_t, 1e-9)
            row["tokens_per_s"] = (tokens - self.last_tokens) / dt if tokens else None
            self.last_t, self.last_tokens = now, tokens
            mem, kind = peak_memory_gib()
            mem_word = "rss" if "RSS" in kind else "mem"  # on the CPU: the process's peak RSS, said so
            row["peak_mem_gib"] = round(mem, 3)
            row["elapsed_s"] = round(now - self.t0, 2)
            done, total = state.global_step, state.max_steps
            self.timer.observe(done, now)
            eta = self.timer.eta(total)
            eta = float("nan") if eta is None else eta
            tps = row["tokens_per_s"]
            self.console.print(
                f"step {done:>5}/{total}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}  "
                f"{'-' if tps is None else f'{tps:,.0f}'} tok/s  ETA {_duration(eta)}  {mem_word} {mem:.2f} GiB",
                highlight=False,
            )
        elif "eval_loss" in logs:
            self.on_evaluate(args, state, control)  # the evaluation's progress ends before its result
            self.console.print(
                f"eval  step {state.global_step:>5}  eval_loss {logs['eval_loss']:.4f}", highlight=False
            )
        self.run.append_metrics(row)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class AtomicCheckpoints(TrainerCallback):
    """Atomic checkpoints (see the module docstring). `trainer` is the FastSFTTrainer whose totals go
    into each checkpoint; `root` is checkpoints/, the parent of the Trainer's `args.output_dir`."""

    def __init__(self, trainer, root: Path):
        self.trainer, self.root = trainer, root

    def on_save(self, args, state, control, **kw):
        trainer, root = self.trainer, self.root
        # every rank: the Trainer has written its part (rank 0 the weights, each rank its RNG state)
        staging, name = Path(args.output_dir), f"checkpoint-{state.global_step}"
        trainer.accelerator.wait_for_everyone()
        best = state.best_model_checkpoint
        moved_best = bool(best) and Path(best).parent == staging
        if moved_best:
            state.best_model_checkpoint = str(root / Path(best).name)
        totals = trainer.totals()  # a collective: every rank
        if args.should_save:
            if moved_best:
                state.save_to_json(str(staging / name / "trainer_state.json"))
            write_text(staging / name / TOTALS, json.dumps(totals) + "\n")
            apply_umask(staging / name)
            target = root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            shutil.rmtree(staging, ignore_errors=True)  # and what else the Trainer wrote there
            if args.save_total_limit:
                _rotate(trainer, root, args.save_total_limit)
        trainer.accelerator.wait_for_everyone()
        trainer.phase = "train"

    def on_train_end(self, args, state, control, **kw):
        if not args.should_save:
            return
        # The Trainer deletes every checkpoint but the best at the end when save_total_limit == 1,
        # looking in its output_dir (the staging folder): do it where the checkpoints are.
        best = state.best_model_checkpoint
        if args.save_total_limit == 1 and best and Path(best).is_dir():
            for d in self.root.glob("checkpoint-*"):
                if d.is_dir() and not os.path.samefile(d, best):
                    shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(args.output_dir, ignore_errors=True)  # made by the Trainer when it started


def _rotate(trainer, root: Path, limit: int) -> None:
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # older transformers: the Trainer's own method
        trainer._rotate_checkpoints(use_mtime=True, output_dir=str(root))
        return
    rotate_checkpoints(
        output_dir=str(root),
        save_total_limit=limit,
        best_model_checkpoint=trainer.state.best_model_checkpoint,
        use_mtime=True,
    )


class LocalParameters(TrainerCallback):
    """run.json's `local_parameters`: the parameters each rank holds once the model is wrapped (a list,
    one count per rank), so that a sharded run shows it sharded (about 1/N of them each) rather than
    only that it asked to."""

    def __init__(self, trainer, run: RunDir):
        self.trainer, self.run = trainer, run

    def on_train_begin(self, args, state, control, **kw):
        counts = dist.gather_object(dist.local_parameters(self.trainer.model))
        if args.should_save:
            self.run.update_json(RUN_JSON, local_parameters=counts)


class StopAtSignal(TrainerCallback):
    """At the end of the step in which `stop` (guard.StopOnSignal) saw a signal: save, then stop."""

    def __init__(self, stop):
        self.stop = stop

    def on_step_end(self, args, state, control, **kw):
        if self.stop.requested:
            control.should_save = True
            control.should_training_stop = True


class NonFiniteCheck(TrainerCallback):
    """`guard` (guard.NonFiniteGuard) checks each optimizer step before it is applied."""

    def __init__(self, guard):
        self.guard = guard

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self.guard.check(state.global_step + 1, model, optimizer)


class HealthWatch(TrainerCallback):
    """Diagnoses the history (fastsft.run.health) after every log and prints each new kind of finding
    once (on the main process) through `log`. Its `findings` hold the latest finding of each kind."""

    def __init__(self, log):
        self.log = log
        self.rows: list[dict] = []
        self.warned: set[str] = set()
        self.findings: list[health.Finding] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        row = health.log_row(state.global_step, logs)
        if row is None:
            return
        self.rows.append(row)
        # the recent train logs and every evaluation: a check per log stays cheap on long runs
        train = [r for r in self.rows if "eval_loss" not in r][-health.LIVE_TRAIN_LOGS :]
        evals = [r for r in self.rows if "eval_loss" in r]
        recent = sorted(train + evals, key=lambda r: r["step"])
        self.findings = health.diagnose(recent)
        for f in self.findings:
            if f.kind not in self.warned:
                self.warned.add(f.kind)
                self.log(f"warning: training health: {f.line()}")


class FollowFreeCores(TrainerCallback):
    """Each training step and evaluation batch on the intra-op threads the cores other processes leave
    free (fastsft.threads.Follower); the count the run began with at the end."""

    def __init__(self):
        self.threads = torch.get_num_threads()
        self.follow = threads.Follower(self.threads)

    def on_step_begin(self, args, state, control, **kw):
        self.follow()

    def on_prediction_step(self, args, state, control, **kw):
        self.follow()

    def on_train_end(self, args, state, control, **kw):
        torch.set_num_threads(self.threads)


__all__ = [
    "ProgressAndMetrics",
    "AtomicCheckpoints",
    "LocalParameters",
    "StopAtSignal",
    "NonFiniteCheck",
    "HealthWatch",
    "FollowFreeCores",
]
