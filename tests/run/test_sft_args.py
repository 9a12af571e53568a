"""SFTConfig from the recipe: every [train] key that maps to an SFTConfig argument reaches it."""

from dataclasses import fields

import pytest

from fastsft import recipe as R
from fastsft.run.sft_args import passed_through, sft_config

# A value for each [train] key marked `sft`, unlike both the recipe's default and SFTConfig's own default,
# so that the value found in the SFTConfig can only have come from the recipe.
NON_DEFAULT = {
    "learning_rate": 3e-4,
    "num_train_epochs": 2.0,
    "max_steps": 7,
    "per_device_train_batch_size": 3,
    "gradient_accumulation_steps": 2,
    "lr_scheduler_type": "constant",
    "weight_decay": 0.01,
    "max_grad_norm": 0.5,
    "optim": "sgd",
    "logging_steps": 4,
    "eval_strategy": "epoch",
    "eval_steps": 5,
    "save_strategy": "epoch",
    "save_steps": 10,
    "save_total_limit": 3,
    "load_best_model_at_end": True,
    "metric_for_best_model": "eval_mean_token_accuracy",
    "seed": 7,
}


def sft_field_names() -> set[str]:
    """Every argument SFTConfig takes (TrainingArguments' included)."""
    from trl import SFTConfig

    return {f.name for f in fields(SFTConfig) if f.init}


def recipe_with(train: dict, **sections) -> R.Recipe:
    return R.validate(
        {
            "model": {"name": "builtin:tiny-mistral"},
            "data": {"train": "d.jsonl", "val_ratio": 0.1},
            "train": train,
            **sections,
        }
    )


def config(recipe, tmp_path, *, dtype="fp32", backend="transformers"):
    return sft_config(recipe, tmp_path / "out", run_name="run", dtype=dtype, backend=backend, data_kwargs={})


def test_every_train_key_says_whether_it_maps_to_sft_config():
    """A new [train] key must choose: `sft=True`/a name (passed through) or `sft=False` (by hand, or ours)."""
    undecided = [f.name for f in fields(R.TrainSection) if f.metadata["sft"] is None]
    assert not undecided, f"[train] keys without sft=...: {undecided}"


def test_mapped_train_keys_are_sft_config_arguments():
    names = sft_field_names()
    mapped = {k: spec.sft for k, spec in R.SCHEMA["train"].items() if spec.sft}
    assert "learning_rate" in mapped and len(mapped) >= 15
    assert not {k: v for k, v in mapped.items() if v not in names}, "not SFTConfig arguments"
    # only [train] passes keys through: elsewhere `sft` would be ignored
    assert not [
        (s, k) for s, keys in R.SCHEMA.items() if s != "train" for k, spec in keys.items() if spec.sft
    ]


def test_every_mapped_train_key_reaches_sft_config(tmp_path):
    from trl import SFTConfig

    mapped = {k: spec for k, spec in R.SCHEMA["train"].items() if spec.sft}
    assert set(mapped) == set(NON_DEFAULT), (
        "a [train] key passes to SFTConfig: give it a value in NON_DEFAULT"
    )
    args = config(recipe_with(NON_DEFAULT), tmp_path)
    stock = SFTConfig(output_dir=str(tmp_path / "stock"), use_cpu=True, bf16=False)
    for key, spec in mapped.items():
        value = NON_DEFAULT[key]
        assert value != spec.default and getattr(stock, spec.sft) != value, f"{key}: pick another value"
        assert getattr(args, spec.sft) == value, key
    assert passed_through(recipe_with(NON_DEFAULT)) == NON_DEFAULT


def test_the_keys_set_by_hand(tmp_path):
    t = {"per_device_train_batch_size": 3, "warmup_steps": 4, "warmup_ratio": 0.5}
    args = config(recipe_with(t), tmp_path)
    assert args.warmup_steps == 4  # steps win over the ratio
    assert args.per_device_eval_batch_size == 3  # falls back to the train batch size
    assert args.gradient_checkpointing is True and args.gradient_checkpointing_kwargs == {
        "use_reentrant": False
    }
    assert args.data_seed == args.seed == 42
    assert (args.bf16, args.fp16, args.use_cpu) == (False, False, True)
    # fixed by fastsft: our progress line and our loss (smoothing included) replace TRL's
    assert args.report_to == [] and args.disable_tqdm is True and args.label_smoothing_factor == 0.0
    assert args.loss_type == "nll" and args.eval_on_start is False and not args.lr_scheduler_kwargs

    t = {
        "warmup_ratio": 0.25,
        "per_device_eval_batch_size": 5,
        "lr_scheduler_type": "cosine_with_min_lr",
        "eval_strategy": "steps",
        "eval_steps": 2,
    }
    args = config(recipe_with(t, loss={"label_smoothing": 0.1}), tmp_path, dtype="bf16", backend="unsloth")
    assert args.warmup_steps == 0.25  # a float < 1 is a ratio
    assert args.per_device_eval_batch_size == 5
    assert args.gradient_checkpointing is False  # Unsloth checkpoints its own way
    assert args.bf16 is True and args.fp16 is False
    assert args.label_smoothing_factor == 0.0
    assert args.eval_on_start is True
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


@pytest.mark.parametrize("key", ["warmup_steps", "per_device_eval_batch_size", "gradient_checkpointing"])
def test_keys_set_by_hand_are_not_passed_through(key):
    """The keys with logic are not marked `sft`: passing them as written would undo the logic."""
    assert R.SCHEMA["train"][key].sft is None
