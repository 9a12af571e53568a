"""Resuming a run (`fastsft run --resume RUN_DIR`): what it continues with and where it continues from.

- `resume_recipe`: the recipe stored in the run, with the overrides a resume may change (the others refused);
  the recipe file the run started from is accepted too, with the changes `fit = "auto"` made applied again.
- `open_resumed`: the run directory, locked, and its newest complete checkpoint; a finished run, a run
  with no checkpoint, or a checkpoint that lacks a rank's files is refused.
- `refuse_changed_data`: data that changed since the run started is refused unless allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastsft import dist
from fastsft import recipe as recipe_mod
from fastsft.errors import RecipeError, RunDirError
from fastsft.run.trainer import read_totals
from fastsft.rundir import RECIPE, RUN_JSON, RunDir


def resume_recipe(run_dir: str | Path, recipe_path: str | Path | None, overrides: list[str]):
    """The recipe a resumed run continues with: the one stored in RUN_DIR, with the overrides that do
    not change what is trained. A given RECIPE (or an override) that changes the training is refused
    with the differing keys named."""
    run = RunDir.open(run_dir)
    stored = recipe_mod.load(run / RECIPE)
    wanted = recipe_mod.load(recipe_path).with_absolute_paths() if recipe_path else stored
    if recipe_path:  # the recipe as the user wrote it: fit's changes (stored in the run) apply again
        wanted = _as_fit_left_it(wanted, stored, _run_json(run).get("fit") or {})
    if overrides:
        wanted = wanted.with_overrides(list(overrides))
    changed = [k for k in stored.differences(wanted) if k not in recipe_mod.RESUME_SAFE_KEYS]
    if changed:
        raise RecipeError(
            f"--resume {run.path}: the run was trained with a different "
            f"{', '.join(changed)} (stored in {run / RECIPE}). Resuming would change the training; start a "
            "new run instead, or resume without changing those keys. Keys a resume may change: "
            + ", ".join(sorted(recipe_mod.RESUME_SAFE_KEYS)),
            path=str(recipe_path or run / RECIPE),
        )
    return wanted


def _run_json(run: RunDir) -> dict:
    try:
        return run.read_json(RUN_JSON)
    except (OSError, ValueError):
        return {}


def _as_fit_left_it(wanted, stored, fit: dict):
    """`wanted` (the recipe the user gives to resume with) with the changes `fit = "auto"` made when the run
    started (run.json's `fit`), where it still holds the value fit changed: the stored recipe holds fit's
    values, the user's file its own, and both mean the same run. The accumulation fit set is taken when the
    effective batch (batch x accumulation) the user wrote is the stored one."""
    sets = []
    for change in fit.get("changes") or []:
        section, _, key = change["key"].partition(".")
        if getattr(getattr(wanted, section, None), key, object()) == change.get("from"):
            sets.append(f"{change['key']}={json.dumps(change['to'])}")
    if "gradient_accumulation_steps" in fit:
        w, s = wanted.train, stored.train
        if w.per_device_train_batch_size * w.gradient_accumulation_steps == (
            s.per_device_train_batch_size * s.gradient_accumulation_steps
        ):
            sets.append(f"train.gradient_accumulation_steps={s.gradient_accumulation_steps}")
    return wanted.with_overrides(sets) if sets else wanted


@dataclass
class Resumed:
    """A run opened to resume: training continues from `checkpoint`."""

    run_dir: RunDir
    previous: dict  # run.json as the earlier segment left it
    checkpoint: Path  # checkpoints/checkpoint-N, the newest complete one
    totals_before: dict  # the run's totals (loss sum, tokens, seconds) up to the checkpoint

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint)


def checkpoint_step(checkpoint: Path) -> int:
    """checkpoints/checkpoint-N -> N."""
    return int(checkpoint.name.rsplit("-", 1)[1])


def open_resumed(output_dir: str | Path, *, main: bool, held: list, log) -> Resumed:
    """The run in `output_dir`, locked on rank 0 (`main`), and the checkpoint to continue from. The locked
    run directory is appended to `held` at once, so that the caller unlocks it whatever happens next.
    Refused (on every rank: on several hosts each reads its own disk): a finished run, a run without a
    complete checkpoint, a checkpoint that lacks a rank's files."""
    return dist.together(lambda: _open_here(output_dir, main=main, held=held, log=log))


def _open_here(output_dir, *, main: bool, held: list, log) -> Resumed:
    run_dir = RunDir.open(output_dir, lock=main)
    if main:
        held.append(run_dir)
    previous = run_dir.read_json(RUN_JSON)
    found = run_dir.latest_checkpoint()
    steps = (previous.get("result") or {}).get("global_step")
    if previous.get("status") == "finished" and (found is None or steps is None or found[0] >= steps):
        raise RunDirError(
            f"--resume {run_dir.path}: this run finished ({steps} steps); nothing was changed. To train "
            "further, start a new run with more steps; to use it: fastsft export / generate / eval "
            f"{run_dir.path}"
        )
    if found is None:
        raise RunDirError(
            f"--resume {run_dir.path}: no complete checkpoint to resume from (the run stopped before "
            f"its first save). Start it again: fastsft run RECIPE -o {run_dir.path} --overwrite"
        )
    step, checkpoint = found
    missing = dist.missing_rank_files(run_dir.path, checkpoint, dist.world_size())
    if missing is not None:
        raise missing
    resumed = Resumed(run_dir, previous, checkpoint, read_totals(checkpoint))
    log(f"resuming {run_dir.path} from {checkpoint.name} (step {step})")
    return resumed


def refuse_changed_data(resumed: Resumed, fingerprint: str, *, allow: bool) -> None:
    """Data whose fingerprint differs from the one the run started with is refused, unless `allow`
    (--allow-data-change)."""
    was = (resumed.previous.get("data") or {}).get("fingerprint")
    if was and was != fingerprint and not allow:
        raise RunDirError(
            f"--resume {resumed.run_dir.path}: the training data changed since the run started (fingerprint "
            f"{was} then, {fingerprint} now: the data file, tokenizer or [data] settings differ); "
            "nothing was changed. Put the original data back, start a new run, or pass "
            "--allow-data-change to continue on the new data."
        )


__all__ = ["resume_recipe", "open_resumed", "refuse_changed_data", "Resumed", "checkpoint_step"]
