"""Experiment trackers: `[train] report_to`.

transformers already has a callback per tracker (`transformers.integrations`); fastsft picks them by
name, refuses a tracker whose package is missing with the pip command that installs it, and points
TensorBoard at the run directory (`RUN/tensorboard/`, event files readable offline) instead of a
`runs/` folder under the checkpoints. W&B, MLflow and trackio are configured by their own environment
variables (WANDB_PROJECT, WANDB_MODE=offline, MLFLOW_TRACKING_URI, ...), as with any Trainer; the run
is named after the run directory.
"""

from __future__ import annotations

import importlib.util

from fastsft.errors import RecipeError

# name -> (module that must import, what installs it); the names a recipe may give are
# fastsft.recipe.schema.TRACKER_NAMES (tests/run/test_trackers.py holds the two equal)
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "trackio": ("trackio", "pip install trackio"),
}
TENSORBOARD_DIR = "tensorboard"


def names(value) -> list[str]:
    """`report_to` (a string or a list) -> tracker names; "none" -> []."""
    items = [value] if isinstance(value, str) else list(value or [])
    return [n for n in items if n != "none"]


def missing(recipe) -> list[str]:
    """The trackers the recipe asks for whose package is not installed, as recipe problems."""
    out = []
    for n in names(recipe.train.report_to):
        module, install = TRACKERS[n]
        if importlib.util.find_spec(module) is None:
            out.append(
                f'[train] report_to = "{n}": {module} is not installed: {install} (or remove it from report_to)'
            )
    return out


def callbacks(recipe, run_dir) -> list:
    """The transformers callbacks of `report_to`, TensorBoard's writing to RUN/tensorboard/."""
    problems = missing(recipe)
    if problems:
        raise RecipeError(problems, path=str(recipe.path) if recipe.path else None)
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    out = []
    for n in names(recipe.train.report_to):
        cb = INTEGRATION_TO_CALLBACK[n]()
        if n == "tensorboard":
            cb.logging_dir = str(
                run_dir.path / TENSORBOARD_DIR
            )  # read at train begin, else TENSORBOARD_LOGGING_DIR
        out.append(cb)
    return out
