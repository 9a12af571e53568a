"""`pytest benchmarks -k context`: the longest Llama-3.1-8B QLoRA sequence at batch 1 per GPU size, AS
SIMULATED by `fastsft plan` (meta tensors on the CPU; no GPU ran these), against Unsloth's published
table. Writes context.json, context.md, context.svg to `_bench.results_folder("context")`: the git-ignored
benchmarks/results/scratch/context/, or with FASTSFT_BENCH_UPDATE=1 a new benchmarks/results/<date>-context/
(the committed figures: benchmarks/results/2026-12-06-context/).

Setup of Unsloth's table: Llama 3.1 8B Instruct, 4-bit QLoRA on q, k, v, o, gate, up, down, r = 32,
batch 1. Columns: stock HF (transformers + PEFT + bitsandbytes, FA2 memory, transformers 4.47's stock
loss, plain checkpointing, 8-bit AdamW), fastsft (its linear loss + the levers expandable_segments,
offload_checkpoints, tiled_mlp = 8, frozen_16bit), Unsloth and HF + FA2 as published. The figure compared
is the caching allocator's peak reserved memory + the CUDA context (what Unsloth's notebooks report:
torch.cuda.max_memory_reserved).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from peft import LoraConfig

from fastsft.plan import LEVERS, UNSLOTH_TABLE, Setup, max_length
from fastsft.plan.device import GiB
from fastsft.plan.model import load_config

from _bench import results_folder

SIZES = [8, 12, 16, 24, 40, 48, 80]


def _setups():
    cfg = load_config("meta-llama/Llama-3.1-8B-Instruct")
    lora = LoraConfig(r=32, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    hf = Setup(cfg, lora=lora, optim="adamw_8bit", loss="hf-2024")
    fast = Setup(cfg, lora=lora, optim="adamw_8bit", loss="fastsft-linear", **LEVERS)
    return hf, fast


def _svg(rows) -> str:
    w, h, pad = 640, 400, 60
    ymax = max(max(r["fastsft"], r["unsloth_published"] or 0) for r in rows)
    x = lambda gb: pad + (gb - 8) / 72 * (w - 2 * pad)  # noqa: E731
    y = lambda v: h - pad - v / ymax * (h - 2 * pad)  # noqa: E731
    lines = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<text x="{pad}" y="20">Llama-3.1-8B QLoRA r=32, batch 1: longest sequence (SIMULATED by fastsft plan)</text>',
    ]
    series = [
        ("stock HF (sim.)", "hf_simulated", "#888"),
        ("fastsft (sim.)", "fastsft", "#c33"),
        ("Unsloth (published)", "unsloth_published", "#36c"),
        ("HF+FA2 (published)", "hf_published", "#999"),
    ]
    for i, (name, key, color) in enumerate(series):
        pts = " ".join(f"{x(r['gpu_gib']):.1f},{y(r[key]):.1f}" for r in rows if r[key])
        dash = ' stroke-dasharray="5,4"' if "published" in key else ""
        lines.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        lines.append(f'<text x="{pad + 10}" y="{40 + 16 * i}" fill="{color}">{name}</text>')
    for r in rows:
        lines.append(f'<text x="{x(r["gpu_gib"]) - 8:.1f}" y="{h - pad + 18}">{r["gpu_gib"]}</text>')
    lines.append(f'<text x="{w / 2 - 40}" y="{h - 15}">GPU memory (GiB)</text></svg>')
    return "\n".join(lines)


@pytest.mark.context
def test_context_table():
    hf, fast = _setups()
    rows = []
    t0 = time.time()
    hf_cache, fast_cache = {}, {}  # simulated steps, shared by the GPU sizes of one setup
    for gb in SIZES:
        unsloth, hf_pub = UNSLOTH_TABLE[gb]
        print(f"context: {gb} GiB ({time.time() - t0:.0f} s)", flush=True)
        rows.append(
            {
                "gpu_gib": gb,
                "hf_simulated": max_length(hf, gb * GiB, cache=hf_cache),
                "fastsft": max_length(fast, gb * GiB, cache=fast_cache),
                "unsloth_published": unsloth,
                "hf_published": hf_pub,
            }
        )
    took = time.time() - t0
    write_outputs(rows, took)
    row24 = next(r for r in rows if r["gpu_gib"] == 24)
    assert row24["fastsft"] > 78475


def write_outputs(rows: list[dict], took: float) -> Path:
    """The ratios of `rows`, then context.md / .json / .svg in `results_folder("context")` (never the
    committed folder unless FASTSFT_BENCH_UPDATE=1 asks for a new one)."""
    for r in rows:
        r["hf_sim_vs_published"] = (
            round(r["hf_simulated"] / r["hf_published"], 3) if r["hf_published"] else None
        )
        r["fastsft_vs_unsloth"] = round(r["fastsft"] / r["unsloth_published"], 3)
    head = "| GPU GiB | stock HF (simulated) | HF+FA2 (published) | sim/pub | fastsft (simulated) | Unsloth (published) | fastsft/Unsloth |"
    md = [
        f"# Longest Llama-3.1-8B QLoRA sequence, batch 1: a SIMULATION ({took:.0f} s on {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})",
        "",
        head,
        "|" + "---|" * 7,
    ]
    for r in rows:
        hp = f"{r['hf_published']:,}" if r["hf_published"] else "OOM"
        ratio = r["hf_sim_vs_published"] or "-"
        md.append(
            f"| {r['gpu_gib']} | {r['hf_simulated']:,} | {hp} | {ratio} | {r['fastsft']:,} | "
            f"{r['unsloth_published']:,} | {r['fastsft_vs_unsloth']} |"
        )
    text = "\n".join(md)
    print("\n" + text)
    out = results_folder("context")
    out.mkdir(parents=True, exist_ok=True)
    (out / "context.md").write_text(text + "\n")
    meta = {
        "simulated": True,
        "device": "none (meta tensors, CPU)",
        "seconds": round(took, 1),
        "load": os.getloadavg()[0],
        "fastsft_levers": LEVERS,
        "rows": rows,
    }
    (out / "context.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "context.svg").write_text(_svg(rows))
    return out
