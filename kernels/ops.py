"""fastsft's losses as `torch.library` custom ops: opaque to `torch.compile` (no graph break around the
kernels' host-side loops and their one host sync) and to a `TorchDispatchMode`, with fake (meta)
implementations giving the outputs' shapes, so the loss also runs on `meta` tensors (`fastsft plan`).

`fastsft::linear_cross_entropy` is the forward of `fused_linear_cross_entropy` for the "mean" and "sum"
reductions: it returns the loss and the gradients it computes on the way (the hidden states' in the
compute dtype; the lm_head's and its bias's in float32 when they train; empty tensors otherwise), and
backward scales them by the incoming gradient, as the autograd Function does. The fake implementation
assumes every label is supervised (the memory's worst case: the real kernel skips ignored rows).
"""

from __future__ import annotations

import torch

from . import memory_plan
from .linear_forward import forward


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


@torch.library.custom_op("fastsft::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    num_items: torch.Tensor | None,
    label_smoothing: float,
    ignore_index: int,
    lse_square_scale: float,
    softcap: float | None,
    mean: bool,
    backend: str,
    compute_dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    chunk: int | None,
    budget: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) shifted int64, num_items 0-d or None
    -> (loss 0-d float32, grad_h (N, H) compute dtype, grad_w (V, H) float32, grad_b (V,) float32); a
    gradient not needed is an empty tensor."""
    opts = dict(
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
    )
    need = (need_h, need_w, need_b)
    loss, grad_h, grad_w, grad_b = forward(
        hidden, weight, bias, labels, num_items, opts, mean, backend, compute_dtype, need, chunk, budget
    )
    return (
        loss,
        _empty(hidden) if grad_h is None else grad_h,
        _empty(loss) if grad_w is None else grad_w,
        _empty(loss) if grad_b is None else grad_b,
    )


@linear_cross_entropy.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    num_items,
    label_smoothing,
    ignore_index,
    lse_square_scale,
    softcap,
    mean,
    backend,
    compute_dtype,
    need_h,
    need_w,
    need_b,
    chunk,
    budget,
):
    f32 = torch.float32
    loss = hidden.new_empty((), dtype=f32)
    grad_h = hidden.new_empty(hidden.shape if need_h else (0,), dtype=compute_dtype)
    grad_w = hidden.new_empty(weight.shape if need_w else (0,), dtype=f32)
    grad_b = hidden.new_empty((weight.shape[0],) if need_b else (0,), dtype=f32)
    return loss, grad_h, grad_w, grad_b


def workspace(args, kwargs) -> int:
    """Bytes the real kernel holds while it runs beyond its outputs, every row supervised: the
    compute-dtype copy of the lm_head (and bias) when they are stored wider (QLoRA's float32 lm_head under
    bf16 autocast), the chunk's or tiles' buffers (`loss_memory` less the gradients it counts), the
    index and label copies of the kept rows."""
    hidden, weight, bias = args[:3]
    backend, cd, need_h, need_w, need_b = args[10:15]
    n, h = hidden.shape
    v = weight.shape[0]
    size = torch.finfo(cd).bits // 8
    ws = v * h * size if weight.dtype != cd else 0
    ws += v * size if bias is not None and bias.dtype != cd else 0
    lm = memory_plan.loss_memory(n, h, v, cd, backend=backend, weight_grad=need_w, softcap=bool(args[8]))
    ws += lm - n * h * size - (v * h * 4 if need_w else 0)
    return ws + 16 * n


def _setup(ctx, inputs, output):
    _, grad_h, grad_w, grad_b = output
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    hidden, weight, bias = inputs[:3]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.needs = inputs[12:15]


def _backward(ctx, g_loss, _gh, _gw, _gb):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    g = g_loss.to(torch.float32)
    # the gradients were computed for d(loss) = 1 and are ours to spend: scaled in place
    dh = grad_h.mul_(g.to(grad_h.dtype)).to(h_dtype) if need_h else None
    dw = grad_w.mul_(g).to(w_dtype) if need_w else None
    db = grad_b.mul_(g).to(b_dtype) if need_b and b_dtype is not None else None
    return (dh, dw, db) + (None,) * 14


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)


__all__ = ["linear_cross_entropy", "workspace"]
