"""`pytest benchmarks -k context`: the longest Llama-3.1-8B QLoRA sequence at batch 1 per GPU size, AS
SIMULATED by `fastsft plan` (meta tensors on the CPU; no GPU ran these), against Unsloth's published
table. Writes context.json, context.md, context.svg to `_bench.results_folder("context")`: the git-ignored
benchmarks/results/scratch/context/, or with FASTSFT_BENCH_UPDATE=1 a new benchmarks/results/<date>-context/
(the committed figures: benchmarks/results/2026-12-07-context/). By default only the 24 GiB row is searched
(the headline, and what CI can afford: each simulated step of the 8B model takes minutes on a busy CPU);
FASTSFT_CONTEXT_SIZES="8,12,16,24,40,48,80" makes the whole table. Opt-in: FASTSFT_BENCH_CONTEXT=1 (or
FASTSFT_CONTEXT_SIZES) runs it.

Setup of Unsloth's table: Llama 3.1 8B Instruct, 4-bit QLoRA on q, k, v, o, gate, up, down, r = 32,
batch 1. Columns: stock HF (transformers + PEFT + bitsandbytes, FA2 memory, transformers 4.47's stock
loss, plain checkpointing, 8-bit AdamW), one per fastsft lever set (`LEVER_SETS`: its linear loss + the
levers), Unsloth and HF + FA2 as published. Each lever set's slope (GiB per 10K tokens, between the
8,192- and 65,536-token steps the search simulates anyway) is printed and written. The figure compared
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

SIZES = [int(s) for s in os.environ.get("FASTSFT_CONTEXT_SIZES", "24").split(",")]
# column -> the levers of that fastsft column (the 2026-12-06 table's set, then every lever the plan has)
LEVER_SETS = {
    "fastsft_2026_12_06": {k: v for k, v in LEVERS.items() if k != "tiled_layer"},
    "fastsft_tiled_layer": dict(LEVERS),  # every lever of fit's ladder (tiled_layer = 16 since 2026-12-07)
}
A, B = 8192, 65536  # the lengths of the slope (simulated by max_length's first guess anyway)


def _setups():
    cfg = load_config("meta-llama/Llama-3.1-8B-Instruct")
    lora = LoraConfig(r=32, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    hf = Setup(cfg, lora=lora, optim="adamw_8bit", loss="hf-2024")
    fast = {
        name: Setup(cfg, lora=lora, optim="adamw_8bit", loss="fastsft-linear", **levers)
        for name, levers in LEVER_SETS.items()
    }
    return hf, fast


def _svg(rows) -> str:
    w, h, pad = 640, 400, 60
    ymax = max(max(*(r[k] for k in LEVER_SETS), r["unsloth_published"] or 0) for r in rows)
    x = lambda gb: pad + (gb - 8) / 72 * (w - 2 * pad)  # noqa: E731
    y = lambda v: h - pad - v / ymax * (h - 2 * pad)  # noqa: E731
    lines = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<text x="{pad}" y="20">Llama-3.1-8B QLoRA r=32, batch 1: longest sequence (SIMULATED by fastsft plan)</text>',
    ]
    series = [
        ("stock HF (sim.)", "hf_simulated", "#888"),
        ("fastsft 2026-12-06 levers (sim.)", "fastsft_2026_12_06", "#e90"),
        ("fastsft + tiled_layer (sim.)", "fastsft_tiled_layer", "#c33"),
        ("Unsloth (published)", "unsloth_published", "#36c"),
        ("HF+FA2 (published)", "hf_published", "#999"),
    ]
    for i, (name, key, color) in enumerate(series):
        pts = " ".join(f"{x(r['gpu_gib']):.1f},{y(r[key]):.1f}" for r in rows if r[key])
        if len(rows) == 1 or not pts:
            pts = " ".join(
                f"{x(r['gpu_gib']) + d:.1f},{y(r[key]):.1f}" for r in rows if r[key] for d in (-3, 3)
            )
        dash = ' stroke-dasharray="5,4"' if "published" in key else ""
        lines.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        lines.append(f'<text x="{pad + 10}" y="{40 + 16 * i}" fill="{color}">{name}</text>')
    for r in rows:
        lines.append(f'<text x="{x(r["gpu_gib"]) - 8:.1f}" y="{h - pad + 18}">{r["gpu_gib"]}</text>')
    lines.append(f'<text x="{w / 2 - 40}" y="{h - 15}">GPU memory (GiB)</text></svg>')
    return "\n".join(lines)


@pytest.mark.context
def test_context_table():
    if os.environ.get("FASTSFT_BENCH_CONTEXT") != "1" and not os.environ.get("FASTSFT_CONTEXT_SIZES"):
        # two lever sets of the 8B step, tiled_layer's simulated tile by tile: tens of minutes on 2 cores;
        # the 24 GiB headline is held in every CI run by tests/plan/test_plan.py (8B levers past Unsloth)
        pytest.skip(
            "the context table takes tens of minutes: FASTSFT_BENCH_CONTEXT=1 (or FASTSFT_CONTEXT_SIZES) runs it"
        )
    hf, fast = _setups()
    rows = []
    t0 = time.time()
    hf_cache = {}  # simulated steps, shared by the GPU sizes of one setup
    caches = {name: {} for name in fast}
    for gb in SIZES:
        unsloth, hf_pub = UNSLOTH_TABLE[gb]
        print(f"context: {gb} GiB ({time.time() - t0:.0f} s)", flush=True)
        row = {"gpu_gib": gb, "hf_simulated": max_length(hf, gb * GiB, cache=hf_cache)}
        for name, setup in fast.items():
            row[name] = max_length(setup, gb * GiB, cache=caches[name])
        row.update(unsloth_published=unsloth, hf_published=hf_pub)
        rows.append(row)
    took = time.time() - t0
    slopes = {
        name: round((c[B] - c[A]) / GiB / ((B - A) / 10_000), 3)
        for name, c in caches.items()
        if A in c and B in c
    }
    write_outputs(rows, took, slopes)
    for r in rows:
        # issue 36's goal: twice Unsloth's published figure (157,000 at 24 GiB, 686,000 at 80 GiB) with
        # every lever of fit's ladder; the 2026-12-06 levers alone are level with Unsloth (0.97-1.05x)
        if r["gpu_gib"] in (24, 80):
            assert r["fastsft_tiled_layer"] >= 2 * r["unsloth_published"] * 0.999
        assert r["fastsft_tiled_layer"] > r["fastsft_2026_12_06"]
    if len(slopes) == 2:
        assert slopes["fastsft_tiled_layer"] < slopes["fastsft_2026_12_06"]


def write_outputs(rows: list[dict], took: float, slopes: dict | None = None) -> Path:
    """The ratios of `rows`, then context.md / .json / .svg in `results_folder("context")` (never the
    committed folder unless FASTSFT_BENCH_UPDATE=1 asks for a new one)."""
    slopes = slopes or {}
    fast = [n for n in LEVER_SETS if n in rows[0]]
    for r in rows:
        r["hf_sim_vs_published"] = (
            round(r["hf_simulated"] / r["hf_published"], 3) if r["hf_published"] else None
        )
        for name in fast:
            r[f"{name}_vs_unsloth"] = round(r[name] / r["unsloth_published"], 3)
    head = (
        "| GPU GiB | stock HF (simulated) | HF+FA2 (published) | sim/pub | "
        + " | ".join(f"{n} (simulated) | /Unsloth" for n in fast)
        + " | Unsloth (published) |"
    )
    md = [
        f"# Longest Llama-3.1-8B QLoRA sequence, batch 1: a SIMULATION ({took:.0f} s on {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f})",
        "",
        "Lever sets: " + "; ".join(f"{n} = {json.dumps(LEVER_SETS[n])}" for n in fast),
        "",
        "Slope, GiB per 10K tokens (steps of 8,192 and 65,536 tokens): "
        + ", ".join(f"{n} {v}" for n, v in slopes.items()),
        "",
        head,
        "|" + "---|" * (5 + 2 * len(fast)),
    ]
    for r in rows:
        hp = f"{r['hf_published']:,}" if r["hf_published"] else "OOM"
        ratio = r["hf_sim_vs_published"] or "-"
        cols = " | ".join(f"{r[n]:,} | {r[n + '_vs_unsloth']}" for n in fast)
        md.append(
            f"| {r['gpu_gib']} | {r['hf_simulated']:,} | {hp} | {ratio} | {cols} | {r['unsloth_published']:,} |"
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
        "lever_sets": LEVER_SETS,
        "slope_gib_per_10k_tokens": slopes,
        "rows": rows,
    }
    (out / "context.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "context.svg").write_text(_svg(rows))
    return out
