"""One training step of a recipe, counted by `MemoryTracker`: forward (the loss included), backward
with gradient checkpointing, gradient clipping and the optimizer's step, as the Trainer runs them.

`simulate(setup, seq_len)` runs it on `meta` tensors and returns a `Peak`; `run_step` is the step
itself, on whatever device the model is (the proof test runs it on real CPU tensors).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch

from fastsft.kernels import ops as _kernel_ops
from fastsft.loss.route import IGNORE_INDEX, LossRoute, base_causal_lm

from ..levers import frozen16, offload, tiled_layer, tiled_mlp
from .autocast import MetaAutocast, backward
from .device import CachingAllocator
from .model import build
from .tracker import WORKSPACE, MemoryTracker

WORKSPACE["fastsft.linear_cross_entropy.default"] = _kernel_ops.workspace

PARTS = ("weights", "adapter + optimizer", "saved activations", "recompute", "backward", "loss")


@dataclass(frozen=True)
class Setup:
    """What decides a step's memory, resolved from a recipe (`plan.setup_from_recipe`) or by hand."""

    config: object  # transformers PretrainedConfig
    dtype: torch.dtype = torch.bfloat16
    load_in_4bit: bool = True
    method: str = "lora"  # lora | full
    lora: object = None  # peft LoraConfig
    batch_size: int = 1
    gradient_checkpointing: bool = True
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    loss: str = "fastsft-linear"  # fastsft-linear | fastsft | torch | hf (the model's own loss)
    mixed_precision: bool = True  # the Trainer's bf16 / fp16 autocast
    offload_checkpoints: bool = False
    tiled_mlp: int = 0  # sequence shards of the MLP (0: off)
    tiled_layer: int = 0  # sequence tiles of each decoder layer's per-token work (0: off)
    frozen16: bool = False  # frozen embeddings / lm_head stored in the compute dtype
    expandable_segments: bool = False  # the CUDA allocator's expandable segments (less fragmentation)
    loss_chunk_bytes: int | None = None
    kernel_backend: str = "triton"  # the loss kernel a GPU runs; "torch" for the CPU proof


@dataclass
class Peak:
    peak_bytes: int
    parts: dict[str, int]
    at: str
    layers: int
    seq_len: int
    extrapolated_from: tuple = ()
    reserved_bytes: int = 0  # the caching allocator's peak reserved (plan.device.CachingAllocator)
    notes: list = field(default_factory=list)


def optimizer_for(name: str, params):
    """The Trainer's optimizer, or a stand-in with its state's storage: bitsandbytes' 8-bit AdamW keeps
    two uint8 moments per weight and a float32 absmax per 256-weight block of each (its `blocksize`)."""
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(params, lr=1e-4, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if name in ("adamw_8bit", "paged_adamw_8bit", "adafactor"):
        return _EightBitStandIn(params)
    raise ValueError(f"no simulated optimizer for {name!r}")


class _EightBitStandIn(torch.optim.Optimizer):
    """The storage of bitsandbytes' AdamW8bit state (two uint8 moments, float32 absmax per 256), with a
    step that reads each gradient once (no update: the plan needs its memory, not its numbers)."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    n = p.numel()
                    for k in ("state1", "state2"):
                        st[k] = torch.empty(n, dtype=torch.uint8, device=p.device)
                        st[k + "_absmax"] = torch.empty(-(-n // 256), dtype=torch.float32, device=p.device)


def _batch(setup: Setup, seq_len: int, device):
    b = setup.batch_size
    ids = torch.zeros((b, seq_len), dtype=torch.long, device=device)
    return {"input_ids": ids, "labels": ids.clone()}


def _loss(model, setup: Setup, inputs):
    if setup.loss == "hf":  # the installed transformers' own loss
        return model(**inputs, use_cache=False).loss
    if setup.loss == "hf-2024":
        # the causal LM's forward holds its 16-bit logits while its loss runs (held here the same way)
        out = model(input_ids=inputs["input_ids"], use_cache=False)
        loss = _hf_2024_loss(out.logits, inputs["labels"])
        del out
        return loss
    route = LossRoute(
        setup.loss, setup.kernel_backend, "transformers", 0.0, type(_base(model)).__name__, "plan"
    )
    route.install(model)
    n = inputs["labels"].numel()
    loss, _ = route(model, inputs, num_items_in_batch=torch.tensor(n, device=inputs["labels"].device))
    return loss


def _hf_2024_loss(logits, labels):
    """transformers 4.46-4.47's `ForCausalLMLoss` (loss/loss_utils.py, Dec 2024, the stock loss of
    Unsloth's HF + FA2 column): float32 logits, then a shifted contiguous copy of them, cross_entropy."""
    logits = logits.float()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return torch.nn.functional.cross_entropy(
        shift_logits.view(-1, shift_logits.shape[-1]), shift_labels.view(-1), ignore_index=IGNORE_INDEX
    )


def _base(model):
    return base_causal_lm(model)


def prepare(model, setup: Setup):
    """Readies a built model as the Trainer does: training mode, checkpointing (non-reentrant, as
    `sft_args` asks), the levers."""
    model.train()
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.offload_checkpoints:
        offload.install(model)
    if setup.frozen16 and setup.mixed_precision:
        frozen16.install(model, setup.dtype)
    if setup.tiled_mlp:
        tiled_mlp.install(model, setup.tiled_mlp)
    if setup.tiled_layer:
        tiled_layer.install(model, setup.tiled_layer)
    return model


def run_step(model, setup: Setup, seq_len: int, tracker: MemoryTracker) -> None:
    """Optimizer state first (an untracked-peak warm-up step: the state lives from the first step on),
    then one counted step: forward + loss, backward, clipping, optimizer step, zero_grad."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    tracker.adopt(frozen, "weights")
    tracker.adopt(params, "adapter + optimizer")
    opt = optimizer_for(setup.optim, params)
    with tracker.part("adapter + optimizer"), torch.no_grad():
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    hooks = _recompute_labels(model, tracker)
    for p in params:  # a parameter's gradient is the adapter's, not the backward's working set
        hooks.append(p.register_hook(lambda g: tracker.relabel(g, "adapter + optimizer")))
    tracker.reset_peak()
    autocast = contextlib.nullcontext()
    if setup.mixed_precision and setup.dtype != torch.float32:
        if device.type == "meta":
            autocast = MetaAutocast(setup.dtype)
        else:
            autocast = torch.autocast(device.type, dtype=setup.dtype)
    inputs = _batch(setup, seq_len, device)
    with tracker.part("saved activations"), _no_packed_check(device):
        with autocast:
            loss = _loss(model, setup, inputs)
    with tracker.part("backward"):
        tracker.phase = "backward"
        if device.type == "meta":
            with autocast:
                backward(loss)
        else:
            loss.backward()
        tracker.phase = "forward"
    del loss
    with tracker.part("adapter + optimizer"):
        if setup.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, setup.max_grad_norm, foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for h in hooks:
        h.remove()


@contextlib.contextmanager
def _no_packed_check(device):
    """transformers looks for packed sequences in the position ids (a host read, impossible on meta);
    the plan's rows are one sequence each, as that check finds on real ones."""
    if device.type != "meta":
        yield
        return
    from transformers import masking_utils

    old = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = old


def _recompute_labels(model, tracker):
    """Decoder layers run in backward (checkpointing's recomputation): charged to "recompute"."""
    layers = _base(model).model.layers
    hooks = []
    for layer in layers:

        def pre(mod, args, kwargs):
            if tracker.phase == "backward":
                mod._plan_old = tracker._label
                tracker._label = "recompute"

        def post(mod, args, kwargs, out):
            if getattr(mod, "_plan_old", None) is not None:
                tracker._label, mod._plan_old = mod._plan_old, None

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post, with_kwargs=True))
    return hooks


_MODELS: dict = {}  # (id(setup), layers) -> (setup, the prepared meta model): steps at other lengths reuse it


def _built(setup: Setup, layers: int):
    """The setup's model on meta, cut to `layers`, readied for training; built once per setup (a meta model
    holds no data, and a step leaves it as it found it: no gradients, no optimizer)."""
    key = (id(setup), layers)
    hit = _MODELS.get(key)
    if hit is not None and hit[0] is setup:
        return hit[1]
    model = build(
        setup.config,
        dtype=setup.dtype,
        load_in_4bit=setup.load_in_4bit,
        lora=setup.lora,
        full=setup.method == "full",
        num_layers=layers,
    )
    prepare(model, setup)
    if len(_MODELS) >= 8:
        _MODELS.pop(next(iter(_MODELS)))
    _MODELS[key] = (setup, model)
    return model


def simulate_layers(setup: Setup, seq_len: int, layers: int, rounding=None) -> Peak:
    """The step of the model cut to `layers` decoder layers, on meta."""
    model = _built(setup, layers)
    tracker = MemoryTracker("meta", rounding=rounding, allocator=CachingAllocator(setup.expandable_segments))
    with tracker:
        run_step(model, setup, seq_len, tracker)
    return Peak(
        tracker.peak,
        dict(tracker.peak_parts),
        tracker.peak_at,
        layers,
        seq_len,
        reserved_bytes=tracker.allocator.reserved_peak,
    )


def simulate(setup: Setup, seq_len: int, rounding=None, *, extrapolate: bool = False) -> Peak:
    """The step of the whole model, every layer simulated (8B on 2 cores: ~5 s, 30-90 s with tiled_layer =
    16): `peak_bytes` (allocated) and
    `reserved_bytes` (the caching allocator's segments).

    `extrapolate`: the allocated peak only, from 2 and 3 layers. Decoder layers of one model are alike
    (same shapes, same code), so every allocated byte of the peak is a constant plus the same amount per
    layer: p(L) = p(3) + (L - 3) (p(3) - p(2)), part by part (exact: the test checks it against all
    layers of a small model). The reserved figure is not linear in the layers (which cached block a
    request reuses depends on the history), so it needs every layer: `reserved_bytes` is 0 then."""
    n = setup.config.num_hidden_layers
    if not extrapolate or n <= 3:
        return simulate_layers(setup, seq_len, n, rounding)
    p2 = simulate_layers(setup, seq_len, 2, rounding)
    p3 = simulate_layers(setup, seq_len, 3, rounding)
    parts = {
        k: p3.parts.get(k, 0) + (n - 3) * (p3.parts.get(k, 0) - p2.parts.get(k, 0))
        for k in set(p2.parts) | set(p3.parts)
    }
    peak = p3.peak_bytes + (n - 3) * (p3.peak_bytes - p2.peak_bytes)
    return Peak(peak, {k: v for k, v in parts.items() if v}, p3.at, n, seq_len, extrapolated_from=(2, 3))


__all__ = ["Setup", "Peak", "simulate", "simulate_layers", "run_step", "prepare", "PARTS", "replace"]
