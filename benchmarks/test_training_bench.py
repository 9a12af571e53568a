"""End-to-end QLoRA training: fastsft (both backends) against stock transformers and Unsloth.

Models are built from the public configs of Mistral-7B-v0.3, Llama-3.1-8B and Qwen2.5-0.5B with random
weights (the GPU machines have no network; speed and memory do not depend on the weights' values),
saved once under $FASTSFT_BENCH_CACHE (default ~/.cache/fastsft-bench), then loaded through each
row's normal loading path. Tokenizer: fastsft's built-in byte-level BPE (its ids are a subset of
every vocabulary; the lm_head and loss still span the model's full vocabulary). Data: rows of random
demo words, each cut to exactly seq_len tokens; loss on every token; batch 1; gradient checkpointing.
Each row runs in its own process (see _train_worker.py); tokens/s is measured after warm-up steps.

Without a GPU the fastsft-transformers and transformers rows run 3 steps on the built-in tiny model (a
smoke pass) and their first losses are compared; nothing is measured.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _bench import GPU, QUICK

WORKER = Path(__file__).with_name("_train_worker.py")

MODELS = {
    # public configs (hidden, intermediate, layers, heads, kv heads, vocab, rope theta, tied embeddings)
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1e6,
                     tie_word_embeddings=True, max_position_embeddings=32768)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1e6,
                   max_position_embeddings=32768)),
    "llama-3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                   max_position_embeddings=131072)),
}  # fmt: skip
ROWS = ["fastsft", "fastsft-transformers", "transformers", "unsloth"]

if GPU:
    PLAN = [("mistral-7b", 2048)] if QUICK else [(m, s) for m in MODELS for s in (1024, 2048, 4096, 8192)]
    STEPS, WARMUP = (8, 3) if QUICK else (12, 4)
else:
    PLAN = [("builtin:tiny-mistral", 64)]
    STEPS, WARMUP = 3, 1
    ROWS = ["fastsft-transformers", "transformers"]


def bench_cache() -> Path:
    return Path(os.environ.get("FASTSFT_BENCH_CACHE", Path.home() / ".cache" / "fastsft-bench"))


def model_dir(name: str) -> Path:
    """The model's folder, built once from its config with random weights."""
    from fastsft.backends import builtin

    tiny = builtin.materialize("builtin:tiny-mistral")
    if name.startswith("builtin:"):
        return builtin.materialize(name)
    folder = bench_cache() / f"{name}-random-v1"
    if (folder / "config.json").exists():
        return folder
    import torch
    import transformers

    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if GPU else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    del model
    tmp.rename(folder)
    return folder


def data_file(tmp: Path, seq_len: int) -> Path:
    from fastsft.backends import builtin

    words = " ".join(r["messages"][-1]["content"] for r in builtin.demo_rows(200)).split()
    rng = random.Random(0)
    path = tmp / f"text-{seq_len}.jsonl"
    with open(path, "w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq_len * 2))}) + "\n")
    return path


@pytest.mark.parametrize("model,seq_len", PLAN, ids=[f"{m}-{s}" for m, s in PLAN])
def test_training(model, seq_len, results, tmp_path):
    folder = model_dir(model)
    data = data_file(tmp_path, seq_len)
    rows = {}
    for row in ROWS:
        out = tmp_path / f"{row}.json"
        proc = subprocess.run(
            [sys.executable, str(WORKER), row, str(folder), str(data), str(seq_len), str(STEPS), str(WARMUP), str(out)],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            results.notes.append(f"{model} {seq_len} {row}: failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        rec = json.loads(out.read_text())
        if "skipped" in rec:
            results.notes.append(f"{model} {seq_len} {row}: skipped ({rec['skipped']})")
            continue
        rows[row] = rec
    assert rows, "no row ran"
    # loss parity: the first step (LoRA B = 0, so the base model's loss) agrees across the rows
    first = {r: rec["losses"][0] for r, rec in rows.items() if rec.get("losses")}
    if len(first) > 1:
        lo, hi = min(first.values()), max(first.values())
        assert hi - lo <= 0.02 * abs(hi) + 1e-3, f"rows disagree on the first loss: {first}"
    base = rows.get("transformers")
    for r, rec in rows.items():
        entry = {
            "model": model, "backend": r, "seq_len": seq_len, "batch": 1, "grad_accum": 1, "lora_r": 16,
            "target_modules": "all-linear", "padding": "none (exact-length rows)", "steps": STEPS,
            "warmup_steps": WARMUP, "loss_impl": rec.get("loss_impl"), "first_losses": rec.get("losses", [])[:3],
            "tokens_per_s": rec.get("tokens_per_s") if GPU else None, "peak_mem_gib": rec.get("peak_mem_gib"),
            "measured": GPU,
        }  # fmt: skip
        if GPU and base and rec.get("tokens_per_s") and base.get("tokens_per_s"):
            entry["speedup_vs_transformers"] = rec["tokens_per_s"] / base["tokens_per_s"]
            entry["mem_vs_transformers"] = rec["peak_mem_gib"] / base["peak_mem_gib"]
        results.e2e.append(entry)
    if not GPU:
        pytest.skip("no GPU: smoke pass only (both rows trained, first losses agree), nothing measured")
