"""Experiment trackers (fastsft.run.trackers): the names a recipe may give are the ones it can install."""

import pytest

from fastsft import recipe as R
from fastsft.errors import RecipeError
from fastsft.recipe.schema import TRACKER_NAMES
from fastsft.run import trackers


def test_the_recipe_names_the_trackers_the_run_knows():
    """`[train] report_to` is checked against the recipe's list; the run knows each of those names (its
    module, its pip command) and no other."""
    assert tuple(trackers.TRACKERS) == TRACKER_NAMES


def test_an_unknown_tracker_is_a_recipe_error_with_the_closest_name():
    raw = {"model": {"name": "builtin:tiny-mistral"}, "data": {"train": "x.jsonl"}}
    raw["train"] = {"report_to": ["tensorbord"]}
    with pytest.raises(RecipeError, match="did you mean `tensorboard`"):
        R.validate(raw)
    assert trackers.names(["none"]) == []
