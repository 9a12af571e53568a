"""Full fine-tuning (`[train] method = "full"`) and the other adapter options (DoRA, modules_to_save,
8-bit loading), checked by what they change on the built-in tiny model.

One full fine-tune (8-bit AdamW, gradient checkpointing, the linear-loss kernel, an eval at the end)
is shared by the module: every weight moves, the loss falls, RUN_DIR/model loads with plain
transformers and scores the held-out set with the loss the trained model had in the run, the
optimizer's state is 8-bit, and export / generate / eval take the run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastsft import backends
from fastsft import recipe as R
from fastsft.errors import RecipeError
from fastsft.loss import route as L
from fastsft.run import train

from _tiny import TINY_RECIPE, load_tiny

QUIET = dict(log=lambda *_: None)
FULL = [
    "train.method=full",
    "model.load_in_4bit=false",
    "train.learning_rate=2e-3",
    "train.optim=adamw_8bit",
    "train.gradient_checkpointing=true",
    "data.val_ratio=0.05",
    "train.eval_strategy=steps",
    "train.eval_steps=6",
    "train.save_strategy=steps",
    "train.save_steps=6",
]


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    result = train.run(load_tiny(tmp, *FULL), output_dir=tmp / "run")
    return result.run_dir


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


def test_full_defaults_to_16bit_weights_and_refuses_quantised_ones(tmp_path):
    assert (
        load_tiny(tmp_path, "train.method=full").model.load_in_4bit is False
    )  # not written: follows the method
    assert load_tiny(tmp_path).model.load_in_4bit is False  # TINY_RECIPE writes false
    with pytest.raises(RecipeError) as e:
        load_tiny(tmp_path, "train.method=full", "model.load_in_4bit=true")
    assert "load_in_4bit = false" in str(e.value) and 'method = "lora"' in str(e.value)
    with pytest.raises(RecipeError, match="load_in_8bit = false"):
        load_tiny(tmp_path, "train.method=full", "model.load_in_8bit=true")
    with pytest.raises(RecipeError, match="DoRA is an adapter"):
        load_tiny(tmp_path, "train.method=full", "lora.use_dora=true")


def test_4bit_and_8bit_are_exclusive(tmp_path):
    with pytest.raises(RecipeError, match="both true"):
        load_tiny(tmp_path, "model.load_in_4bit=true", "model.load_in_8bit=true")
    p = tmp_path / "q.toml"
    p.write_text(TINY_RECIPE.replace("load_in_4bit = false\n", "load_in_8bit = true\n"))
    assert R.load(p).model.load_in_4bit is False  # the 4-bit default gives way to an explicit 8-bit


def test_foreign_method_keys_name_ours(tmp_path):
    with pytest.raises(RecipeError, match="fastsft calls it `method` in \\[train\\]"):
        load_tiny(tmp_path, "train.finetuning_type=full")


# ----------------------------------------------------------------------------------------------
# The full fine-tune
# ----------------------------------------------------------------------------------------------


def test_every_weight_moves_and_the_loss_falls(full_run):
    info = json.loads((full_run / "run.json").read_text())
    assert info["result"]["method"] == "full"
    assert info["result"]["trainable_parameters"] > 100_000  # the whole model, not an adapter
    assert not (full_run / "adapter").exists()
    base = load_file(str(sorted(Path(info["model_path"]).glob("*.safetensors"))[0]))
    trained = load_file(str(full_run / "model" / "model.safetensors"))
    assert set(base) == set(trained)
    same = [k for k in base if torch.equal(base[k], trained[k])]
    assert not same, f"weights that did not move: {same}"
    assert not any(
        torch.equal(base[k], trained[k]) for k in base if "embed" in k or "lm_head" in k or "norm" in k
    )
    losses = [r["loss"] for r in metrics(full_run) if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses


def test_the_model_loads_with_plain_transformers_and_scores_as_it_trained(full_run, tmp_path):
    """RUN_DIR/model is a complete model: plain transformers loads it with its tokenizer, and it scores
    the held-out set with the very eval loss the trained model had at its last step in the run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft import use

    model = AutoModelForCausalLM.from_pretrained(str(full_run / "model"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(full_run / "model"))
    assert tok.chat_template and tok.pad_token_id is not None
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    in_run = [r["eval_loss"] for r in metrics(full_run) if "eval_loss" in r]
    assert len(in_run) == 2 and in_run[-1] < in_run[0]  # before and after training
    res = use.evaluate(full_run, n_gen=1, max_new_tokens=8, json_out=tmp_path / "e.json", console=_console())
    assert res["loss"] == pytest.approx(in_run[-1], rel=1e-5)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is a banana?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    loaded = use.load_for_use(full_run)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    assert use.generate(full_run, "What colour is a banana?", max_new_tokens=8).strip()


def test_the_optimizer_state_is_8bit(full_run):
    (ckpt,) = (full_run / "checkpoints").glob("checkpoint-*")
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)["state"]
    moments = [v.get("__bnb_optimizer_quant_state__", v) for v in state.values()]
    eight = [m for m in moments if m["state1"].dtype == torch.uint8 and m["state2"].dtype == torch.uint8]
    # bitsandbytes keeps AdamW's moments in 8 bits for tensors of >= 4096 elements (the smaller ones, and
    # the embeddings, which transformers registers for 32-bit state, stay float32)
    assert len(eight) >= len(moments) // 3, [m["state1"].dtype for m in moments]


def test_export_takes_a_full_run(full_run):
    from fastsft.errors import ExportError
    from fastsft.export import export_run

    out = export_run(full_run, fmt="merged", dtype="bf16", to=full_run.parent / "merged", console=_console())
    parity = json.loads((out / "export.json").read_text())["parity"]
    assert parity["passed"] and parity["rounded_diff"] <= 1e-6 and parity["reference"].startswith("the fully")
    with pytest.raises(ExportError, match="no adapter"):
        export_run(full_run, fmt="adapter", console=_console())


# ----------------------------------------------------------------------------------------------
# The lm_head trains through the linear loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["fastsft-linear", "fastsft"])
def test_full_model_gradients_equal_stock(tmp_path, kernel):
    """Every weight's gradient (the lm_head's through the linear kernel's weight-gradient path, the
    embeddings') equals stock transformers' on one batch."""
    recipe = load_tiny(tmp_path, "train.method=full", f"loss.kernel={kernel}")
    loaded = backends.load_model(recipe, **QUIET)
    assert all(p.requires_grad for p in loaded.model.parameters())
    stock = copy.deepcopy(loaded.model)
    route = L.resolve(recipe, loaded.model, "transformers", torch.device("cpu"))
    route.install(loaded.model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(loaded.tokenizer), (2, 17), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.5, ids, -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    got, _ = route(loaded.model, batch, 9)
    got.backward()
    ref = stock(**batch, num_items_in_batch=9, use_cache=False).loss
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for (name, p), (_, q) in zip(stock.named_parameters(), loaded.model.named_parameters(), strict=True):
        assert q.grad is not None and p.grad is not None, name
        assert (q.grad - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-12, name


# ----------------------------------------------------------------------------------------------
# DoRA, modules_to_save, 8-bit loading
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # a DoRA run: 6 s
def test_dora_adapter_has_magnitudes_and_loads_back(tmp_path):
    from fastsft.export import export_run

    result = train.run(load_tiny(tmp_path, "lora.use_dora=true"), output_dir=tmp_path / "run")
    adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    mags = [k for k in adapter if "lora_magnitude_vector" in k]
    assert mags and len(mags) == len([k for k in adapter if "lora_A" in k])
    assert json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    # the merge reproduces base + DoRA adapter (a magnitude left out would fail the parity check)
    out = export_run(result.run_dir, fmt="merged", dtype="fp32", to=tmp_path / "merged", console=_console())
    parity = json.loads((out / "export.json").read_text())["parity"]
    assert parity["passed"] and parity["reproduction_error"] is not None, parity


@pytest.mark.slow  # a run with a trained head: 7 s
def test_modules_to_save_trains_and_saves_the_head(tmp_path):
    from fastsft.export import export_run

    recipe = load_tiny(tmp_path, 'lora.modules_to_save=["lm_head"]')
    result = train.run(recipe, output_dir=tmp_path / "run")
    adapter = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    (head_key,) = [k for k in adapter if "lm_head" in k]
    info = json.loads((result.run_dir / "run.json").read_text())
    base = load_file(str(sorted(Path(info["model_path"]).glob("*.safetensors"))[0]))
    assert not torch.equal(adapter[head_key], base["lm_head.weight"])  # trained, not a copy
    out = export_run(result.run_dir, fmt="merged", dtype="fp32", to=tmp_path / "merged", console=_console())
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["lm_head.weight"], adapter[head_key])
    assert json.loads((out / "export.json").read_text())["parity"]["passed"]


def test_load_in_8bit_gives_int8_layers_under_lora(tmp_path):
    import bitsandbytes as bnb

    recipe = load_tiny(tmp_path, "model.load_in_8bit=true", "model.load_in_4bit=false")
    loaded = backends.load_model(recipe, **QUIET)
    int8 = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert int8 and loaded.info["quantization"] == "int8"
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def test_an_adapter_saved_after_tokens_were_added_loads_back(tmp_path):
    """The data adds a pad token when the tokenizer has none: the embeddings grow, PEFT saves the
    resized embeddings and head with the adapter, and the one loader (load_trained) resizes the base
    first, so the adapter loads back with the trained logits."""
    from fastsft.backends.transformers import load_trained

    recipe = load_tiny(tmp_path)
    loaded = backends.load_model(recipe, **QUIET)
    rows = loaded.model.get_input_embeddings().num_embeddings
    loaded.tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    loaded.model.resize_token_embeddings(len(loaded.tokenizer))  # as the run does for an added pad token
    assert loaded.model.get_input_embeddings().num_embeddings == len(loaded.tokenizer) > rows
    with torch.no_grad():  # make the adapter matter
        for n, p in loaded.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    loaded.model.save_pretrained(str(tmp_path / "adapter"))
    back = load_trained(loaded.model_path, tmp_path / "adapter", "fp32", tokenizer=loaded.tokenizer)
    ids = torch.tensor([[1, 5, 9, len(loaded.tokenizer) - 1]])
    loaded.model.eval()
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, loaded.model(ids).logits, atol=1e-6)
