"""`fit` on a GPU (benchmarks/gpu_check.sh's `fit` part): the Llama-3.2-1B-shape QLoRA (random weights)
trained with `fastsft run` at three lengths on a GPU held to 24 GiB (torch.cuda.set_per_process_memory_
fraction; fit plans for the same 24 GiB), fit = "auto": what fit changed, the planned reserved peak
beside torch.cuda.max_memory_reserved() after the first optimizer steps (run.json's `fit`). Writes
summary.json and summary.md to FASTSFT_BENCH_OUT (the plan-vs-real table)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

GPU = torch.cuda.is_available()
GIB = 2**30
CARD = 24 * GIB
LENGTHS = [int(x) for x in os.environ.get("FASTSFT_FIT_LENGTHS", "4096,16384,65536").split(",")]

pytestmark = [pytest.mark.fit, pytest.mark.gpu]


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (the plan against the real peak)")
def test_plan_against_real_under_24_gib(tmp_path, monkeypatch):
    from rich.console import Console
    from test_training_bench import data_file, model_dir

    from fastsft import machine, plan
    from fastsft import recipe as recipe_mod
    from fastsft.run import train

    torch.cuda.set_per_process_memory_fraction(
        min(1.0, CARD / torch.cuda.get_device_properties(0).total_memory)
    )
    monkeypatch.setattr(plan, "free_memory", lambda: CARD)  # the card it stands for
    folder = model_dir("llama-3.2-1b")
    out = Path(os.environ.get("FASTSFT_BENCH_OUT", tmp_path / "out"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in LENGTHS:
        toml = tmp_path / f"r{length}.toml"
        toml.write_text(
            f"""[model]
name = "{folder}"
load_in_4bit = true
backend = "transformers"
[lora]
r = 32
lora_alpha = 32
target_modules = "all-linear"
[data]
train = "{data_file(tmp_path, length)}"
max_length = {length}
[train]
max_steps = 2
per_device_train_batch_size = 2
gradient_accumulation_steps = 1
optim = "adamw_8bit"
save_strategy = "no"
logging_steps = 1
"""
        )
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        log = io.StringIO()
        row = {"max_length": length}
        try:
            res = train.run(
                recipe_mod.load(toml), output_dir=tmp_path / f"run{length}", console=Console(file=log)
            )
            fit = json.loads((res.run_dir / "run.json").read_text()).get("fit") or {}
            row |= {
                "changes": " ".join(f"{c['key'].split('.')[-1]}={c['to']}" for c in fit.get("changes", [])),
                "planned_gib": fit.get("planned_reserved_gib"),
                "measured_gib": fit.get("measured_reserved_gib"),
                "ratio": fit.get("measured_over_planned"),
                "warning": fit.get("warning", ""),
            }
        except Exception as e:  # noqa: BLE001 - an out-of-memory is a figure too
            row |= {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        (out / "summary.json").write_text(
            json.dumps(
                {"device": machine.device_description(), "versions": machine.versions(), "fit": rows},
                indent=1,
            )
        )
        md = [
            "| max_length | fit changed | planned GiB | measured GiB | measured/planned | note |",
            "|---|---|---|---|---|---|",
        ]
        md += [
            f"| {r['max_length']} | {r.get('changes', '')} | {r.get('planned_gib')} | {r.get('measured_gib')} | "
            f"{r.get('ratio')} | {r.get('error') or r.get('warning', '')} |"
            for r in rows
        ]
        (out / "summary.md").write_text(
            "# fit: plan against real, Llama-3.2-1B shape QLoRA, 24 GiB\n\n" + "\n".join(md) + "\n"
        )
    assert all("error" not in r for r in rows), rows
    assert all(r["ratio"] is not None and r["ratio"] <= 1.05 for r in rows), rows
