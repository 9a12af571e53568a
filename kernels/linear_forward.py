"""The forward of the fused linear cross-entropy, the computation the autograd Function
(`linear_cross_entropy.py`) and the custom op (`ops.py`) share: the kept (supervised) rows, then the row
chunks (here) or the online tiles (`online_tiles.py`) along the plan `memory_plan.plan` chose.

A module of its own so that the two import it and not each other.
"""

from __future__ import annotations

import torch

from .cross_entropy import ce_rows, ce_rows_inplace
from .memory_plan import plan as _plan
from .online_tiles import online_chunks


def _chunks(hidden, keep, w, b, y, scale, opts, backend, need, compute_grad, chunk):
    """Per-row losses of the kept rows and, with `compute_grad`, the gradients of those of (hidden,
    weight, bias) that `need` marks (grad_h full-size, zero on the ignored rows). One logits buffer (and
    the torch twin's scratch) is reused by every chunk."""
    need_h, need_w, need_b = need
    n = keep.numel()
    all_kept = n == hidden.shape[0]
    per_row = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = None
    if need_h and compute_grad:
        # in the compute dtype (out= below); backward returns it in the hidden states' dtype
        alloc = torch.empty if all_kept else torch.zeros
        grad_h = alloc(hidden.shape, dtype=w.dtype, device=hidden.device)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w and compute_grad else None
    grad_b = (
        torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b and compute_grad else None
    )
    if n == 0:
        return per_row, grad_h, grad_w, grad_b
    rows = min(chunk, n)
    buf = torch.empty((rows, w.shape[0]), dtype=w.dtype, device=w.device)
    scratch = None
    if backend == "torch" and (w.dtype != torch.float32 or opts["softcap"]):
        f32 = lambda: torch.empty((rows, w.shape[0]), dtype=torch.float32, device=w.device)  # noqa: E731
        scratch = [f32() if w.dtype != torch.float32 else buf]
        if opts["softcap"]:
            scratch.append(f32())
    for i in range(0, n, chunk):
        idx = keep[i : i + chunk]
        h_c = hidden[i : i + chunk] if all_kept else hidden.index_select(0, idx)
        h_c = h_c.to(w.dtype)  # the compute dtype (autocast's under mixed precision); a chunk's copy at most
        z = buf[: h_c.shape[0]]
        if b is not None:
            torch.addmm(b, h_c, w.T, out=z)
        else:
            torch.mm(h_c, w.T, out=z)
        row_scale = scale[i : i + chunk] if scale.dim() else scale
        y_c = y[i : i + chunk]
        if backend == "torch":
            per_row[i : i + chunk] = ce_rows_inplace(z, y_c, row_scale, opts, scratch, compute_grad)
        else:
            per_row[i : i + chunk] = ce_rows(z, y_c, z if compute_grad else None, row_scale, opts, backend)
        if not compute_grad:
            continue
        if grad_h is not None:
            if all_kept:
                torch.mm(z, w, out=grad_h[i : i + chunk])
            else:
                grad_h.index_copy_(0, idx, z @ w)
        if need_w:
            grad_w.addmm_(z.T.to(torch.float32) if z.dtype != torch.float32 else z.T, h_c.float())
        if need_b:
            grad_b += z.sum(0, dtype=torch.float32)
    return per_row, grad_h, grad_w, grad_b


def kept_inputs(hidden, weight, bias, labels, num_items, ignore_index, mean, compute_dtype):
    """(keep, y, w, b, scale): the kept rows (the one host sync) and their labels, the lm_head and its bias
    in the compute dtype, and the loss's scale: 1 / num_items, 1 / the kept rows for a mean, else 1."""
    keep = (labels != ignore_index).nonzero().squeeze(1)
    y = labels.index_select(0, keep)
    w = weight if weight.dtype == compute_dtype else weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    if num_items is not None:
        scale = 1.0 / torch.as_tensor(num_items, device=hidden.device).to(torch.float32).clamp(min=1.0)
    elif mean:
        scale = torch.tensor(1.0 / max(keep.numel(), 1), dtype=torch.float32, device=hidden.device)
    else:
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    return keep, y, w, b, scale


def run_plan(hidden, keep, w, b, y, scale, opts, backend, need, compute_grad, plan):
    """(per-row losses, grad_h, grad_w, grad_b) along `plan` (`memory_plan.plan`), autocast off: the
    dtypes are chosen already, and the out= buffers need them kept."""
    with _no_autocast(hidden.device):
        if plan[0] == "online":
            per_row, grad_h = online_chunks(
                hidden, keep, w, b, y, scale, opts, compute_grad=compute_grad and need[0], plan=plan[1:]
            )
            return per_row, grad_h, None, None
        return _chunks(hidden, keep, w, b, y, scale, opts, backend, need, compute_grad, plan[1])


def forward(hidden, weight, bias, labels, num_items, opts, mean, backend, compute_dtype, need, chunk, budget):
    """The forward of the loss for a mean or sum: (loss, grad_h, grad_w, grad_b), the gradients (of
    those `need` marks) for d(loss) = 1. The autograd Function (linear_cross_entropy.py) and the custom op (ops.py) both run this."""
    keep, y, w, b, scale = kept_inputs(
        hidden, weight, bias, labels, num_items, opts["ignore_index"], mean, compute_dtype
    )
    plan = _plan(hidden, w, keep, opts, backend, need[1], need[2], chunk, budget)
    per_row, grad_h, grad_w, grad_b = run_plan(
        hidden, keep, w, b, y, scale, opts, backend, need, any(need), plan
    )
    return (per_row.sum() * scale).reshape(()), grad_h, grad_w, grad_b


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


__all__ = ["forward", "kept_inputs", "run_plan"]
