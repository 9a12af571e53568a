"""Fused linear cross-entropy: from the last hidden states to the loss, never holding the full logits.

    loss = cross_entropy(softcap(hidden @ weight.T + bias), labels)

The forward computes the gradients too, so backward only scales them and no logit is computed twice.
Rows whose label is ignored (the prompt) are skipped (gathered chunk by chunk): FLOPs and memory scale
with the supervised tokens only (this costs one host sync to learn their number). Two ways through:

Row chunks (`linear_forward.py`, the forward both this module's autograd Function and the custom op
of `ops.py` run; the Triton path, and the PyTorch twin when the lm_head or its bias trains, or with a
softcap):

    for each chunk of supervised tokens:
        z  = h_c @ W.T (+ b)                  one (chunk x V) buffer, allocated once, the only one alive
        dz = ce_rows(z, y_c)  written over z   our fused cross-entropy kernel (or its PyTorch twin)
        dh_c = dz @ W;  dW += dz.T @ h_c;  db += dz.sum(0)     (dW / db only when W / b need grad)

Tiles with an online softmax (`online_tiles.py`: the PyTorch twin with a frozen lm_head, LoRA's case,
on the CPU): a row's logits are never all alive at once, and the memory is one tile whatever the
vocabulary.

A chunk's or tile's size comes from a memory budget (`memory_plan.py`). This module holds the public
function and its autograd Function.
"""

from __future__ import annotations

import torch

from .cross_entropy import _DTYPES, check_labels, options, resolve_backend
from .linear_forward import forward, kept_inputs, run_plan
from .memory_plan import plan as _plan


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, num_items, opts, reduction, backend, chunk, budget):
        need = tuple(ctx.needs_input_grad[:3])
        compute = _compute_dtype(hidden)
        ctx.reduction, ctx.opts, ctx.backend = reduction, opts, backend
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction != "none":
            mean = reduction == "mean"
            loss, *grads = forward(
                hidden, weight, bias, labels, num_items, opts, mean, backend, compute, need, chunk, budget
            )
            ctx.save_for_backward(*grads)
            return loss
        # reduction="none" needs the per-row incoming gradient: its gradients are made in backward
        keep, y, w, b, scale = kept_inputs(
            hidden, weight, bias, labels, None, opts["ignore_index"], False, compute
        )
        ctx.plan = _plan(hidden, w, keep, opts, backend, need[1], need[2], chunk, budget)
        per_row, *_ = run_plan(hidden, keep, w, b, y, scale, opts, backend, need, False, ctx.plan)
        ctx.save_for_backward(hidden, w, b, y, keep)
        return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_copy_(
            0, keep, per_row
        )

    @staticmethod
    def backward(ctx, grad_output):
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.reduction == "none":
            hidden, w, b, y, keep = ctx.saved_tensors
            need = tuple(ctx.needs_input_grad[:3])
            row_scale = grad_output.index_select(0, keep).to(torch.float32).contiguous()
            _, grad_h, grad_w, grad_b = run_plan(
                hidden, keep, w, b, y, row_scale, ctx.opts, ctx.backend, need, True, ctx.plan
            )
        else:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            g = grad_output.to(torch.float32)
            grad_h = grad_h.mul_(g.to(grad_h.dtype)) if grad_h is not None else None
            grad_w = grad_w.mul_(g) if grad_w is not None else None
            grad_b = grad_b.mul_(g) if grad_b is not None else None
        return (
            None if grad_h is None else grad_h.to(h_dtype),
            None if grad_w is None else grad_w.to(w_dtype),
            None if grad_b is None else grad_b.to(b_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: the hidden states', or under autocast (the Trainer's bf16 / fp16 mixed
    precision) the autocast dtype, as `lm_head` itself would compute there. With QLoRA the hidden
    states and lm_head are float32 (prepare_model_for_kbit_training) while autocast asks for 16 bits.
    The kernel's own arithmetic stays float32 either way; the gradients return in the inputs' dtypes."""
    kind = hidden.device.type
    # a torch function mode that emulates autocast where there is none (fastsft plan's, on meta tensors)
    for mode in torch.overrides._get_current_function_mode_stack():
        if getattr(mode, "autocast_dtype", None) is not None:
            return mode.autocast_dtype
    if kind == "meta":
        return hidden.dtype
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """`fused_cross_entropy(softcap(hidden @ weight.T + bias), labels, ...)` without the full logits.

    `hidden` (N, H), `weight` (V, H) (the lm_head), `bias` (V,) or None, `labels` (N,) already
    shifted. Gradients flow to whichever of hidden / weight / bias require grad (none is computed for
    a frozen lm_head). The memory lever: `chunk_size` (rows of logits alive at once: a chunk's, or an
    online tile's) or `chunk_bytes` (a budget every buffer counts against, see `chunk_memory()` and
    `tile_memory()`); by default `default_chunk_budget()`: the size of `hidden` for row chunks (at
    least 256 rows on the Triton path, 8 on the torch twin), half of it for the online tiles.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected labels ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"expected bias ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, not {hidden.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, not {chunk_bytes}")
    if chunk_size is not None and chunk_bytes is not None:
        raise ValueError("give chunk_size (rows) or chunk_bytes (a budget), not both")
    opts = options(label_smoothing, ignore_index, lse_square_scale, softcap, reduction, num_items_in_batch)
    backend = resolve_backend(backend, hidden.device)
    labels = labels.to(device=hidden.device, dtype=torch.int64).contiguous()
    check_labels(labels, weight.shape[0], ignore_index)
    if reduction != "none" and (hidden.device.type == "meta" or torch.compiler.is_compiling()):
        # the custom op (kernels/ops.py), the same computation: torch.compile traces it without a graph
        # break, and on meta tensors (fastsft plan) its fake implementation gives the outputs' shapes
        from .ops import linear_cross_entropy

        grad = torch.is_grad_enabled()
        num_items = None if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss, *_ = linear_cross_entropy(
            hidden,
            weight,
            bias,
            labels,
            num_items,
            opts["label_smoothing"],
            opts["ignore_index"],
            opts["lse_square_scale"],
            opts["softcap"],
            reduction == "mean",
            backend,
            _compute_dtype(hidden),
            grad and hidden.requires_grad,
            grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad,
            chunk_size,
            chunk_bytes,
        )
        return loss
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, num_items_in_batch, opts, reduction, backend, chunk_size, chunk_bytes
    )


__all__ = ["fused_linear_cross_entropy"]
