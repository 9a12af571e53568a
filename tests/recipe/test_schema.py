"""fastsft.recipe.schema: the sections' declarations: defaults and types, frozen dataclasses, the path and
resume-safe keys read from the metadata."""

from dataclasses import FrozenInstanceError

import pytest

from fastsft import recipe as R

from _tiny import TINY_RECIPE, load_text


def test_defaults_and_types(tmp_path):
    r = load_text(tmp_path, TINY_RECIPE)
    assert r.train.learning_rate == 3e-3
    assert r.lora.bias == "none" and r.lora.target_modules == "all-linear"
    assert r.loss.kernel == "auto" and r.loss.label_smoothing == 0.0
    assert isinstance(r.lora.lora_alpha, float)


def test_sections_are_frozen_dataclasses_with_typed_values(tmp_path):
    r = load_text(tmp_path, TINY_RECIPE, ["export.formats=adapter"])
    assert isinstance(r.train, R.TrainSection) and isinstance(r.lora, R.LoraSection)
    with pytest.raises(FrozenInstanceError):
        r.train.learning_rate = 1.0
    assert r.export.formats == ["adapter"]  # a list[str] key takes one name as a list of one
    assert r.train.as_dict()["learning_rate"] == 3e-3 and r.as_dict()["lora"]["r"] == 8
    assert r.train.per_device_eval_batch_size is None  # `int | None`: unset


def test_path_and_resume_safe_keys_come_from_the_metadata():
    assert ("data", "train") in R.PATH_KEYS and ("distributed", "deepspeed_config") in R.PATH_KEYS
    assert (
        len(R.PATH_KEYS) == 6
    )  # data.retain too ([[data.sources]] paths are made absolute by their own loop)
    assert "train.save_steps" in R.RESUME_SAFE_KEYS and "train.learning_rate" not in R.RESUME_SAFE_KEYS
    assert len(R.RESUME_SAFE_KEYS) == 9  # train.report_to: trackers watch, they do not change the training
