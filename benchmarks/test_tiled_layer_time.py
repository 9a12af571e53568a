"""`pytest benchmarks -k tiled_layer_time`: the time cost of the `tiled_layer` lever on the CPU, tokens/s of
one checkpointed LoRA training step with and without it (one run each, same model and batch, in one
process), and the ratio. A small Llama (CI-friendly: seconds); the device and the machine's load are
written with the figures, to FASTSFT_BENCH_RESULTS or else a scratch folder (never the committed results).

What it measures is the lever's overhead where it has nothing to win (a short sequence: the CPU has no
memory to save): per-tile recomputation of the per-token work in backward, more, smaller matmuls.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fastsft.levers import tiled_layer

from _bench import device_name, loadavg

SEQ, BATCH, TILES = 1024, 1, 8


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=2048,
        attn_implementation="sdpa",
    )
    m = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def _tokens_per_s(model, ids) -> tuple[float, float]:
    model(input_ids=ids[:, :64], labels=ids[:, :64]).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    took = time.perf_counter() - t0
    return ids.numel() / took, loss.item()


@pytest.mark.cpu
def test_tiled_layer_time(tmp_path):
    ids = torch.randint(0, 2048, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    plain, loss0 = _tokens_per_s(_model(), ids)
    m = _model()
    assert tiled_layer.install(m, TILES) == 4
    tiled, loss1 = _tokens_per_s(m, ids)
    assert abs(loss1 - loss0) < 1e-4
    row = {
        "device": device_name(),
        "load": loadavg(),
        "torch_threads": torch.get_num_threads(),
        "seq_len": SEQ,
        "batch": BATCH,
        "tiles": TILES,
        "plain_tokens_per_s": round(plain, 1),
        "tiled_layer_tokens_per_s": round(tiled, 1),
        "tiled_over_plain": round(tiled / plain, 3),
        "runs": 1,
    }
    print(
        f"\ntiled_layer time, {row['device']}, load {row['load']}: plain {plain:,.0f} tok/s, "
        f"tiled_layer={TILES} {tiled:,.0f} tok/s, ratio {tiled / plain:.3f} (one run each)"
    )
    out = Path(os.environ["FASTSFT_BENCH_RESULTS"]) if os.environ.get("FASTSFT_BENCH_RESULTS") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiled_layer_time.json").write_text(json.dumps(row, indent=2) + "\n")
