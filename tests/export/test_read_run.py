"""fastsft/export/read.py: the run an export reads (read_run), without training one: the adapter or the
full model, the base model from run.json, the recipe or the adapter's config, and a damaged adapter named
before anything loads (check_adapter)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastsft.errors import ExportError
from fastsft.export.read import check_adapter, read_run


def fake_run(root, *, run_json=None, weight=None, base="someone/base-7b"):
    """A run folder as `fastsft run` leaves it, with a two-tensor adapter and no recipe."""
    adapter = root / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    a = torch.zeros(4, 8) if weight is None else weight
    save_file(
        {"lora_A.weight": a, "lora_B.weight": torch.zeros(8, 4)}, str(adapter / "adapter_model.safetensors")
    )
    if run_json is not None:
        (root / "run.json").write_text(json.dumps(run_json))
    return root


def test_an_adapter_run_names_its_base_model(tmp_path, tiny_model_dir):
    info = read_run(fake_run(tmp_path / "a", run_json={"model_path": str(tiny_model_dir), "dtype": "bf16"}))
    assert (info.base_path, info.train_dtype, info.recipe, info.full) == (
        str(tiny_model_dir),
        "bf16",
        None,
        False,
    )
    assert info.adapter == tmp_path / "a" / "adapter" and not info.load_in_4bit
    # the folder the run trained on wins over the recipe's model, which may have changed since
    (tmp_path / "a" / "recipe.toml").write_text(
        '[model]\nname = "builtin:tiny-llama"\n[data]\ntrain = "t.jsonl"\n'
    )
    info = read_run(tmp_path / "a")
    assert info.base_path == str(tiny_model_dir) and info.recipe.model.name == "builtin:tiny-llama"
    # no recipe and no model_path: the base model the adapter's config names
    info = read_run(fake_run(tmp_path / "b", run_json={}))
    assert (info.base_path, info.train_dtype) == ("someone/base-7b", "fp32")


def test_a_full_fine_tune_is_its_model_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "run.json").write_text(json.dumps({"dtype": "bf16"}))
    info = read_run(tmp_path)
    assert info.full and info.adapter == info.path / "model" and info.base_path == str(tmp_path / "model")
    assert info.train_dtype == "bf16"


def test_what_is_not_a_finished_run_is_named(tmp_path):
    with pytest.raises(ExportError, match="no such run directory"):
        read_run(tmp_path / "nope")
    with pytest.raises(ExportError, match="has no trained adapter"):
        read_run(tmp_path)
    run = fake_run(tmp_path / "r")
    (run / "run.json").write_text("{cut")
    with pytest.raises(ExportError, match="run.json cannot be read"):
        read_run(run)


def test_a_damaged_adapter_is_named_with_its_file(tmp_path):
    run = fake_run(tmp_path / "nan", weight=torch.full((4, 8), float("nan")))
    with pytest.raises(ExportError, match="holds NaN values in lora_A.weight: training diverged"):
        check_adapter(run / "adapter")
    run = fake_run(tmp_path / "inf", weight=torch.full((4, 8), float("inf")))
    with pytest.raises(ExportError, match="holds infinite values"):
        check_adapter(run / "adapter")
    run = fake_run(tmp_path / "cut")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ExportError, match="adapter_model.safetensors cannot be read.*adapter is damaged"):
        check_adapter(run / "adapter")
    weights.unlink()
    with pytest.raises(ExportError, match="adapter_model.safetensors is missing"):
        check_adapter(run / "adapter")
    (run / "adapter" / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="adapter_config.json is not a JSON object"):
        check_adapter(run / "adapter")
    check_adapter(fake_run(tmp_path / "fine") / "adapter")  # a sound one passes
