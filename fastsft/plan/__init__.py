"""`fastsft plan`: a training step's peak GPU memory, simulated on the CPU before the run.

One step of the recipe's own code path runs on `meta` tensors (shapes, no data, no weights read): the
transformers backend's model built from its config (4-bit NF4 layers, PEFT's kbit preparation, LoRA),
gradient checkpointing, the recipe's loss (fastsft's kernels are custom ops with fake implementations),
attention with FlashAttention-2's memory, the optimizer's state and step, the memory levers. A
`TorchDispatchMode` counts every storage as the CUDA allocator would charge it; the peak plus the CUDA
context is the figure. `--max-length` bisects over simulated steps for the longest sequence that fits.

- tracker.py   live bytes op by op, parts by label, kernel scratch of custom ops
- model.py     the model on meta (bitsandbytes Linear4bit with a meta quant state, PEFT)
- attention.py FA2's memory as custom ops (exact attention on real tensors)
- autocast.py  CUDA autocast's casts for meta tensors
- simulate.py  the step, and the per-layer extrapolation that makes an 8B model take seconds
- device.py    the only constants: CUDA context, allocator rounding
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from fastsft.backends.transformers import lora_config
from fastsft.errors import RecipeError
from fastsft.loss.route import ARCHITECTURES

from . import fit as fit_mod
from .device import CUDA_CONTEXT, MAX_LENGTH, GiB, parse_size
from .fit import device_peak, max_length
from .model import load_config
from .simulate import Setup, simulate

# The HF + FA2 column of Unsloth's table (docs.unsloth.ai/basics/unsloth-benchmarks, Dec 2024): Llama 3.1
# 8B Instruct, 4-bit QLoRA on q, k, v, o, gate, up, down, r = 32, batch 1, padded rows (no padding-free),
# transformers' gradient checkpointing, FlashAttention-2. Unsloth's notebooks train with adamw_8bit.
UNSLOTH_TABLE = {
    8: (2972, None),
    12: (21848, 932),
    16: (40724, 2551),
    24: (78475, 5789),
    40: (153977, 12264),
    48: (191728, 15502),
    80: (342733, 28454),
}
# (Setup field, value) in the order the plan (and `fit = "auto"`, plan/fit.py) adds them: first what costs
# no time (the allocator's setting, the dtype of frozen weights), then what costs time (host copies that
# overlap compute, then more kernel launches); fit.py's docstring gives the measured savings.
# `tiled_layer` (levers/tiled_layer.py) last: exact, its tiles cost kernel launches like the tiled MLP's,
# and it matters only at long lengths (the decoder layer's per-token work in tiles, attention per head
# group); fit tries its tile counts 2 to 16 only when the levers before it do not fit, and keeps a count
# only when it lowers the peak (on a small model its tiles can cost more than they save).
LEVER_ORDER = (
    ("expandable_segments", True),
    ("frozen16", True),
    ("offload_checkpoints", True),
    ("tiled_mlp", 8),
    ("tiled_layer", 16),
)
LEVERS = dict(LEVER_ORDER)
# [train] key of each lever
LEVER_KEYS = {
    "expandable_segments": "expandable_segments",
    "offload_checkpoints": "offload_checkpoints",
    "tiled_mlp": "tiled_mlp",
    "frozen16": "frozen_16bit",
    "tiled_layer": "tiled_layer",
}


def setup_from_recipe(recipe, *, baseline: str | None = None) -> Setup:
    """The recipe's step (transformers backend) or, with baseline="hf", the stock setup of Unsloth's table
    on the recipe's model: transformers + PEFT + bitsandbytes QLoRA, the stock loss of transformers 4.47
    (the release of the table's date: float32 logits and a shifted float32 copy of them), plain
    checkpointing, 8-bit AdamW, r = 32 on all linear layers, batch 1."""
    from peft import LoraConfig

    m = recipe.model
    config = load_config(m.name, trust_remote_code=m.trust_remote_code, base_dir=recipe.base_dir)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        m.dtype, torch.bfloat16
    )
    if baseline == "hf":
        lora = LoraConfig(r=32, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        return Setup(
            config,
            dtype=torch.bfloat16,
            load_in_4bit=True,
            lora=lora,
            batch_size=1,
            optim="adamw_8bit",
            loss="hf-2024",
        )
    if baseline is not None:
        raise RecipeError(f"--baseline {baseline!r}: the only baseline is 'hf'")
    t = recipe.train
    kernel = recipe.loss.kernel
    arch = (config.architectures or [""])[0] if getattr(config, "architectures", None) else ""
    if kernel == "auto":
        kernel = (
            "fastsft-linear"
            if (arch in ARCHITECTURES or config.model_type in ("llama", "mistral", "qwen2", "qwen3"))
            else "torch"
        )
    if kernel not in ("fastsft-linear", "torch"):
        raise RecipeError(
            f'[loss] kernel = {kernel!r}: fastsft plan simulates "fastsft-linear" or "torch"; '
            'plan with --set loss.kernel="fastsft-linear"'
        )
    return Setup(
        config,
        dtype=dtype,
        load_in_4bit=m.load_in_4bit,
        method=t.method,
        lora=None if t.method == "full" else lora_config(recipe),
        batch_size=t.per_device_train_batch_size,
        gradient_checkpointing=t.gradient_checkpointing,
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        loss=kernel,
        mixed_precision=dtype != torch.float32,
        offload_checkpoints=t.offload_checkpoints,
        tiled_mlp=t.tiled_mlp,
        tiled_layer=t.tiled_layer,
        frozen16=t.frozen_16bit,
        expandable_segments=t.expandable_segments,
    )


def model_context(setup: Setup) -> int | None:
    """The longest sequence the model takes (its config's max_position_embeddings), or None."""
    n = getattr(setup.config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def choose_levers(setup: Setup, seq_len: int, budget: int) -> dict | None:
    """The levers, added in order of cost (allocator setting, offloaded checkpoints, tiled MLP, 16-bit
    frozen weights), until the step fits; None if even all of them do not."""
    chosen = {}
    for key, value in LEVER_ORDER:
        chosen[key] = value
        if device_peak(replace(setup, **chosen), seq_len)[0] <= budget:
            return chosen
    return None


def plan(
    setup: Setup,
    seq_len: int,
    gpu_memory: int,
    *,
    find_max: bool = False,
    fit: str = "warn",
    accumulation: int = 1,
) -> dict:
    """The plan as one JSON-able dict: peak_bytes (reserved + CUDA context), allocated_bytes, parts,
    fits, the levers that would make it fit, and with `find_max` max_length.

    `fit` (the recipe's [train] fit): with "auto", `lever_savings` (what each change of fit.steps saves,
    cumulatively), `fit` (what a run would change for `gpu_memory`: fit.decide) and `max_length` searched
    with every change applied (the longest max_length a run with fit = "auto" trains: the levers and
    batch 1); otherwise `levers_that_fit` and `max_length` as written."""
    total, p = device_peak(setup, seq_len)
    parts = dict(sorted(p.parts.items(), key=lambda kv: -kv[1]))
    parts.pop("other", None)
    parts["allocator cache (reserved - allocated)"] = p.reserved_bytes - p.peak_bytes
    parts["CUDA context"] = CUDA_CONTEXT
    out = {
        "seq_len": seq_len,
        "batch_size": setup.batch_size,
        "peak_bytes": total,
        "peak_gib": round(total / GiB, 2),
        "allocated_bytes": p.peak_bytes + CUDA_CONTEXT,
        "parts": parts,
        "gpu_memory_bytes": gpu_memory,
        "fits": total <= gpu_memory,
        "peak_during": p.at,
        "loss": setup.loss,
        "levers": {k: getattr(setup, k) for k, _ in LEVER_ORDER},
    }
    if fit == "auto":
        out["lever_savings"] = fit_mod.ladder(setup, seq_len, LEVER_ORDER)
        f = fit_mod.decide(setup, seq_len, gpu_memory, LEVER_ORDER, accumulation=accumulation, longest=False)
        out["fit"] = f.as_dict()
        if not f.fits and f.weights > gpu_memory:
            out["fit"]["weights_alone_gib"] = round(f.weights / GiB, 2)
    elif not out["fits"]:
        out["levers_that_fit"] = choose_levers(setup, seq_len, gpu_memory)
    if find_max:
        # what memory allows (with fit = "auto": every lever, batch 1, what a run would train), and the
        # model's context when that is shorter: a length past the model's positions fits the GPU but is
        # not one the model can train on
        every = fit_mod.every_change(setup, LEVER_ORDER) if fit == "auto" else setup
        memory, context = max_length(every, gpu_memory), model_context(setup)
        if every.tiled_layer != setup.tiled_layer:  # fit keeps layer tiles only where they lower the peak
            untiled = replace(every, tiled_layer=setup.tiled_layer)
            if (other := max_length(untiled, gpu_memory)) > memory:
                every, memory = untiled, other
        out["max_length_memory"] = memory
        out["max_length"] = min(memory, context) if context else memory
        out["max_length_bound"] = "context" if context and context < memory else "memory"
        out["max_length_with"] = (
            'fit = "auto": every lever, batch 1 ' + " ".join(fit_mod.as_sets(setup, every))
            if fit == "auto"
            else "the recipe as written"
        )
    return out


def free_memory() -> int | None:
    """The budget `run` plans for on a CUDA device: the GPU's free memory (torch.cuda.mem_get_info, after
    this process's CUDA context exists) plus the context the plan counts in its peak; the total memory
    where the driver cannot say (None on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        return torch.cuda.mem_get_info()[0] + CUDA_CONTEXT
    except Exception:  # noqa: BLE001 - a driver that cannot say: the whole GPU, as before
        return torch.cuda.get_device_properties(0).total_memory


def fit_recipe(recipe, budget: int, log, *, mode: str | None = None):
    """`run`'s plan on a CUDA device before the weights load, by the recipe's [train] fit (or `mode`):
    "off" plans nothing; "warn" prints the plan's peak and the levers that would make it fit
    (`before_run`); "auto" applies fit.decide's changes (the returned recipe has them, as if the user had
    set them; each is printed) or, when nothing fits, raises a RecipeError naming the longest max_length
    that does and the keys to set. A recipe the simulation cannot build falls back to the formula's
    estimate after loading (one line says so). Returns (recipe, run.json's `fit` record or None)."""
    mode = mode or recipe.train.fit
    with fit_mod.reporting(log):  # each simulated step said as it runs (a search can take minutes)
        return _fit_recipe(recipe, budget, log, mode)


def _fit_recipe(recipe, budget: int, log, mode: str):
    if mode == "off":
        log('fit: off ([train] fit = "off"): nothing planned; the formula\'s estimate follows after loading')
        return recipe, None
    if mode == "warn":
        lines, out = before_run(recipe, budget)
        for line in lines:
            log(line)
        if out is None:
            return recipe, None
        record = {"mode": "warn", "seq_len": out["seq_len"], "budget_gib": round(budget / GiB, 2)}
        record |= {"planned_peak_gib": out["peak_gib"], "fits": out["fits"], "changes": []}
        return recipe, record | {"planned_reserved_bytes": out["peak_bytes"] - CUDA_CONTEXT}
    length = recipe.data.max_length
    try:
        setup = setup_from_recipe(recipe)
        f = fit_mod.decide(
            setup, length, budget, LEVER_ORDER, accumulation=recipe.train.gradient_accumulation_steps
        )
    except Exception as e:  # noqa: BLE001 - whatever the simulation cannot build, training may still run
        log(
            f'plan: not simulated ({type(e).__name__}: {e}); fit = "auto" cannot plan this recipe, so it '
            "changes nothing: the formula's estimate follows after loading"
        )
        return recipe, None
    if not f.fits:
        raise RecipeError(f.nothing_fits(length), path=str(recipe.path) if recipe.path else None)
    for line in f.lines():
        log(line)
    if f.changes:
        recipe = recipe.with_overrides(f.overrides())
    return recipe, {"mode": "auto", **f.as_dict(), "planned_reserved_bytes": f.peak - CUDA_CONTEXT}


def before_run(recipe, gpu_memory: int) -> tuple[list[str], dict | None]:
    """What `fastsft run` prints on a GPU before the model loads: the plan's peak for the recipe (one step
    simulated on meta tensors, no weights read) and, when it will not fit, a warning naming the levers
    that make it fit. A recipe the simulation cannot build gets one line saying so (the plan is advice:
    the run goes on, with the formula's estimate after loading)."""
    try:
        out = plan(setup_from_recipe(recipe), recipe.data.max_length, gpu_memory)
    except Exception as e:  # noqa: BLE001 - whatever the simulation cannot build, training may still run
        return [f"plan: not simulated ({type(e).__name__}: {e})"], None
    lines = [
        f"plan: one step peaks at {out['peak_bytes'] / GiB:.2f} GiB of the GPU's {gpu_memory / GiB:.1f} GiB "
        "(simulated on meta tensors: transformers backend, FlashAttention-2 memory; fastsft plan RECIPE "
        "shows the parts)"
    ]
    if not out["fits"]:
        lines.append(f"warning: this recipe will run out of GPU memory; {lever_advice(out)}")
    return lines, out


def lever_advice(out: dict) -> str:
    """For a plan that does not fit: the `--set` levers that make it fit, or what to lower instead."""
    fix = out.get("levers_that_fit")
    if fix:
        return "it fits with the levers: " + " ".join(
            f"--set train.{LEVER_KEYS[k]}={json.dumps(v)}" for k, v in fix.items()
        )
    return (
        "even every lever does not make it fit: lower data.max_length or train.per_device_train_batch_size "
        "(fastsft plan RECIPE --max-length)"
    )


__all__ = [
    "fit_recipe",
    "fit_mod",
    "free_memory",
    "before_run",
    "lever_advice",
    "Setup",
    "simulate",
    "plan",
    "max_length",
    "MAX_LENGTH",
    "device_peak",
    "setup_from_recipe",
    "parse_size",
    "choose_levers",
    "UNSLOTH_TABLE",
    "LEVERS",
    "LEVER_ORDER",
    "LEVER_KEYS",
    "replace",
]
