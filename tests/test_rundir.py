"""The run directory: replaced only when it is a run, locked while in use, no torn metrics line,
never written through a symlink."""

import json
import os

import pytest

from fastsft.errors import RunDirError
from fastsft.rundir import RunDir

from _tiny import TINY_RECIPE


def fake_run(path, *, steps_logged=True, checkpoint=False):
    """A folder as `fastsft run` leaves it (without weights)."""
    path.mkdir(parents=True)
    (path / "recipe.toml").write_text(TINY_RECIPE)
    (path / "run.json").write_text(json.dumps({"status": "finished"}))
    if steps_logged:
        (path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    if checkpoint:
        (path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        (path / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    return path


def test_a_torn_last_metrics_line_is_dropped(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    run.truncate_metrics(2)  # what a resume does: the file is whole again
    assert (tmp_path / "metrics.jsonl").read_text().endswith('"loss": 1.5}\n')
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(RunDirError, match="line 2"):
        run.read_metrics()


def test_non_finite_metrics_are_written_as_null(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    run.write_json("run.json", {"result": {"train_loss": float("nan")}})

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    assert strict((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1,
        "loss": None,
        "grad_norm": None,
        "lr": 1e-3,
    }
    assert strict((tmp_path / "run.json").read_text()) == {"result": {"train_loss": None}}


def test_only_a_fastsft_run_is_ever_replaced(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('my code')")
    with pytest.raises(RunDirError, match="not a fastsft run"):
        RunDir.check_target(project, overwrite=True)
    with pytest.raises(RunDirError, match="not a fastsft run"):
        RunDir.create(project, overwrite=True)
    assert (project / "main.py").read_text() == "print('my code')"

    link = tmp_path / "link"
    link.symlink_to(fake_run(tmp_path / "real"))
    with pytest.raises(RunDirError, match="symbolic link"):
        RunDir.create(link, overwrite=True)
    assert (tmp_path / "real" / "recipe.toml").exists()

    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        RunDir.check_target(tmp_path / "file", overwrite=True)

    run = fake_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="--overwrite"):
        RunDir.check_target(run)
    assert RunDir.check_target(run, overwrite=True) == "replace"
    assert RunDir.check_target(tmp_path / "new") == "new"


def test_the_old_run_is_moved_aside_then_dropped_or_restored(tmp_path):
    old = fake_run(tmp_path / "run")
    new = RunDir.create(old, overwrite=True)
    assert list(new.path.iterdir()) == [new.path / ".lock"]  # a fresh folder
    aside = new.replaced
    assert (aside / "run" / "recipe.toml").exists() and aside.name.startswith(".run.old-")
    new.restore_replaced()  # the new run failed before it started
    assert (old / "recipe.toml").exists() and not aside.exists()

    new = RunDir.create(old, overwrite=True)
    new.write_text("recipe.toml", "new")
    new.drop_replaced()  # the new run started
    new.unlock()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (old / "recipe.toml").read_text() == "new"


def test_a_run_that_stopped_before_its_first_step_is_replaceable(tmp_path):
    leftover = fake_run(tmp_path / "left", steps_logged=False)
    assert RunDir.check_target(leftover) == "leftover"  # no --overwrite needed: nothing to lose
    older = tmp_path / "older"  # an older fastsft's leftover: recipe.toml only
    older.mkdir()
    (older / "recipe.toml").write_text(TINY_RECIPE)
    assert RunDir.check_target(older) == "leftover"
    kept = fake_run(tmp_path / "kept", steps_logged=False, checkpoint=True)
    with pytest.raises(RunDirError, match="--overwrite"):
        RunDir.check_target(kept)


def test_a_run_directory_in_use_is_refused_with_the_pid(tmp_path):
    run = RunDir.open(fake_run(tmp_path / "run"), lock=True)
    try:
        with pytest.raises(RunDirError, match=f"in use by another fastsft process \\(PID {os.getpid()}\\)"):
            RunDir.open(run.path, lock=True)
        with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
            RunDir.check_target(run.path, overwrite=True)
    finally:
        run.unlock()
    RunDir.open(run.path, lock=True).unlock()  # free again


def test_a_symlink_in_a_run_directory_is_refused_before_anything_is_written(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"precious")
    run = fake_run(tmp_path / "run")
    (run / "loss.png").symlink_to(outside)
    with pytest.raises(RunDirError, match="loss.png is a symbolic link"):
        RunDir.open(run, lock=True)
    (run / "loss.png").unlink()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "checkpoint-9").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(RunDirError, match="checkpoint-9 is a symbolic link"):
        RunDir.open(run, lock=True)
    assert outside.read_bytes() == b"precious"
