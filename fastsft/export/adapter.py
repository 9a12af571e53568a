"""The adapter export: the PEFT adapter and tokenizer, with a README.md model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastsft.backends.common import tokenizer_from
from fastsft.errors import ExportError
from fastsft.export.read import RunInfo
from fastsft.rundir import RECIPE

# Files of a Trainer's adapter folder that are not part of an adapter (pickles, optimizer state).
_ADAPTER_SKIP = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


def export_adapter(run: RunInfo, out: Path, *, console=None) -> dict:
    if run.full:
        raise ExportError(
            f'{run.path} is a full fine-tune ([train] method = "full"): it has no adapter, its model/ is the '
            "whole trained model. Export --format merged (or gguf) instead."
        )
    copied = []
    for f in sorted(run.adapter.iterdir()):
        if f.name in _ADAPTER_SKIP or f.name.startswith("."):
            continue
        if f.is_dir():
            shutil.copytree(f, out / f.name)
        else:
            shutil.copy2(f, out / f.name)
        copied.append(f.name)
    if not any(n.startswith("tokenizer") for n in copied):
        tok = tokenizer_from(run.base_path, policy=run.policy)
        tok.save_pretrained(str(out))
    if (run.path / RECIPE).exists():
        shutil.copy2(run.path / RECIPE, out / RECIPE)
    model_card(run).save(out / "README.md")
    return {"files": sorted(p.name for p in out.iterdir())}


_CARD_METRICS = (
    "global_step",
    "train_loss",
    "tokens",
    "train_seconds",
    "tokens_per_s",
    "peak_mem_gib",
    "device",
    "backend",
)


def model_card(run: RunInfo):
    """The adapter export's README.md: a `huggingface_hub.ModelCard` whose metadata (library, base
    model, tags) the hub reads, and a body saying what was trained, on what, how well, and how to load
    it. A base fastsft makes locally (built-in, GGUF) is not named as `base_model` (no hub id)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = run.recipe.model.name if run.recipe is not None else run.base_path
    made_here = base.startswith(("builtin:", "package:")) or base.lower().endswith(".gguf")
    meta = ModelCardData(
        library_name="peft", base_model=None if made_here else base, tags=["fastsft", "lora", "sft"]
    )
    body = [
        *_card_summary(run, base),
        *_card_data(run),
        *_card_metrics(run),
        *_card_use(run, base, made_here),
    ]
    if (run.path / RECIPE).exists():
        recipe_text = (run.path / RECIPE).read_text(encoding="utf-8").strip()
        body += ["## Recipe", "", "```toml", recipe_text, "```", ""]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body))


def _card_summary(run: RunInfo, base: str) -> list[str]:
    cfg = json.loads((run.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, set, tuple)):  # PEFT records full module paths for "all-linear"
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    return [
        f"# LoRA adapter for {base}",
        "",
        f"Fine-tuned with fastsft (supervised fine-tuning, LoRA r={cfg.get('r')}, "
        f"alpha={cfg.get('lora_alpha')}, "
        f"targets {', '.join(targets) if isinstance(targets, list) else targets}).",
        "",
        "## Base model",
        "",
        f"- name: `{base}`",
        f"- loaded from: `{run.base_path}`",
        f"- trained in 4-bit (QLoRA): {run.load_in_4bit}",
        "",
    ]


def _card_data(run: RunInfo) -> list[str]:
    data = run.run_json.get("data") or {}
    result = run.run_json.get("result") or {}
    lines = ["## Data", ""]
    if run.recipe is not None:
        lines.append(f"- train: `{run.recipe.data.train}`")
        if run.recipe.data.eval:
            lines.append(f"- eval: `{run.recipe.data.eval}`")
    if data.get("fingerprint"):
        lines.append(f"- fingerprint: `{data['fingerprint']}`")
    summary = data.get("summary") or (result.get("data") or {}).get("summary")
    if summary:
        lines.append(f"- {summary}")
    return [*lines, ""]


def _card_metrics(run: RunInfo) -> list[str]:
    result = run.run_json.get("result") or {}
    metrics = {k: result.get(k) for k in _CARD_METRICS if result.get(k) is not None}
    if not metrics:
        return ["## Metrics", "", "No metrics recorded (run.json has no result).", ""]
    lines = ["## Metrics", "", "| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return [*lines, ""]


def _card_use(run: RunInfo, base: str, made_here: bool) -> list[str]:
    lines = ["## Use", ""]
    if made_here:
        lines += [
            f"The base, `{base}`, is a model fastsft makes locally (a built-in tiny model, or a GGUF file "
            f"converted to safetensors) into its cache; on the training machine that is the folder "
            f"`{run.base_path}`, which `fastsft run` with the recipe below makes again. Load it as:",
            "",
        ]
    return [
        *lines,
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{run.base_path if made_here else base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
