"""fastsft.run.guard's stop explanations: each way the training loop can stop, as the fastsft error
raised and what run.json records, on a run folder made on the spot (the stops of a real run are
tests/run/test_reliability.py's)."""

import errno

import pytest

from fastsft.errors import OutOfMemory
from fastsft.files import WriteFailed
from fastsft.run import guard
from fastsft.rundir import RunDir


@pytest.fixture
def run(tmp_path):
    run = RunDir.create(tmp_path / "run")
    yield run
    run.unlock()


def checkpoint(run: RunDir, step: int):
    ckpt = run.checkpoints / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def test_non_finite_names_the_last_good_checkpoint(run):
    kept = checkpoint(run, 3)
    stopped = guard.explain_stop(guard.NonFinite("step 5: the loss is NaN."), run, "train", run.checkpoints)
    assert stopped.status == "stopped: non-finite" and not stopped.best_effort
    assert stopped.message == f"step 5: the loss is NaN. Last good checkpoint: {kept}."
    assert isinstance(stopped.error, guard.NonFinite) and str(stopped.error) == stopped.message


def test_out_of_memory_names_the_phase(run):
    stopped = guard.explain_stop(
        RuntimeError("CUDA out of memory. Tried"), run, "evaluation", run.checkpoints
    )
    assert stopped.status == "stopped: out of memory" and isinstance(stopped.error, OutOfMemory)
    assert "out of memory during evaluation" in stopped.message and stopped.message == str(stopped.error)


@pytest.mark.parametrize("kept", [True, False])
def test_a_full_disk_removes_the_half_written_checkpoint_and_says_how_to_go_on(run, kept):
    if kept:
        checkpoint(run, 2)
    staging = run.checkpoints / ".staging"
    (staging / "checkpoint-4").mkdir(parents=True)
    full = OSError(
        errno.ENOSPC, "No space left on device", str(staging / "checkpoint-4" / "model.safetensors")
    )
    stopped = guard.explain_stop(full, run, "train", staging)
    assert not staging.exists()  # the space it took is freed
    assert stopped.status == "stopped: write failed" and stopped.best_effort  # run.json may not be writable
    assert isinstance(stopped.error, WriteFailed) and str(stopped.error) == stopped.message
    assert "(during train). The run stopped; " in stopped.message
    if kept:
        assert f"fastsft run --resume {run.path}" in stopped.message
    else:
        assert "start it again with --overwrite" in stopped.message


def test_a_second_ctrl_c_is_recorded_and_goes_on_as_it_is(run):
    stopped = guard.explain_stop(KeyboardInterrupt(), run, "train", run.checkpoints)
    assert (stopped.status, stopped.error) == ("killed", None)


def test_our_own_bugs_are_not_explained(run):
    assert guard.explain_stop(ValueError("a bug"), run, "train", run.checkpoints) is None


def test_every_step_non_finite():
    msg = guard.every_step_nonfinite(3, (3, "gradient"))
    assert msg.startswith("every step of the run (3) had a NaN or infinite gradient; no step was applied")
    assert "infinite loss;" in guard.every_step_nonfinite(2, None)
