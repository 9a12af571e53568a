"""Fused linear cross-entropy: from the last hidden states to the loss, never holding the full logits.

    loss = cross_entropy(softcap(hidden @ weight.T + bias), labels)

The forward computes the gradients too, chunk by chunk of tokens:

    for each chunk of supervised tokens:
        z  = h_c @ W.T (+ b)                  one (chunk x V) buffer, the only one alive
        dz = ce_rows(z, y_c)  written over z   our fused cross-entropy kernel (or its torch twin)
        dh_c = dz @ W;  dW += dz.T @ h_c;  db += dz.sum(0)     (dW / db only when W / b need grad)

so the logits are never recomputed, and backward only scales the stored gradients. What it does
beyond the usual chunked loss:
- rows whose label is ignored (the prompt) are dropped before the matmul, so FLOPs and memory scale
  with the supervised tokens only (this costs one host sync to learn their number);
- a frozen lm_head (LoRA / QLoRA) gets no weight gradient: a third of the FLOPs saved;
- the chunk is sized from a memory budget, not a fixed row count;
- the uniform term of label smoothing is folded into the kernel's row pass (no extra matmul).
"""

from __future__ import annotations

import torch

from .cross_entropy import _DTYPES, ce_rows, check_labels, options, resolve_backend

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024  # the largest logits chunk alive at once


def chunk_rows(n_cols: int, dtype: torch.dtype, budget: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one (rows x n_cols) logits buffer fits in `budget` bytes."""
    per_row = n_cols * torch.finfo(dtype).bits // 8
    rows = max(1, budget // per_row)
    return rows if rows < 64 else rows // 64 * 64  # multiples of 64 keep the matmuls tile-friendly


def _chunks(h, w, b, y, scale, opts, backend, *, need_h, need_w, need_b, compute_grad, chunk):
    n = h.shape[0]
    per_row = torch.empty(n, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
    for i in range(0, n, chunk):
        h_c = h[i : i + chunk]
        z = torch.addmm(b, h_c, w.T) if b is not None else h_c @ w.T
        row_scale = scale[i : i + chunk] if scale.dim() else scale
        per_row[i : i + chunk] = ce_rows(
            z, y[i : i + chunk], z if compute_grad else None, row_scale, opts, backend
        )
        if not compute_grad:
            continue
        if need_h:
            torch.matmul(z, w, out=grad_h[i : i + chunk])
        if need_w:
            grad_w.addmm_(z.T.to(torch.float32) if z.dtype != torch.float32 else z.T, h_c.float())
        if need_b:
            grad_b += z.sum(0, dtype=torch.float32)
    return per_row, grad_h, grad_w, grad_b


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, num_items, opts, reduction, backend, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows = hidden.shape[0]
        keep = (labels != opts["ignore_index"]).nonzero().squeeze(1)  # the one host sync
        h = hidden.index_select(0, keep)
        y = labels.index_select(0, keep)
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        if num_items is not None:
            denom = torch.as_tensor(num_items, device=hidden.device).to(torch.float32).clamp(min=1.0)
            scale = 1.0 / denom
        elif reduction == "mean":
            scale = torch.tensor(1.0 / max(keep.numel(), 1), dtype=torch.float32, device=hidden.device)
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        chunk = chunk or chunk_rows(w.shape[0], h.dtype)
        # reduction="none" needs the per-row incoming gradient: its gradients are made in backward
        compute_grad = (need_h or need_w or need_b) and reduction != "none"
        per_row, grad_h, grad_w, grad_b = _chunks(
            h, w, b, y, scale, opts, backend,
            need_h=need_h, need_w=need_w, need_b=need_b, compute_grad=compute_grad, chunk=chunk,
        )  # fmt: skip
        ctx.reduction, ctx.opts, ctx.backend, ctx.chunk, ctx.n_rows = reduction, opts, backend, chunk, n_rows
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            ctx.save_for_backward(h, w, b, y, keep)
            return torch.zeros(n_rows, dtype=torch.float32, device=hidden.device).index_copy_(
                0, keep, per_row
            )
        ctx.save_for_backward(
            _scatter_rows(grad_h, keep, n_rows) if need_h else None,
            grad_w,
            grad_b,
        )
        return (per_row.sum() * scale).reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.reduction == "none":
            h, w, b, y, keep = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            row_scale = grad_output.index_select(0, keep).to(torch.float32).contiguous()
            _, grad_h, grad_w, grad_b = _chunks(
                h, w, b, y, row_scale, ctx.opts, ctx.backend,
                need_h=need_h, need_w=need_w, need_b=need_b, compute_grad=True, chunk=ctx.chunk,
            )  # fmt: skip
            grad_h = _scatter_rows(grad_h, keep, ctx.n_rows) if need_h else None
        else:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            g = grad_output.to(torch.float32)
            grad_h = grad_h.mul_(g.to(grad_h.dtype)) if grad_h is not None else None
            grad_w = grad_w.mul_(g) if grad_w is not None else None
            grad_b = grad_b.mul_(g) if grad_b is not None else None
        return (
            grad_h,
            None if grad_w is None else grad_w.to(w_dtype),
            None if grad_b is None else grad_b.to(b_dtype),
            None, None, None, None, None, None,
        )  # fmt: skip


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    if rows.shape[0] == n:
        return rows
    out = torch.zeros((n, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    return out.index_copy_(0, index, rows)


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
) -> torch.Tensor:
    """`fused_cross_entropy(softcap(hidden @ weight.T + bias), labels, ...)` without the full logits.

    `hidden` (N, H), `weight` (V, H) (the lm_head), `bias` (V,) or None, `labels` (N,) already
    shifted. Gradients flow to whichever of hidden / weight / bias require grad (none is computed for
    a frozen lm_head). `chunk_size` (rows of logits alive at once) defaults to a 256 MB budget.
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
    opts = options(label_smoothing, ignore_index, lse_square_scale, softcap, reduction, num_items_in_batch)
    backend = resolve_backend(backend, hidden.device)
    labels = labels.to(device=hidden.device, dtype=torch.int64).contiguous()
    check_labels(labels, weight.shape[0], ignore_index)
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, num_items_in_batch, opts, reduction, backend, chunk_size
    )


__all__ = ["fused_linear_cross_entropy", "chunk_rows"]
