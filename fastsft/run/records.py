"""What run.json records, built from what the run holds: plain functions of their inputs, no I/O.

- `run_info`: run.json as a run (or a resumed segment) starts.
- `summary`: run.json's `result` at the end, the report's figures.
- `early_stopping`: the summary's `early_stopping` entry.
- `fit`: run.json's `fit` once the plan has met the first optimizer steps.
- `stop`: the `status` and `error` of a run that stopped.

The run (fastsft.run.train) writes them through its RunDir; what the machine and the process are
(versions, device, the command) comes in as `facts`, read once by `process_facts`.
"""

from __future__ import annotations

import sys
import time

from fastsft import machine, threads


def now() -> str:
    """A record's time stamp: local time with its UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def process_facts() -> dict:
    """The process and machine a run (segment) starts on: when, the command, versions, device, threads."""
    return {
        "started": now(),
        "command": " ".join(sys.argv),
        "versions": machine.versions(),
        "device": machine.device_description(),
        "cpu_threads": threads.facts(),  # OpenMP's wait policy and who chose it (fastsft.threads)
    }


def run_info(
    recipe,
    loaded,
    prepared,
    *,
    loss: dict,
    estimate: dict,
    planned: dict | None,
    facts: dict,
    world_size: int,
    previous: dict | None = None,
    resumed_from: str | None = None,
    resumed_at: str | None = None,
) -> dict:
    """run.json as the run starts. `loss` is the loss route's description, `estimate` the formula's memory
    estimate in bytes, `planned` [train] fit's plan (None: none). A resumed segment (`previous`: run.json as
    the earlier segment left it; `resumed_from`: the checkpoint's name, at `resumed_at`) keeps what the
    earlier segments recorded."""
    info = {
        "status": "running",
        "started": facts["started"],
        "command": facts["command"],
        "recipe_path": str(recipe.path) if recipe.path else None,
        "versions": facts["versions"],
        "device": facts["device"],
        "cpu_threads": facts["cpu_threads"],
        "seed": recipe.train.seed,
        "backend": loaded.backend,
        "backend_reason": loaded.reason,
        "model_path": loaded.model_path,
        "dtype": loaded.dtype,
        "loss": loss,
        "memory_estimate_gib": {k: round(v / 2**30, 3) for k, v in estimate.items()},
        **({"fit": planned} if planned else {}),  # [train] fit: changes, planned peak
        "data": {"fingerprint": prepared.fingerprint, **prepared.stats},
    }
    if world_size > 1:
        info["world_size"] = world_size
        info["distributed"] = {"strategy": recipe.distributed.strategy, "world_size": world_size}
    if previous is not None:
        info["started"] = previous.get("started", info["started"])
        info["resumed"] = previous.get("resumed", []) + [{"at": resumed_at, "from": resumed_from}]
        if "before" in previous:
            info["before"] = previous["before"]
        if "retain_before" in previous:
            info["retain_before"] = previous["retain_before"]
        if previous.get("data", {}).get("fingerprint") != prepared.fingerprint:
            info["data_changed_at"] = resumed_from
    return info


def summary(
    recipe,
    loaded,
    *,
    name: str,
    loss: dict,
    device: str,
    global_step: int,
    totals: dict,
    training_loss: float,
    peak: tuple[float, str],
    samples: dict,
    data_summary: str,
    watch: dict,
) -> dict:
    """run.json's `result` and the report's figures (`name`: the run directory's). Loss, tokens and time
    cover every segment (`totals`: the run's loss sum, tokens and train seconds); `training_loss` is TRL's
    figure for this segment, used when no optimizer step was counted; `peak` is
    machine.peak_memory_gib() after the answers; `samples` the answers before and after, `watch` the
    retain loss, health findings and early stopping."""
    train_seconds = totals["train_seconds"]
    mem, mem_kind = peak
    return {
        "name": name,
        "model": recipe.model.name,
        "backend": loaded.backend,
        "backend_reason": loaded.reason,
        "dtype": loaded.dtype,
        "load_in_4bit": recipe.model.load_in_4bit,
        "method": recipe.train.method,
        "trainable_parameters": loaded.info.get("trainable_parameters"),
        "loss": loss,
        "device": device,
        "global_step": global_step,
        "train_seconds": train_seconds,
        # the mean optimizer-step loss over the whole run (every segment of a resumed run)
        "train_loss": totals["loss_sum"] / global_step if global_step else training_loss,
        "tokens": totals["tokens"],
        "tokens_per_s": totals["tokens"] / train_seconds if train_seconds > 0 else None,
        "peak_mem_gib": mem,
        "mem_kind": mem_kind,
        **samples,
        "data": {"summary": data_summary},
        **watch,
    }


def early_stopping(patience: int, state) -> dict:
    """Whether early stopping ended the run (`state`: the Trainer's TrainerState at the end)."""
    return {
        "patience": patience,
        "stopped_early": state.global_step < state.max_steps,
        "max_steps": state.max_steps,
        "best_checkpoint": state.best_model_checkpoint,
        "best_metric": state.best_metric,
    }


def fit(planned: dict, real: dict) -> dict:
    """run.json's `fit`: the plan (`planned`) beside the first optimizer steps' real peak (`real`)."""
    return {**planned, **real}


def stop(status: str, error: str) -> dict:
    """The fields a stopped run's run.json is updated with."""
    return {"status": status, "error": error}


__all__ = ["now", "process_facts", "run_info", "summary", "early_stopping", "fit", "stop"]
