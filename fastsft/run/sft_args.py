"""TRL's `SFTConfig` from a recipe.

The `[train]` keys marked `sft` in `recipe.TrainSection` pass through under their SFTConfig name, read
from the dataclass, so a new 1:1 key needs no line here. What needs logic is below by hand: warm-up
(steps or ratio), the eval batch size's fallback, gradient checkpointing per backend, mixed precision
from the model's dtype, the settings fastsft fixes, and the distributed strategy's arguments.
"""

from __future__ import annotations

from pathlib import Path

from fastsft import dist
from fastsft.recipe import SCHEMA


def passed_through(recipe) -> dict:
    """{SFTConfig argument: value} of every `[train]` key that maps to one 1:1."""
    return {spec.sft: getattr(recipe.train, name) for name, spec in SCHEMA["train"].items() if spec.sft}


def sft_config(recipe, output_dir: Path, *, run_name: str, dtype: str, backend: str, data_kwargs: dict):
    """The SFTConfig of a run. `run_name` is the run directory's name (W&B / MLflow / trackio show it),
    `dtype` the compute dtype the model loaded in ("bf16", "fp16", "fp32"), `backend` the backend that
    loaded it, `data_kwargs` what `data` decided (packing, max_length, the loss masks)."""
    import torch
    from trl import SFTConfig

    t = recipe.train
    by_hand = dict(
        output_dir=str(output_dir),
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,  # a float < 1 is a ratio
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        # Unsloth checkpoints its own way (enabled when it loads the model).
        gradient_checkpointing=t.gradient_checkpointing and backend == "transformers",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_first_step=True,
        eval_on_start=t.eval_strategy != "no",  # the base model's held-out loss, for the report
        data_seed=t.seed,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu=not torch.cuda.is_available(),
        report_to="none",  # trackers are added as callbacks (fastsft.run.trackers), TensorBoard into the run dir
        run_name=run_name,
        disable_tqdm=True,  # our progress line replaces tqdm's
        prediction_loss_only=True,
        loss_type="nll",
        label_smoothing_factor=0.0,  # label smoothing happens in our loss, not in TRL's second forward
        dataloader_num_workers=0,
        **data_kwargs,
    )
    kwargs = passed_through(recipe)
    if kwargs.keys() & by_hand.keys():  # our bug: a key marked `sft` in the recipe is also set here
        raise TypeError(f"SFTConfig arguments set twice: {sorted(kwargs.keys() & by_hand.keys())}")
    kwargs.update(by_hand)
    if t.lr_scheduler_type == "cosine_with_min_lr":
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": 0.1}
    kwargs.update(dist.distributed_kwargs(recipe, dtype=dtype))
    return SFTConfig(**kwargs)


__all__ = ["sft_config", "passed_through"]
