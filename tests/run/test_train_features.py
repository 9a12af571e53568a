"""Recipe features checked by what they change: packing, load_best_model_at_end, --allow-pickle, the
added pad token, and the tiny Llama / Gemma 2 through fastsft's linear loss against the stock loss."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from fastsft import backends
from fastsft import recipe as R
from fastsft.loss import route as loss
from fastsft.run import train

from _launches import launch_counts, reset_launch_counts
from _tiny import DEMO, TINY_RECIPE

pytestmark = pytest.mark.filterwarnings("ignore")


def make_recipe(tmp_path, *overrides, text=TINY_RECIPE):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return R.load(p, list(overrides))


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def demo_subset(tmp_path, n=24):
    path = tmp_path / "demo.jsonl"
    path.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:n]))
    return path


# ----------------------------------------------------------------------------------------------
# Llama and Gemma 2 end to end
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # two training runs: 9 s
def test_tiny_llama_trains_through_the_linear_kernel_with_the_stock_loss(tmp_path):
    runs = {}
    for kernel in ("torch", "fastsft-linear"):
        recipe = make_recipe(
            tmp_path, "model.name=builtin:tiny-llama", f"loss.kernel={kernel}", "train.max_steps=3"
        )
        reset_launch_counts()
        result = train.run(recipe, output_dir=tmp_path / kernel)
        runs[kernel] = (losses(result.run_dir), sum(launch_counts.values()), result.summary["loss"])
    ref, _, _ = runs["torch"]
    got, launches, info = runs["fastsft-linear"]
    assert info["architecture"] == "LlamaForCausalLM" and info["kernel"] == "fastsft-linear"
    assert launches >= 3  # the Triton kernel ran (no silent fall back to PyTorch)
    assert got[0] == pytest.approx(ref[0], rel=1e-5)  # step 1: the same loss, before any update
    assert got == pytest.approx(ref, rel=2e-4)


def _chat_batch(tokenizer, n=3):
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()[:n]]
    enc = [
        tokenizer.apply_chat_template(r["messages"], return_dict=True, return_assistant_tokens_mask=True)
        for r in rows
    ]
    T = max(len(e["input_ids"]) for e in enc)
    ids = torch.full((n, T), tokenizer.pad_token_id)
    mask = torch.zeros((n, T), dtype=torch.long)
    labels = torch.full((n, T), -100)
    for i, e in enumerate(enc):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        mask[i, :k] = 1
        labels[i, :k] = torch.where(torch.tensor(e["assistant_masks"]) == 1, ids[i, :k], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kernel", ["fastsft-linear", "fastsft"])
def test_gemma2_softcap_loss_equals_transformers_own(tmp_path, kernel):
    """Gemma 2 caps its logits (final_logit_softcapping): fastsft's loss is transformers' own loss of
    the capped logits, forward and gradient, and the cap matters (the uncapped loss is far off)."""
    recipe = make_recipe(tmp_path, "model.name=builtin:tiny-gemma2", f"loss.kernel={kernel}")
    loaded = backends.load_model(recipe, log=lambda *_: None)
    model = loaded.model
    lm = loss.base_causal_lm(model)
    lm.config.final_logit_softcapping = 2.0  # tighter than the tiny model's 30: the cap bites hard
    batch = _chat_batch(loaded.tokenizer)

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    stock = model(**batch).loss  # transformers' ForCausalLMLoss on its softcapped logits
    stock.backward()
    stock_grads = grads()
    with torch.no_grad():
        lm.config.final_logit_softcapping = None
        uncapped = float(model(**batch).loss)
        lm.config.final_logit_softcapping = 2.0

    route = loss.resolve(recipe, model, loaded.backend, torch.device("cpu"))
    assert route.kernel == kernel and route.kernel_backend == "triton"
    route.install(model)
    ours, _ = route(model, batch)
    ours.backward()
    ours_grads = grads()
    assert float(ours) == pytest.approx(float(stock), rel=1e-5)
    assert abs(uncapped - float(stock)) > 0.05 * float(stock)
    assert ours_grads.keys() == stock_grads.keys() and ours_grads
    for name, g in stock_grads.items():
        torch.testing.assert_close(ours_grads[name], g, rtol=1e-3, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # a run and the packed pieces scored alone: 12 s
def test_packing_packs_rows_trains_only_answers_and_keeps_examples_apart(tmp_path, monkeypatch):
    from fastsft import data as D

    data = demo_subset(tmp_path)
    common = [
        f"data.train={data}",
        "data.max_length=256",
        "train.max_steps=1",
        "train.per_device_train_batch_size=4",
        "loss.kernel=fastsft-linear",
    ]
    recipe = make_recipe(tmp_path, *common, "data.packing=true")
    seen = []
    original = loss.LossRoute.__call__

    def spy(self, model, inputs, num_items_in_batch=None):
        if torch.is_grad_enabled():  # a training step's batch, not the retain set scored before and after
            seen.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(loss.LossRoute, "__call__", spy)
    train.run(recipe, output_dir=tmp_path / "packed")
    batch = seen[0]
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    # the trained-token count (tokens/s, run.json) sees the packed row's tokens, not a missing mask's 0
    result = json.loads((tmp_path / "packed" / "run.json").read_text())["result"]
    assert result["tokens"] >= ids.numel() and result["tokens_per_s"] > 0, result
    # several examples share one row: position ids restart at each example's first token
    starts = (pos[0] == 0).nonzero().squeeze(1).tolist()
    assert ids.shape[0] == 1 and len(starts) > 4, starts

    # each packed piece is one whole example, with exactly the labels training gives it unpacked
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "packed" / "adapter")
    rows, _ = D.preview_rows(make_recipe(tmp_path, *common), tok, n=24)
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in rows}
    bounds = starts + [ids.shape[1]]
    pieces = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
    for a, b in pieces:
        piece = tuple(ids[0, a:b].tolist())
        assert piece in by_ids
        assert labels[0, a:b].tolist() == by_ids[piece]

    # no attention across examples: the packed row's loss is the token-weighted loss of its pieces alone
    loaded = backends.load_model(recipe, log=lambda *_: None)
    route = loss.resolve(recipe, loaded.model, loaded.backend, torch.device("cpu"))
    route.install(loaded.model)
    loaded.model.eval()
    with torch.no_grad():
        packed, _ = original(route, loaded.model, {"input_ids": ids, "position_ids": pos, "labels": labels})
        total, count = 0.0, 0
        for a, b in pieces:
            piece_labels = labels[:, a:b]
            n = int((loss.shift_left(piece_labels) != -100).sum())
            alone, _ = original(route, loaded.model, {"input_ids": ids[:, a:b], "labels": piece_labels})
            total, count = total + float(alone) * n, count + n
    assert float(packed) == pytest.approx(total / count, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# load_best_model_at_end
# ----------------------------------------------------------------------------------------------


def test_load_best_model_at_end_keeps_the_best_eval_step(tmp_path, tiny_model_dir):
    """The saved adapter is the checkpoint with the lowest eval loss, not the last step's. The eval
    answers are the base model's own greedy text: training moves the model off it, so the eval loss
    rises with every step and the best checkpoint is the first one."""
    from safetensors.torch import load_file

    from fastsft import use

    base = use.load_for_use(tiny_model_dir, dtype="fp32")
    held = []
    for line in DEMO.read_text().splitlines()[-8:]:
        question = next(m for m in json.loads(line)["messages"] if m["role"] == "user")
        new, _ = use.generate_for(base, [question], max_new_tokens=12)
        held.append(
            {
                "messages": [
                    question,
                    {"role": "assistant", "content": base.tokenizer.decode(new, skip_special_tokens=True)},
                ]
            }
        )
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    recipe = make_recipe(
        tmp_path,
        "loss.kernel=torch",
        f"data.eval={tmp_path / 'eval.jsonl'}",
        "train.max_steps=6",
        "train.eval_strategy=steps",
        "train.eval_steps=2",
        "train.save_strategy=steps",
        "train.save_steps=2",
        "train.load_best_model_at_end=true",
    )
    run_dir = train.run(recipe, output_dir=tmp_path / "run").run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r and r["step"] > 0}
    assert sorted(evals) == [2, 4, 6]
    best, last = min(evals, key=evals.get), max(evals)
    assert best != last, evals
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for step, same in ((best, True), (last, False)):
        ckpt = load_file(str(run_dir / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"))
        assert all(torch.equal(saved[k], ckpt[k]) for k in saved) is same, step


# ----------------------------------------------------------------------------------------------
# allow_pickle
# ----------------------------------------------------------------------------------------------


def test_pickle_weights_train_only_with_allow_pickle(tmp_path, tiny_model_dir):
    """`fastsft run` on a model stored as a pickle (.bin): refused as it stands, trained with
    --allow-pickle (test_loading_policy.py covers the other commands and the recipe key)."""
    from safetensors.torch import load_file

    from fastsft.cli.main import main

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    torch.save(load_file(str(weights)), model / "pytorch_model.bin")
    weights.unlink()
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.replace('"builtin:tiny-mistral"', json.dumps(str(model))))
    args = ["run", str(recipe), "--set", "train.max_steps=1", "--set", "loss.kernel=torch"]

    refused = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "pickle" in refused.output and "--allow-pickle" in refused.output
    allowed = CliRunner().invoke(main, [*args, "--allow-pickle", "-o", str(tmp_path / "b")])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# a tokenizer without a pad token
# ----------------------------------------------------------------------------------------------


def test_a_tokenizer_without_any_pad_gets_one_and_the_embeddings_grow(tmp_path, tiny_model_dir):
    """No pad token and no spare special token (the tiny tokenizer's <|endoftext|> renamed away): a
    '<|pad|>' is added (never the end-of-turn token) and the embeddings are resized to hold it;
    padded batches then train (a pad id past the embeddings would be an index error)."""
    model = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = model / name
        path.write_text(path.read_text().replace("<|endoftext|>", "<|sep|>"))
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["pad_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    data = demo_subset(tmp_path, 8)
    recipe = make_recipe(
        tmp_path, f"model.name={model}", f"data.train={data}", "train.max_steps=2", "loss.kernel=torch"
    )
    result = train.run(recipe, output_dir=tmp_path / "run")
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["data"]["added_pad_token"] == "<|pad|>"
    assert info["data"]["pad_token"] == "<|pad|>" != info["data"]["end_of_turn_token"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.run_dir / "adapter")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    # the new id lies past the base model's embeddings: only a resized matrix can look it up
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == vocab == len(tok) - 1
    assert len(losses(result.run_dir)) == 2 and all(x == x for x in losses(result.run_dir))

    # every later load of the run grows the base's embeddings the same way (backends.transformers.load_trained):
    # generate / eval / serve look the pad id up in padded input, and the merged export holds its row
    from fastsft import use
    from fastsft.export import export_run

    loaded = use.load_for_use(result.run_dir)
    assert loaded.model.get_input_embeddings().num_embeddings == len(tok)
    with torch.no_grad():
        logits = loaded.model(
            input_ids=torch.tensor([[tok.pad_token_id, 5]]), attention_mask=torch.tensor([[0, 1]])
        ).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
    merged = export_run(result.run_dir, fmt="merged", dtype="fp32")
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == len(tok)
    assert json.loads((merged / "export.json").read_text())["parity"]["passed"]
