"""Exports (merged / adapter / gguf), generate, chat, eval and their CLI, on fake run directories.

A fake run is what `fastsft run` leaves behind, made without training: recipe.toml pointing at a tiny
built-in model, an adapter made with PEFT on the fp32 base with random non-zero lora_B (so it changes
the logits), the tokenizer in adapter/, and a minimal run.json.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from fastsft.errors import DataError

from _tiny import TINY_RECIPE

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "What colour is a banana?"


def make_fake_run(root: Path, model_dir: Path, *, four_bit: bool, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    recipe = TINY_RECIPE.replace('name = "builtin:tiny-mistral"', f'name = "{model_dir}"')
    recipe = recipe.replace("load_in_4bit = false", f"load_in_4bit = {'true' if four_bit else 'false'}")
    recipe = recipe.replace("max_length = 96", "max_length = 96\nval_ratio = 0.05")
    (root / "recipe.toml").write_text(recipe, encoding="utf-8")

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(root / "adapter")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(root / "adapter")
    run_json = {
        "status": "finished",
        "model_path": str(model_dir),
        "dtype": "fp32",
        "data": {"fingerprint": "0123abcd", "summary": "400 conversations"},
        "result": {
            "global_step": 6,
            "train_loss": 3.21,
            "tokens": 1234,
            "samples": [{"prompt": PROMPT, "before": "", "after": ""}],
        },
    }
    (root / "run.json").write_text(json.dumps(run_json), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from fastsft.backends import builtin

    root = tmp_path_factory.mktemp("export-runs")
    return {
        "fp": make_fake_run(root / "run16", tiny_model_dir, four_bit=False),
        "4bit": make_fake_run(root / "run4", tiny_model_dir, four_bit=True, seed=1),
        "qwen2": make_fake_run(
            root / "runqwen", builtin.materialize("builtin:tiny-qwen2"), four_bit=False, seed=2
        ),
        "model_dir": tiny_model_dir,
    }


@pytest.fixture(scope="module")
def merged_4bit(runs):
    from fastsft.export import export_run

    return export_run(runs["4bit"], fmt="merged", dtype="bf16")


def _inputs(tokenizer):
    from fastsft.chat.templates import chat_ids

    return [
        chat_ids(
            tokenizer,
            [{"role": "user", "content": q}, {"role": "assistant", "content": "A cow is brown."}],
            add_generation_prompt=False,
        )
        for q in (PROMPT, "Where do you find a frog?")
    ]


def _base_and_adapter(run: Path, model_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run / "adapter")).eval()


def _no_temp_left(folder: Path) -> bool:
    return not [
        p for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    ]


# ----------------------------------------------------------------------------------------------
# merged
# ----------------------------------------------------------------------------------------------


def test_merged_export_of_a_4bit_run_matches_base_plus_adapter(runs, merged_4bit):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft.export import logits_of, rel_diff

    out = merged_4bit
    assert out == runs["4bit"] / "export-merged"
    assert list(out.glob("*.safetensors")) and (out / "config.json").exists()
    assert _no_temp_left(out.parent)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert eot in eos

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    ref_model = _base_and_adapter(runs["4bit"], runs["model_dir"])
    inputs = _inputs(tok)
    got, ref = logits_of(merged, inputs), logits_of(ref_model, inputs)
    with ref_model.disable_adapter():
        base_only = logits_of(ref_model, inputs)
    assert rel_diff(got, ref) < 2e-2  # bf16 rounding only
    assert rel_diff(got, base_only) > 0.2  # the adapter is in there

    # merged into the 16-bit base, not a dequantised 4-bit copy: W + scale * B @ A exactly (up to bf16)
    from safetensors.torch import load_file

    adapter = load_file(runs["4bit"] / "adapter" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in adapter.items() if k.endswith(f"{key}.lora_A.weight"))
    b = next(v for k, v in adapter.items() if k.endswith(f"{key}.lora_B.weight"))
    w = load_file(runs["model_dir"] / "model.safetensors")[f"{key}.weight"]
    expect = (w + (16 / 8) * b @ a).to(torch.bfloat16).float()
    saved = merged.state_dict()[f"{key}.weight"]
    assert torch.allclose(saved, expect, atol=1e-2, rtol=0)
    assert (saved - expect).abs().max() < (saved - w).abs().max() / 10

    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "merged" and record["dtype"] == "bf16"
    parity = record["parity"]
    assert 0 < parity["rel_logit_diff"] < parity["tolerance"] and parity["tolerance"] >= 2e-2
    assert parity["passed"] and parity["reproduction_error"] < 0.1 and parity["top1_agreement"] > 0.9
    assert parity["adapter_effect"] > 0.2
    drift = record["drift_vs_trained"]["rel_logit_diff"]  # 4-bit base + adapter: the model as trained
    assert drift > parity["rel_logit_diff"]
    assert isinstance(record["stops"], bool) and record["smoke"]["budget"] == 64


def test_merged_fp32_is_exact_and_overwrite_rules(runs, tmp_path):
    from fastsft.errors import ExportError
    from fastsft.export import export_run

    dest = tmp_path / "m32"
    out = export_run(runs["fp"], fmt="merged", to=dest, dtype="fp32")
    record = json.loads((out / "export.json").read_text())
    assert record["parity"]["rel_logit_diff"] < 1e-5
    assert (
        record["drift_vs_trained"]["rel_logit_diff"] == record["parity"]["rel_logit_diff"]
    )  # trained in 16-bit

    before = (out / "export.json").read_text()
    with pytest.raises(ExportError, match="--overwrite"):
        export_run(runs["fp"], fmt="merged", to=dest, dtype="fp32")
    assert (out / "export.json").read_text() == before  # untouched
    export_run(runs["fp"], fmt="adapter", to=dest, overwrite=True)
    assert json.loads((dest / "export.json").read_text())["format"] == "adapter"
    assert not (dest / "config.json").exists()  # the old export was replaced, not mixed in
    assert _no_temp_left(tmp_path)


def _merge_scaled(factor):
    """A wrong merge: the adapter merged with its scaling multiplied by `factor`."""
    from peft.tuners.lora import LoraLayer

    from fastsft.backends import torch_dtype

    def merge(run, dtype):
        model = run.load("fp32")
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.scaling = {k: v * factor for k, v in m.scaling.items()}
        return model.merge_and_unload().to(torch_dtype(dtype))

    return merge


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param("bf16", marks=pytest.mark.slow),  # 11 s: bf16 and fp16 merges on the CPU
        pytest.param("fp16", marks=pytest.mark.slow),  # 8 s
        "fp32",
    ],
)
def test_parity_passes_a_correct_merge_and_fails_a_wrong_one(runs, tmp_path, monkeypatch, dtype):
    from fastsft import export
    from fastsft.backends.transformers import load_base
    from fastsft.errors import ExportError
    from fastsft.export import merged

    out = export.export_run(runs["fp"], fmt="merged", to=tmp_path / "ok", dtype=dtype)
    p = json.loads((out / "export.json").read_text())["parity"]
    assert p["passed"] and p["reproduction_error"] < 0.1 and p["top1_agreement"] > 0.95, p
    assert p["floor"] < p["rel_logit_diff"] < p["tolerance"] or dtype == "fp32"
    for wrong, what in (
        (lambda run, dt: load_base(run.base_path, dt), "adapter not applied"),
        (_merge_scaled(2.0), "scaling doubled"),
        (_merge_scaled(0.5), "scaling halved"),
    ):
        monkeypatch.setattr(merged, "merge", wrong)
        with pytest.raises(ExportError, match="missing or scaled wrong"):
            export.export_run(runs["fp"], fmt="merged", to=tmp_path / "bad", dtype=dtype)
        assert not (tmp_path / "bad").exists(), what


def test_failed_export_leaves_nothing(runs, tmp_path, monkeypatch):
    from fastsft import export
    from fastsft.backends.transformers import load_base
    from fastsft.errors import ExportError
    from fastsft.export import gguf, merged

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merged, "smoke_generation", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_run(runs["fp"], fmt="merged", to=tmp_path / "a", dtype="bf16")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setattr(merged, "merge", lambda run, dt: load_base(run.base_path, dt))  # a parity failure
    with pytest.raises(ExportError, match="tolerance"):
        export.export_run(runs["fp"], fmt="merged", to=tmp_path / "b", dtype="bf16")
    assert list(tmp_path.iterdir()) == []

    # overwrite + failure: the previous export survives
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("old")
    (tmp_path / "c" / "export.json").write_text("{}")  # an earlier export: --overwrite may replace it
    monkeypatch.setattr(gguf, "verify_gguf", boom)
    with pytest.raises(RuntimeError):
        export.export_run(runs["fp"], fmt="gguf", to=tmp_path / "c", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert (tmp_path / "c" / "keep.txt").read_text() == "old"


def test_export_to_never_replaces_a_run_or_other_files(runs, tmp_path):
    """--to X --overwrite: X must not be the run, hold it, hold any run, or hold anything but an export."""
    from fastsft.errors import ExportError
    from fastsft.export import export_run

    run = runs["fp"]
    before = sorted(p.name for p in run.iterdir())
    for to, match in (
        (run, "is the run being exported"),
        (run.parent, "a folder that holds it"),
        (run / "adapter", "not a fastsft export"),
    ):
        with pytest.raises(ExportError, match=match):
            export_run(run, fmt="adapter", to=to, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == before
    project = tmp_path / "project"
    (project / "runs" / "r1").mkdir(parents=True)
    (project / "main.py").write_text("code")
    (project / "export.json").write_text("{}")  # even one that looks like an export
    for f in ("recipe.toml", "run.json"):
        (project / "runs" / "r1" / f).write_text("")
    with pytest.raises(ExportError, match="not a fastsft export"):
        export_run(run, fmt="adapter", to=project, overwrite=True)
    assert (project / "main.py").read_text() == "code"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ExportError, match="symbolic link"):
        export_run(run, fmt="adapter", to=link)


def test_stale_export_folders_are_cleaned_and_a_full_disk_is_an_error(runs, tmp_path, monkeypatch):
    import errno
    import subprocess
    import sys

    from fastsft import export
    from fastsft.errors import ExportError
    from fastsft.export import adapter

    dead = int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        ).stdout
    )
    (tmp_path / f".a.tmp-{dead}-x1").mkdir()  # a killed export's leftovers
    (tmp_path / f".a.old-{dead}-x2").mkdir()
    out = export.export_run(runs["fp"], fmt="adapter", to=tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter, "model_card", full)
    with pytest.raises(
        ExportError, match="the disk is full; nothing was written and the previous export is kept"
    ):
        export.export_run(runs["fp"], fmt="adapter", to=out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and (out / "export.json").exists()


def test_export_checks_free_space_first(runs, tmp_path, monkeypatch):
    """A merged export that would not fit is refused before anything is loaded or written."""
    import shutil
    from collections import namedtuple

    from fastsft import export, limits
    from fastsft.errors import ExportError
    from fastsft.export import merged

    need = export.export_bytes(export.read_run(runs["fp"]), "fp32")
    assert export.export_bytes(export.read_run(runs["fp"]), "bf16") < need
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        limits.shutil, "disk_usage", lambda p: usage(need * 4, need * 4 - need // 2, need // 2)
    )
    loaded = []
    monkeypatch.setattr(merged, "merge", lambda *a, **k: loaded.append(1))
    with pytest.raises(
        ExportError,
        match=r"the merged export \(fp32\) needs about .* GiB in .*, but only .* GiB is free\. .*another --to",
    ):
        export.export_run(runs["fp"], fmt="merged", to=tmp_path / "m", dtype="fp32")
    assert not loaded and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(limits.shutil, "disk_usage", shutil.disk_usage)


def test_bad_arguments(runs, tmp_path):
    from fastsft.errors import ExportError
    from fastsft.export import export_run

    with pytest.raises(ExportError, match="adapter, merged, gguf"):
        export_run(runs["fp"], fmt="onnx")
    with pytest.raises(ExportError, match="bf16, fp16, fp32"):
        export_run(runs["fp"], fmt="merged", dtype="int4")
    with pytest.raises(ExportError, match="no trained adapter"):
        export_run(tmp_path, fmt="merged")


# ----------------------------------------------------------------------------------------------
# adapter
# ----------------------------------------------------------------------------------------------


def test_adapter_export_has_card_and_loads(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft.export import export_run, logits_of, rel_diff

    out = export_run(runs["fp"], fmt="adapter", to=tmp_path / "ad")
    card = (out / "README.md").read_text()
    assert "base_model:" in card and str(runs["model_dir"]) in card
    assert "train_loss" in card and "3.21" in card and "demo.jsonl" in card and "[lora]" in card
    assert not (out / "training_args.bin").exists()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(runs["model_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ref = _base_and_adapter(runs["fp"], runs["model_dir"])
    inputs = _inputs(tok)
    assert rel_diff(logits_of(model, inputs), logits_of(ref, inputs)) < 1e-6


# ----------------------------------------------------------------------------------------------
# gguf
# ----------------------------------------------------------------------------------------------


def unpermute_qk(w, n_head: int, n_head_kv: int | None = None):
    """The inverse of fastsft.export.gguf.permute_qk (llama.cpp's q/k order back to Hugging Face's)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_file(out: Path) -> Path:
    files = list(out.glob("*.gguf"))
    assert len(files) == 1
    return files[0]


def _field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("which,dtype", [("fp", "fp32"), ("qwen2", "bf16")])
def test_gguf_reads_back(runs, tmp_path, which, dtype):
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from fastsft.export import export_run, merge, read_run

    run = runs[which]
    out = export_run(run, fmt="gguf", to=tmp_path / "g", dtype=dtype)
    record = json.loads((out / "export.json").read_text())
    reader = gguf.GGUFReader(str(_gguf_file(out)))
    config = AutoConfig.from_pretrained(read_run(run).base_path)
    arch = "qwen2" if which == "qwen2" else "llama"
    assert _field(reader, "general.architecture") == arch
    assert record["permuted_qk"] is (arch == "llama")
    assert _field(reader, f"{arch}.block_count") == config.num_hidden_layers
    assert _field(reader, f"{arch}.attention.head_count_kv") == config.num_key_value_heads
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and tokens[5] == tok.convert_ids_to_tokens(5)
    assert len(_field(reader, "tokenizer.ggml.merges")) > 100
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")

    tensors = {t.name: t for t in reader.tensors}
    n = config.num_hidden_layers
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(n):
        expected |= {
            f"blk.{i}.{s}.weight"
            for s in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
        }
        if arch == "qwen2":
            expected |= {f"blk.{i}.attn_q.bias", f"blk.{i}.attn_k.bias", f"blk.{i}.attn_v.bias"}
    assert set(tensors) == expected

    merged = merge(read_run(run), "fp32").state_dict()

    def back(name):
        t = tensors[name]
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())

    for gname, hf in [
        ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ]:
        w = back(gname)
        assert tuple(w.shape) == tuple(merged[hf].shape)
        if arch == "llama" and "attn_q" in gname:
            w = unpermute_qk(w, config.num_attention_heads)
        elif arch == "llama" and "attn_k" in gname:
            w = unpermute_qk(w, config.num_attention_heads, config.num_key_value_heads)
        want = merged[hf] if dtype == "fp32" else merged[hf].to(torch.bfloat16).float()
        # bf16 of a bf16-merged model vs bf16 of the fp32 merge: at most one rounding step apart
        assert torch.allclose(
            w, want, atol=0 if dtype == "fp32" else 1e-2, rtol=0 if dtype == "fp32" else 1e-2
        ), gname
        if arch == "llama" and "attn_" in gname:
            assert not torch.equal(back(gname), merged[hf])  # the file holds the permuted layout
    assert torch.equal(back("output_norm.weight"), merged["model.norm.weight"])


def test_gguf_loads_in_an_independent_reader_with_the_merged_logits(runs, tmp_path):
    """transformers' own GGUF loader (its reverse q/k permutation, its metadata reading) gives back
    the merged model: same weights, same logits. A q/k layout that only our unpermute undoes fails."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft.export import export_run, logits_of, merge, read_run, rel_diff

    out = export_run(runs["fp"], fmt="gguf", to=tmp_path / "g", dtype="fp32")
    theirs = AutoModelForCausalLM.from_pretrained(
        str(out), gguf_file=_gguf_file(out).name, dtype=torch.float32
    )
    merged = merge(read_run(runs["fp"]), "fp32")
    mine = merged.state_dict()
    for name, w in theirs.state_dict().items():
        if "rotary" in name:
            continue
        assert torch.equal(w, mine[name]), name
    inputs = _inputs(AutoTokenizer.from_pretrained(runs["fp"] / "adapter"))
    assert rel_diff(logits_of(theirs.eval(), inputs), logits_of(merged.eval(), inputs)) < 1e-6


def test_gguf_unsupported_arch(runs, tmp_path, monkeypatch):
    from fastsft import export
    from fastsft.errors import ExportError
    from fastsft.export import gguf

    monkeypatch.setattr(gguf, "GGUF_ARCHS", {"LlamaForCausalLM": ("llama", True)})
    with pytest.raises(ExportError, match="LlamaForCausalLM.*MistralForCausalLM"):
        export.export_run(runs["fp"], fmt="gguf", to=tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


def test_gguf_greedy_matches_llama_cpp(runs, tmp_path):
    from _llama_cpp import import_llama_cpp

    llama_cpp = import_llama_cpp()  # .cache/llama-cpp-python (it was never importable from the venv: skipped)
    from fastsft import use
    from fastsft.chat.templates import chat_ids
    from fastsft.export import export_run

    out = export_run(runs["fp"], fmt="gguf", to=tmp_path / "g", dtype="fp32")
    loaded = use.load_for_use(runs["fp"])
    ids = chat_ids(loaded.tokenizer, [{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    with torch.no_grad():
        hf = loaded.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[
            0, ids.shape[1] :
        ]
    llm = llama_cpp.Llama(model_path=str(_gguf_file(out)), n_ctx=256, verbose=False, logits_all=False)
    got = []
    for tok in llm.generate(ids[0].tolist(), temp=0.0, top_k=1):
        got.append(tok)
        if len(got) == 8:
            break
    assert got == hf.tolist()


# ----------------------------------------------------------------------------------------------
# generate / chat / eval
# ----------------------------------------------------------------------------------------------


def test_generate_from_run_and_from_merged_export(runs, merged_4bit):
    from fastsft import use
    from fastsft.chat.templates import end_of_turn_ids

    a = use.generate(runs["4bit"], PROMPT, max_new_tokens=6)
    b = use.generate(merged_4bit, PROMPT, max_new_tokens=6)
    c = use.generate(runs["fp"], PROMPT, max_new_tokens=6, temperature=0.8)
    assert all(isinstance(x, str) and x for x in (a, b, c))
    model, tok = use.load_for_use(merged_4bit)
    assert end_of_turn_ids(tok)[0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_generate_and_eval_on_a_run_apply_its_adapter(runs, tmp_path):
    """A run's answers and held-out loss are those of base + adapter (PEFT's own loading), and not the
    base model's: a run loaded without its adapter fails here."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastsft import use
    from fastsft.chat.templates import chat_ids

    run, model_dir = runs["fp"], runs["model_dir"]
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    tuned = _base_and_adapter(run, model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def answer(model):
        ids = chat_ids(tok, [{"role": "user", "content": PROMPT}], add_generation_prompt=True)
        with torch.no_grad():
            new = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=eot,
                pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1] :]
        new = new.tolist()
        return tok.decode(new[: new.index(eot)] if eot in new else new, skip_special_tokens=True).strip()

    assert answer(tuned) != answer(base)
    assert use.generate(run, PROMPT, max_new_tokens=8) == answer(tuned)

    conv = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "A banana is yellow."}]
    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps({"messages": conv}) + "\n")
    enc = tok.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.tensor([enc["input_ids"]])
    labels = torch.where(torch.tensor(enc["assistant_masks"]) == 1, ids[0], -100)

    def loss(model):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        return float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100))

    res = use.evaluate(
        run, data_file=data, n_gen=0, json_out=tmp_path / "e.json", console=Console(file=io.StringIO())
    )
    assert res["loss"] == pytest.approx(loss(tuned), rel=1e-5)
    assert abs(loss(tuned) - loss(base)) > 1e-2


def test_chat_keeps_the_conversation(runs, merged_4bit):
    from rich.console import Console

    from fastsft import use

    console = Console(file=io.StringIO(), width=120)
    msgs = use.chat(
        merged_4bit,
        input=io.StringIO("Hi\n\nWhat colour is a cow?\n/exit\nnever read\n"),
        max_new_tokens=4,
        console=console,
    )
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "What colour is a cow?"


def test_eval_run_and_data_file(runs, merged_4bit, tmp_path):
    from rich.console import Console

    from fastsft import use

    console = Console(file=io.StringIO(), width=120)
    res = use.evaluate(runs["fp"], n_gen=3, max_new_tokens=8, console=console)
    assert res["loss"] > 0 and res["perplexity"] == pytest.approx(
        torch.tensor(res["loss"]).exp().item(), rel=1e-6
    )
    assert res["conversations"] == 14 and res["tokens"] > 0  # 5% of the 273 distinct demo rows
    assert 0.0 <= res["compliance"] <= 1.0 and res["generated"] == 3
    saved = json.loads((runs["fp"] / "eval.json").read_text())
    assert saved["loss"] == res["loss"]
    assert "perplexity" in console.file.getvalue()

    # a merged export finds its run's eval split through export.json
    res_m = use.evaluate(merged_4bit, n_gen=0, console=console)
    assert res_m["conversations"] == 14 and res_m["compliance"] is None
    assert not (merged_4bit / "eval.json").exists()

    data = tmp_path / "held.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": PROMPT},
                {"role": "assistant", "content": "A banana is yellow."},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "Where is a cow found?"},
                {"from": "gpt", "value": "You find a cow in the farm."},
            ]
        },
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n")
    res2 = use.evaluate(
        runs["fp"], data_file=data, n_gen=2, max_new_tokens=4, json_out=tmp_path / "e.json", console=console
    )
    assert res2["conversations"] == 1 and (tmp_path / "e.json").exists()
    # any shape training takes, masked as training masked it (sharegpt here), the same loss for the same answer
    sharegpt = tmp_path / "held_sharegpt.jsonl"
    sharegpt.write_text(
        json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": PROMPT},
                    {"from": "gpt", "value": "A banana is yellow."},
                ]
            }
        )
        + "\n"
    )
    res3 = use.evaluate(
        runs["fp"], data_file=sharegpt, n_gen=0, json_out=tmp_path / "e3.json", console=console
    )
    assert res3["tokens"] == res2["tokens"] and res3["loss"] == pytest.approx(res2["loss"], rel=1e-6)
    # a bad row is named as in training
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"held.jsonl line 2: missing field `messages`"):
        use.evaluate(runs["fp"], data_file=data, n_gen=0, json_out=tmp_path / "e4.json", console=console)


def test_eval_scores_the_tokens_training_trains(runs, merged_4bit, tmp_path):
    """One masking path: `eval --data` on a run, and on a model folder without a recipe, scores exactly
    the tokens `fastsft data preview` (training's encoder) marks as trained."""
    from rich.console import Console
    from transformers import AutoTokenizer

    from fastsft import data, use
    from fastsft import recipe as R

    rows = [
        {
            "messages": [
                {"role": "user", "content": PROMPT},
                {"role": "assistant", "content": "A banana is yellow."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What does a cow say?"},
                {"role": "assistant", "content": "A cow says moo."},
                {"role": "user", "content": "And a duck?"},
                {"role": "assistant", "content": "A duck says quack."},
            ]
        },
    ]
    f = tmp_path / "held.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = R.load(runs["fp"] / "recipe.toml").with_overrides([f"data.train={f}", "data.val_ratio=0.0"])
    trained, _ = data.preview_rows(recipe, AutoTokenizer.from_pretrained(runs["fp"] / "adapter"), n=10)
    # every answer of the two-exchange row is trained, with its end-of-turn token
    expected = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in trained)
    assert (
        "A cow says moo." in trained[1]["trained_text"] and "A duck says quack." in trained[1]["trained_text"]
    )
    console = Console(file=io.StringIO(), width=120)
    for ref in (runs["fp"], merged_4bit):
        res = use.evaluate(
            ref,
            data_file=f,
            n_gen=1,
            max_new_tokens=3,
            json_out=tmp_path / "e.json",
            overwrite=True,  # the second ref's numbers replace the first's
            console=console,
        )
        assert res["tokens"] == expected, ref
        assert res["samples"][0]["prompt"].rstrip().endswith("assistant")  # the generation prompt


def test_role_markers():
    from fastsft.chat.templates import ROLE_MARKERS

    assert ROLE_MARKERS.search("fine\nuser: and then")
    assert ROLE_MARKERS.search("x <|im_start|>assistant")
    assert not ROLE_MARKERS.search("A banana is yellow. The user likes it.")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def cli():
    import click

    from fastsft.cli.use import register

    @click.group()
    def main():
        """test group"""

    return register(main)


def test_cli_commands(cli, runs, merged_4bit, tmp_path):
    from click.testing import CliRunner

    runner = CliRunner()
    for cmd in ("export", "generate", "chat", "eval"):
        r = runner.invoke(cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output, cmd

    dest = tmp_path / "ad"
    r = runner.invoke(cli, ["export", str(runs["fp"]), "--format", "adapter", "--to", str(dest)])
    assert r.exit_code == 0, r.output
    assert (dest / "README.md").exists()
    r = runner.invoke(cli, ["export", str(runs["fp"]), "--format", "adapter", "--to", str(dest)])
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        cli, ["export", str(runs["fp"]), "--format", "adapter", "--to", str(dest), "--overwrite"]
    )
    assert r.exit_code == 0, r.output

    r = runner.invoke(cli, ["generate", str(merged_4bit), "--prompt", PROMPT, "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["chat", str(merged_4bit), "--max-new-tokens", "3"], input="hello\n/exit\n")
    assert r.exit_code == 0 and "model>" in r.output, r.output
    out = tmp_path / "ev.json"
    r = runner.invoke(
        cli,
        [
            "eval",
            str(merged_4bit),
            "--data",
            str(runs["fp"].parent.parent / "x.jsonl"),
            "--json-out",
            str(out),
        ],
    )
    assert r.exit_code == 2 and "no such data file" in r.output
    r = runner.invoke(
        cli, ["eval", str(runs["fp"]), "-n", "1", "--max-new-tokens", "4", "--json-out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["perplexity"] > 1
    r = runner.invoke(cli, ["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert r.exit_code == 2 and "no such folder" in r.output

    # --tools: checked like a data row's tools column, then written into the prompt by the template
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}]))
    bad = tmp_path / "bad_tools.json"
    bad.write_text(json.dumps([{"description": "no name"}]))
    r = runner.invoke(cli, ["generate", str(runs["fp"]), "--prompt", "x", "--tools", str(bad)])
    assert r.exit_code == 2 and "bad_tools.json: `tools` item 1 has no function `name`" in r.output, r.output
    r = runner.invoke(
        cli, ["generate", str(runs["fp"]), "--prompt", PROMPT, "--tools", str(tools), "--max-new-tokens", "3"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        cli, ["chat", str(runs["fp"]), "--tools", str(tools), "--max-new-tokens", "3"], input="hello\n/exit\n"
    )
    assert r.exit_code == 0 and "model>" in r.output, r.output


def test_generation_prompt_carries_the_tools(runs):
    from fastsft import use
    from fastsft.chat.templates import chat_ids

    loaded = use.load_for_use(runs["fp"])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": PROMPT}]
    with_tools = loaded.tokenizer.decode(
        chat_ids(loaded.tokenizer, msgs, add_generation_prompt=True, tools=tools)[0]
    )
    without = loaded.tokenizer.decode(chat_ids(loaded.tokenizer, msgs, add_generation_prompt=True)[0])
    assert "get_weather" in with_tools and "<tools>" in with_tools and "get_weather" not in without
    assert with_tools.endswith(without[without.index(PROMPT) :])  # the same conversation after the tools


def _damaged_copy(runs, tmp_path, damage):
    import shutil

    run = tmp_path / "received"
    shutil.copytree(runs["fp"], run)
    damage(run / "adapter")
    return run


def _truncate(adapter):
    f = adapter / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _nan(adapter):
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    name = sorted(n for n in tensors if "lora_B" in n)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, f)
    (adapter / "nan-tensor").write_text(name)


@pytest.mark.parametrize(
    "damage, said",
    [
        (_truncate, "adapter_model.safetensors cannot be read (SafetensorError"),
        (
            lambda a: (a / "adapter_config.json").write_text('{"r": 8,'),
            "adapter_config.json cannot be read as JSON",
        ),
        (lambda a: (a / "adapter_config.json").write_text("[1]"), "adapter_config.json is not a JSON object"),
        (_nan, "the adapter holds NaN values in {nan}: training diverged"),
    ],
)
def test_a_damaged_adapter_is_named_before_anything_loads(runs, tmp_path, damage, said):
    """A truncated adapter_model.safetensors or a broken adapter_config.json was a traceback from PEFT, and
    an adapter holding NaN was blamed on the GGUF read-back (#37)."""
    from click.testing import CliRunner

    from fastsft.cli.main import main

    run = _damaged_copy(runs, tmp_path, damage)
    nan = (run / "adapter" / "nan-tensor").read_text() if (run / "adapter" / "nan-tensor").exists() else ""
    for args in (["export", run, "--format", "gguf", "--dtype", "q8_0"], ["generate", run, "--prompt", "hi"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        out = " ".join(result.output.split())
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exc_info
        assert said.format(nan=nan) in out, out
        assert "read-back" not in out and not (run / "export-gguf").exists()


def test_a_read_only_destination_is_not_called_a_full_disk(runs, tmp_path, monkeypatch):
    """An export to a read-only file system said the disk was full (its free space reads 0)."""
    import errno

    from fastsft import export, files, limits
    from fastsft.errors import ExportError, RunDirError

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkdtemp", read_only)
    with pytest.raises(ExportError, match="the file system is read-only; nothing was written") as e:
        export.export_run(runs["fp"], fmt="merged", to=tmp_path / "m")
    assert "full" not in str(e.value) and "space" not in str(e.value)
    monkeypatch.undo()

    class ReadOnly:
        f_flag = limits.os.ST_RDONLY

    monkeypatch.setattr(limits.os, "statvfs", lambda p: ReadOnly())
    with pytest.raises(RunDirError, match="is on a read-only file system"):
        limits.check_disk(tmp_path, 10, "the run")


def test_a_k_quant_without_llama_cpp_is_refused_before_the_run_is_read(runs, tmp_path, monkeypatch):
    """The K-quant refusal (no llama-cpp-python) came after the model was loaded and merged."""
    import sys

    from fastsft.errors import ExportError
    from fastsft.export import transaction

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    read = []
    monkeypatch.setattr(transaction, "read_run", lambda *a, **k: read.append(1))
    with pytest.raises(ExportError, match="llama-cpp-python cannot be imported here"):
        transaction.export_run(runs["fp"], fmt="gguf", to=tmp_path / "g", dtype="q4_k_m")
    assert not read
