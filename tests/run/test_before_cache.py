"""The base model's before-numbers (its answers to the sample prompts, task metric on the held-out split,
retain loss) are paid once: a second run of the same recipe reuses them (no generation call, run.json
says "reused", the same numbers), and a changed held-out row or generation setting recomputes what it
changes. Also the lock file: a run that ends (finished, failed, interrupted) leaves none."""

import io
import json
import os
import signal

import pytest
from rich.console import Console

from fastsft import recipe as R
from fastsft.chat import generation
from fastsft.errors import Interrupted
from fastsft.run import answers, guard, task, train

from _tiny import DEMO, tiny_recipe, write_recipe


def recipe_text(held) -> str:
    """The tiny recipe, one step, with a held-out file (the before-numbers score it) evaluated at step 0
    (eval_on_start: the base model's held-out loss) and after the step."""
    return tiny_recipe(data={"eval": held}, train={"max_steps": 1, "eval_strategy": "steps", "eval_steps": 1})


@pytest.fixture()
def counted(monkeypatch):
    """How many times the base model generates (answer: the sample prompts; answer_batch: the task metric)
    and the trainer evaluates (evaluate: transformers' own, which a reused step-0 evaluation skips)."""
    from transformers import Trainer

    calls = {"answer": 0, "answer_batch": 0, "evaluate": 0}
    real_evaluate = Trainer.evaluate

    def evaluate(*a, **kw):
        calls["evaluate"] += 1
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    for name in ("answer", "answer_batch"):
        real = getattr(generation, name)

        def wrapper(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(generation, name, wrapper)
        for module in (answers, task):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, wrapper)
    return calls


def step0_eval(run_dir) -> dict:
    """The step-0 evaluation's metrics in a run's metrics.jsonl (times left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = next(r for r in rows if r.get("step") == 0 and "eval_loss" in r)
    return {k: v for k, v in row.items() if "runtime" not in k and "per_second" not in k}


def one_run(tmp_path, name, held, counted):
    before = dict(counted)
    recipe = R.load(write_recipe(tmp_path / f"{name}.toml", recipe_text(held)))
    train.run(recipe, output_dir=tmp_path / name, console=Console(file=io.StringIO()))
    info = json.loads((tmp_path / name / "run.json").read_text())
    return info, {k: counted[k] - before[k] for k in counted}


@pytest.mark.slow
def test_a_second_run_reuses_the_base_models_numbers_and_a_change_recomputes(tmp_path, monkeypatch, counted):
    monkeypatch.setenv("FASTSFT_CACHE", str(tmp_path / "cache"))
    rows = DEMO.read_text(encoding="utf-8").splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(rows[:6]) + "\n", encoding="utf-8")

    first, calls = one_run(tmp_path, "first", held, counted)
    assert first["before_cache"] == {
        "answers": "computed",
        "eval": "computed",
        "retain": "computed",
        "task": "computed",
    }
    assert calls["answer"] == 3 + 3 and calls["answer_batch"] == 2  # before and after training
    evaluations = calls["evaluate"]

    second, calls = one_run(tmp_path, "second", held, counted)
    assert second["before_cache"] == {
        "answers": "reused",
        "eval": "reused",
        "retain": "reused",
        "task": "reused",
    }
    assert calls["answer"] == 3 and calls["answer_batch"] == 1  # after training only
    assert calls["evaluate"] == evaluations - 1  # the step-0 evaluation came from the cache
    for key in ("before", "task_before", "retain_before"):
        assert second[key] == first[key], key
    step0 = [step0_eval(tmp_path / name) for name in ("first", "second")]
    assert step0[0]["eval_loss"] > 0 and step0[1] == step0[0]  # logged as if computed: the report reads it

    # one held-out row changed: the answers and the task metric on it are computed again, the retain
    # set (fastsft's general set, unchanged) is not
    changed = [json.loads(r) for r in rows[:6]]
    changed[0]["messages"][-1]["content"] = "Something else entirely."
    held.write_text("\n".join(json.dumps(r) for r in changed) + "\n", encoding="utf-8")
    third, _ = one_run(tmp_path, "third", held, counted)
    assert third["before_cache"] == {
        "answers": "reused",
        "eval": "computed",
        "retain": "reused",
        "task": "computed",
    }

    # a generation setting changed (the task metric's answer budget): the task metric is recomputed
    monkeypatch.setattr(task, "SLACK_TOKENS", task.SLACK_TOKENS + 3)
    fourth, _ = one_run(tmp_path, "fourth", held, counted)
    assert fourth["before_cache"]["task"] == "computed"
    for name in ("first", "second", "third", "fourth"):
        assert not (tmp_path / name / ".lock").exists()  # a finished run leaves no lock


@pytest.mark.slow
def test_a_failed_or_interrupted_run_leaves_no_lock_file(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from _tiny import TINY_RECIPE

    monkeypatch.setenv("FASTSFT_CACHE", str(tmp_path / "cache"))
    recipe = R.load(write_recipe(tmp_path / "r.toml", TINY_RECIPE))

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            raise RuntimeError("a bug in a callback")

    class Term(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would

    with pytest.raises(RuntimeError, match="a bug"):
        train.run(
            recipe, output_dir=tmp_path / "failed", console=Console(file=io.StringIO()), callbacks=[Fail()]
        )
    assert (tmp_path / "failed" / "run.json").exists() and not (tmp_path / "failed" / ".lock").exists()
    with pytest.raises(Interrupted):
        train.run(
            recipe, output_dir=tmp_path / "term", console=Console(file=io.StringIO()), callbacks=[Term()]
        )
    assert (tmp_path / "term" / "run.json").exists() and not (tmp_path / "term" / ".lock").exists()


def test_sigterm_during_setup_stops_the_run_so_its_cleanup_happens():
    """Outside the training loop (setup: the base model's answers, the retain loss) SIGTERM raises
    Interrupted (exit 143) instead of ending the process at once, so `run`'s finally removes the lock."""
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(Interrupted) as stopped, guard.sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
