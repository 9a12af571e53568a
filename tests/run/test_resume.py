"""fastsft.run.resume: which run a resume opens and what it refuses, on run folders made on the spot
(no model; the whole resume through `fastsft run --resume` is tests/run/test_reliability.py's)."""

import json

import pytest

from fastsft.errors import RunDirError
from fastsft.run import resume
from fastsft.run.trainer import TOTALS
from fastsft.rundir import RECIPE, RUN_JSON, RunDir


def make_run(tmp_path, run_json: dict, checkpoints: dict[int, dict | None] = ()) -> RunDir:
    """A run folder with `run_json` and a complete checkpoint per step ({step: its totals or None})."""
    run = RunDir.create(tmp_path / "run")
    run.write_text(RECIPE, "# stored recipe\n")
    run.write_json(RUN_JSON, run_json)
    for step, totals in dict(checkpoints).items():
        ckpt = run.checkpoints / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
        if totals is not None:
            (ckpt / TOTALS).write_text(json.dumps(totals))
    run.unlock()
    return run


def test_opens_the_newest_complete_checkpoint_with_its_totals(tmp_path):
    totals = {"loss_sum": 3.0, "tokens": 120, "train_seconds": 4.5}
    run = make_run(tmp_path, {"status": "interrupted", "started": "then"}, {2: None, 4: totals})
    (run.checkpoints / "checkpoint-6").mkdir()  # no trainer_state.json: a save cut short, never resumed from
    held, logged = [], []
    r = resume.open_resumed(run.path, main=True, held=held, log=logged.append)
    try:
        assert r.checkpoint == run.checkpoints / "checkpoint-4" and r.step == 4
        assert r.totals_before == totals and r.previous["started"] == "then"
        assert held == [r.run_dir] and (run.path / ".lock").exists()  # locked, and handed to the caller
        assert logged == [f"resuming {run.path} from checkpoint-4 (step 4)"]
    finally:
        r.run_dir.unlock()


@pytest.mark.parametrize(
    ("run_json", "steps", "says"),
    [
        ({"status": "finished", "result": {"global_step": 4}}, {4: None}, r"this run finished \(4 steps\)"),
        ({"status": "interrupted"}, {}, "no complete checkpoint to resume from"),
    ],
)
def test_refused_runs_are_still_handed_over_for_unlocking(tmp_path, run_json, steps, says):
    run = make_run(tmp_path, run_json, steps)
    held = []
    with pytest.raises(RunDirError, match=says):
        resume.open_resumed(run.path, main=True, held=held, log=lambda m: None)
    assert len(held) == 1 and (run.path / ".lock").exists()  # the caller's cleanup unlocks it
    held[0].unlock()
    assert not (run.path / ".lock").exists()


def test_a_finished_run_whose_checkpoint_is_behind_its_result_resumes(tmp_path):
    """A run recorded as finished at step 4 whose newest checkpoint is step 2 can still go on from it."""
    run = make_run(tmp_path, {"status": "finished", "result": {"global_step": 4}}, {2: None})
    r = resume.open_resumed(run.path, main=True, held=[], log=lambda m: None)
    r.run_dir.unlock()
    assert r.step == 2


def test_changed_data_is_refused_unless_allowed(tmp_path):
    run = make_run(tmp_path, {"status": "interrupted", "data": {"fingerprint": "aaa"}}, {2: None})
    r = resume.open_resumed(run.path, main=True, held=[], log=lambda m: None)
    r.run_dir.unlock()
    resume.refuse_changed_data(r, "aaa", allow=False)  # the same data
    resume.refuse_changed_data(r, "bbb", allow=True)  # --allow-data-change
    with pytest.raises(RunDirError, match="fingerprint aaa then, bbb now") as e:
        resume.refuse_changed_data(r, "bbb", allow=False)
    assert "--allow-data-change" in str(e.value)


def test_the_recipe_the_run_started_from_resumes_with_fits_changes(tmp_path):
    """A run whose fit = "auto" halved the batch and offloaded checkpoints stores those values; resuming
    with the user's own recipe file (which holds the values as written) continues with fit's, and a key
    the user really changed is still refused."""
    from fastsft import recipe as recipe_mod
    from fastsft.errors import RecipeError

    from _tiny import tiny_recipe, write_recipe

    train = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    written = write_recipe(tmp_path / "mine.toml", tiny_recipe(train=train))
    fitted = recipe_mod.load(written).with_absolute_paths()
    fitted = fitted.with_overrides(
        [
            "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=4",
            "train.offload_checkpoints=true",
        ]
    )
    run = make_run(tmp_path, {"status": "interrupted"})
    (run / RECIPE).write_text(fitted.to_toml())  # as the run stores it: fit's values as if written
    fit = {
        "changes": [
            {"key": "train.offload_checkpoints", "from": False, "to": True},
            {"key": "train.per_device_train_batch_size", "from": 4, "to": 2},
        ],
        "gradient_accumulation_steps": 4,
    }
    run.update_json(RUN_JSON, fit=fit)
    got = resume.resume_recipe(run.path, written, [])
    t = got.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.offload_checkpoints) == (
        2,
        4,
        True,
    )
    with pytest.raises(RecipeError, match="learning_rate"):
        resume.resume_recipe(run.path, written, ["train.learning_rate=1e-2"])
    other = write_recipe(
        tmp_path / "other.toml", tiny_recipe(train={**train, "per_device_train_batch_size": 8})
    )
    with pytest.raises(RecipeError, match="per_device_train_batch_size"):
        resume.resume_recipe(run.path, other, [])  # not the value fit changed: a different run
