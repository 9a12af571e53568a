"""fastsft.recipe.rules: the rules between keys that are each valid alone."""

import pytest

from fastsft.errors import RecipeError

from _tiny import TINY_RECIPE, load_text


def test_cross_checks(tmp_path):
    with pytest.raises(RecipeError, match="needs evaluation data"):
        load_text(tmp_path, TINY_RECIPE, ["train.eval_strategy=steps", "train.eval_steps=2"])
    with pytest.raises(RecipeError, match="formats"):
        load_text(tmp_path, TINY_RECIPE, ["export.formats=['merged','ggfu']"])


def test_warmup_longer_than_the_run_is_refused(tmp_path):
    """warmup_steps >= max_steps trained the whole run at a sliver of the learning rate (#28)."""
    with pytest.raises(RecipeError) as e:
        load_text(tmp_path, TINY_RECIPE, ["train.warmup_steps=1000000000"])
    msg = str(e.value)
    assert "warmup_steps = 1000000000" in msg and "max_steps = 6" in msg and "below max_steps" in msg
    assert load_text(tmp_path, TINY_RECIPE, ["train.warmup_steps=5"]).train.warmup_steps == 5
