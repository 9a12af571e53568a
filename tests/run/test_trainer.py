"""fastsft.run.trainer against the installed transformers/TRL: the Trainer internals it still relies on are
there, as the tested versions have them. Each assertion names the internal and the tested range, so an
upgrade that moves one fails here, by name, before a run misbehaves."""

import inspect

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from fastsft import machine

TESTED, _ = machine.tested_bounds()


def _where(pkg: str) -> str:
    return f"{pkg} {machine.version(pkg)} (fastsft is tested with {pkg}{TESTED.get(pkg, '?')})"


def test_the_installed_versions_are_the_tested_ones():
    for pkg in ("transformers", "trl"):
        assert Version(machine.version(pkg)) in SpecifierSet(TESTED[pkg]), _where(pkg)


def test_load_from_checkpoint_is_the_hook_that_loads_a_resumed_adapter():
    """FastSFTTrainer._load_from_checkpoint puts back the adapter dtypes PEFT's load_adapter changes; no
    public hook runs between that load and the optimizer's creation."""
    from transformers import Trainer

    sig = inspect.signature(Trainer._load_from_checkpoint)
    assert list(sig.parameters)[:3] == ["self", "resume_from_checkpoint", "model"], _where("transformers")
    calls = inspect.getsource(Trainer.train) + inspect.getsource(Trainer._inner_training_loop)
    assert "self._load_from_checkpoint(resume_from_checkpoint" in calls, _where("transformers")


def test_model_accepts_loss_kwargs_still_decides_who_divides_by_the_token_count():
    """FastSFTTrainer sets model_accepts_loss_kwargs = True: our loss divides by num_items_in_batch,
    and the Trainer must then not divide again by the accumulation steps."""
    from transformers import Trainer

    step = inspect.getsource(Trainer.training_step)
    assert "self.model_accepts_loss_kwargs" in step and "num_items_in_batch" in step, _where("transformers")
    params = inspect.signature(Trainer.compute_loss).parameters
    assert list(params) == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"], _where(
        "transformers"
    )


def test_evaluation_loop_takes_metric_key_prefix_fifth():
    """FastSFTTrainer.evaluation_loop reads metric_key_prefix from args[4] when it is passed by position."""
    from trl import SFTTrainer

    params = list(inspect.signature(SFTTrainer.evaluation_loop).parameters)
    assert params[1:6] == [
        "dataloader",
        "description",
        "prediction_loss_only",
        "ignore_keys",
        "metric_key_prefix",
    ], _where("transformers")


def test_trl_log_merges_its_metrics_into_the_logs_it_is_given():
    """FastSFTTrainer.log puts num_tokens into `logs` (TRL counts it in the compute_loss we replace);
    TRL's log must keep the keys of the dict it is given."""
    from trl import SFTTrainer

    src = inspect.getsource(SFTTrainer.log)
    assert "logs.update(" in src or "{**logs" in src, _where("trl")


@pytest.mark.parametrize(
    "hook", ["on_save", "on_train_end", "on_pre_optimizer_step", "on_step_end", "on_log"]
)
def test_the_public_callback_hooks_fastsft_uses_exist(hook):
    from transformers import TrainerCallback

    assert callable(getattr(TrainerCallback, hook, None)), _where("transformers")


def test_checkpoints_go_to_output_dir_then_on_save_runs():
    """The atomic checkpoints rest on this order: the Trainer writes checkpoint-N under args.output_dir
    (the staging folder), then calls the callbacks' on_save (which move it into checkpoints/)."""
    from transformers import Trainer

    save = inspect.getsource(Trainer._save_checkpoint)
    assert "self._get_output_dir(" in save and "self.save_model(output_dir" in save, _where("transformers")
    loop = inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert loop.index("self._save_checkpoint(") < loop.index("on_save("), _where("transformers")


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path):
    """With num_train_epochs the run's length is known only once the data is read: a warm-up that long
    trained at ~lr * 1e-9 without a word (#28). The progress callback warns at the start of training."""
    from transformers import TrainingArguments

    from fastsft.run.trainer import warmup_warning

    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=3e-3, warmup_steps=1000, report_to="none"
    )
    msg = warmup_warning(args, 12)
    assert "warmup_steps = 1000" in msg and "12 optimizer step(s)" in msg and "below 12" in msg
    assert warmup_warning(args, 2000) is None
    ratio = TrainingArguments(output_dir=str(tmp_path), warmup_steps=1.0 - 1e-9, report_to="none")
    assert warmup_warning(ratio, 12) is not None  # ceil(0.999... * 12) = 12: no step at the peak
    assert (
        warmup_warning(TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.1, report_to="none"), 12)
        is None
    )


def test_a_run_whose_warmup_outlasts_its_epochs_is_warned_before_training(tmp_path):
    """The same warning from a real `fastsft run` of two optimizer steps (8 rows, batch 4, one epoch)."""
    from click.testing import CliRunner

    from fastsft.cli.main import main

    from _tiny import DEMO, TINY_RECIPE

    (tmp_path / "d.jsonl").write_text("".join(DEMO.read_text().splitlines(keepends=True)[:8]))
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.replace(str(DEMO), "d.jsonl"))
    sets = ["train.max_steps=-1", "train.num_train_epochs=1", "train.warmup_steps=1000"]
    args = ["run", str(recipe), "-o", str(tmp_path / "run")] + [x for s in sets for x in ("--set", s)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "warning: [train] warmup_steps = 1000 is not shorter than this run's 2 optimizer step(s)" in out
    assert out.index("warmup_steps = 1000") < out.index("step 1/2")
