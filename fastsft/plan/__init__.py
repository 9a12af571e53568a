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

from .device import CUDA_CONTEXT, MAX_LENGTH, GiB, allocator_rounding, parse_size
from .model import load_config
from .simulate import Peak, Setup, simulate

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
# (Setup field, value) in the order the plan adds them: free first (the allocator's setting), then those
# that cost time (host copies, more kernel launches)
LEVER_ORDER = (
    ("expandable_segments", True),
    ("offload_checkpoints", True),
    ("tiled_mlp", 8),
    ("frozen16", True),
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


def device_peak(setup: Setup, seq_len: int) -> tuple[int, Peak]:
    """(the GPU memory one step at `seq_len` needs: the caching allocator's peak reserved segments + the
    CUDA context, the Peak). Reserved, not allocated: it is what the GPU gives out (nvidia-smi), and what
    Unsloth's table measures (its notebooks report `torch.cuda.max_memory_reserved()`)."""
    p = simulate(setup, seq_len, rounding=allocator_rounding)
    return p.reserved_bytes + CUDA_CONTEXT, p


def max_length(
    setup: Setup,
    budget: int,
    *,
    cache: dict | None = None,
    lo: int = 64,
    tol: float = 0.005,
    limit: int = MAX_LENGTH,
) -> int:
    """The longest sequence (at the setup's batch size) whose step fits `budget` bytes, to `tol` (0.5%):
    0 if not even `lo` fits. The need grows almost linearly with the length, so a line through two
    simulated steps (8,192 and 65,536 tokens) gives the guess, and simulated steps walk from it in
    `tol` steps until one fits and the next does not (2-3 simulations a budget). `cache` {length: bytes}
    may be shared by the calls for one setup (several GPU sizes). The search stops at `limit` (data.max_length's
    bound): what memory allows, not the model's context (`plan` puts the two side by side)."""
    cache = {} if cache is None else cache

    def need(t: int) -> int:
        if t not in cache:
            cache[t] = device_peak(setup, t)[0]
        return cache[t]

    if need(lo) > budget:
        return 0
    if need(limit) <= budget:  # the search's bound: a huge budget simulated lengths whose sizes overflow
        return limit
    a, b = 8192, 65536
    slope = (need(b) - need(a)) / (b - a)
    t = min(limit - 1, max(lo, int(a + (budget - need(a)) / slope)) if slope > 0 else b)

    def up(x: int) -> int:
        return max(x + 1, int(x * (1 + tol)))

    def down(x: int) -> int:
        return max(lo, min(x - 1, int(x / (1 + tol))))

    if need(t) <= budget:
        while need(up(t)) <= budget:
            t = up(t)
        return t
    while t > lo and need(t) > budget:
        t = down(t)
    return t


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


def plan(setup: Setup, seq_len: int, gpu_memory: int, *, find_max: bool = False) -> dict:
    """The plan as one JSON-able dict: peak_bytes (reserved + CUDA context), allocated_bytes, parts,
    fits, the levers that would make it fit, and with `find_max` max_length."""
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
    if not out["fits"]:
        out["levers_that_fit"] = choose_levers(setup, seq_len, gpu_memory)
    if find_max:
        # what memory allows, and the model's context when that is shorter: a length past the model's
        # positions fits the GPU but is not one the model can train on
        memory, context = max_length(setup, gpu_memory), model_context(setup)
        out["max_length_memory"] = memory
        out["max_length"] = min(memory, context) if context else memory
        out["max_length_bound"] = "context" if context and context < memory else "memory"
    return out


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
