"""Fused linear cross-entropy: from the last hidden states to the loss, never holding the full logits.

    loss = cross_entropy(softcap(hidden @ weight.T + bias), labels)

The forward computes the gradients too, chunk by chunk of tokens:

    for each chunk of supervised tokens:
        z  = h_c @ W.T (+ b)                  one (chunk x V) buffer, allocated once, the only one alive
        dz = ce_rows(z, y_c)  written over z   our fused cross-entropy kernel (or the PyTorch twin below)
        dh_c = dz @ W;  dW += dz.T @ h_c;  db += dz.sum(0)     (dW / db only when W / b need grad)

so the logits are never recomputed, and backward only scales the stored gradients. What it does
beyond the usual chunked loss:
- rows whose label is ignored (the prompt) are skipped (gathered chunk by chunk), so FLOPs and memory
  scale with the supervised tokens only (this costs one host sync to learn their number);
- a frozen lm_head (LoRA / QLoRA) gets no weight gradient: a third of the FLOPs saved;
- the chunk is sized from a memory budget that counts every buffer a chunk holds (`chunk_memory`):
  the peak above the inputs is that budget plus the hidden-state gradient, whatever the vocabulary;
- the uniform term of label smoothing is folded into the row pass (no extra matmul).

The PyTorch twin (`backend="torch"`, the CPU path) keeps the logits in the model's dtype, as the
Triton path does (16-bit matmuls run ~3x faster than float32 ones on CPUs with bf16 instructions),
does the softmax in one float32 working buffer of the chunk's size, and writes the gradient back
over the logits with its single rounding; the budget counts both buffers.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .cross_entropy import _DTYPES, ce_rows, check_labels, options, resolve_backend

DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024  # the most a chunk's buffers may hold by default
# The fewest rows a default chunk gets: the matmuls read the whole lm_head once per chunk, which a GPU
# amortises over a few hundred rows; a CPU computes slowly enough that a handful do.
MIN_CHUNK_ROWS = {"triton": 256, "torch": 8}


def chunk_memory(rows: int, n_cols: int, dtype: torch.dtype, *, backend: str = "triton",
                 weight_grad: bool = False, softcap: bool = False) -> int:  # fmt: skip
    """Bytes the buffers of one chunk of `rows` logits rows hold (the peak of the loss above its inputs
    and the hidden-state gradient): the logits / gradient buffer in `dtype`; for the torch twin, its
    float32 working copy (not needed in float32) and, with a softcap, the tanh it keeps for the
    gradient; the float32 copy the weight gradient's matmul takes when the lm_head trains in 16 bits."""
    per_elem = torch.finfo(dtype).bits // 8
    if backend == "torch":
        per_elem += (4 if dtype != torch.float32 else 0) + (4 if softcap else 0)
    if weight_grad and dtype != torch.float32:
        per_elem += 4
    return rows * n_cols * per_elem


def chunk_rows(n_cols: int, dtype: torch.dtype, budget: int = DEFAULT_CHUNK_BYTES, *, backend: str = "triton",
               weight_grad: bool = False, softcap: bool = False) -> int:  # fmt: skip
    """The most rows whose chunk (`chunk_memory`, every buffer counted) fits in `budget` bytes, in
    multiples of 64 (tile-friendly matmuls) when there are 64 or more; at least 1."""
    lo, hi = 1, max(1, budget // max(1, n_cols))  # one byte per element is a bound no dtype passes
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if chunk_memory(mid, n_cols, dtype, backend=backend, weight_grad=weight_grad, softcap=softcap) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo < 64 else lo // 64 * 64


def default_chunk_budget(n_rows: int, n_hidden: int, n_cols: int, dtype: torch.dtype, *,
                         backend: str = "triton", **kw) -> int:  # fmt: skip
    """The budget when the caller gives none: the size of the hidden states passed in (`n_rows` of them,
    ignored ones included), so that the loss never holds more than its input beside that input's
    gradient (torch's `aspect_ratio` chunking makes the same kind of choice); at least a
    `MIN_CHUNK_ROWS[backend]`-row chunk, at most `DEFAULT_CHUNK_BYTES`."""
    size = torch.finfo(dtype).bits // 8
    floor = chunk_memory(MIN_CHUNK_ROWS[backend], n_cols, dtype, backend=backend, **kw)
    return min(max(n_rows * n_hidden * size, floor), max(DEFAULT_CHUNK_BYTES, floor))


def _ce_rows_inplace(z, y, scale, opts, scratch, compute_grad):
    """The torch twin on a chunk of kept rows (every label valid): per-row losses; with `compute_grad`,
    the gradient times `scale` (0-d or per-row) written over `z`. The float32 work happens in
    `scratch` (z itself when it is float32) in a few whole-chunk operations: on a busy CPU every
    parallel operation costs a scheduling round, so fewer and larger ones are faster."""
    n_rows, n_cols = z.shape
    eps, zl, cap = opts["label_smoothing"], opts["lse_square_scale"], opts["softcap"]
    x = scratch[0][:n_rows] if scratch else z
    y = y[:, None]
    t = None
    if cap:
        t = scratch[1][:n_rows]
        if x is not z:
            x.copy_(z)
        torch.tanh(x.div_(cap), out=t)
        torch.mul(t, cap, out=x)
        m = x.amax(dim=1, keepdim=True)
        x_t = x.gather(1, y)
        row_sum = x.sum(dim=1, keepdim=True) if eps else None
        x.sub_(m)
    else:  # max and gather are exact in the logits' own dtype; the rest in float32
        m = z.amax(dim=1, keepdim=True).float()
        x_t = z.gather(1, y).float()
        row_sum = z.sum(dim=1, keepdim=True, dtype=torch.float32) if eps else None
        if x is not z:
            x.copy_(z)  # (a mixed-dtype `sub` would make a float32 temporary of its own)
        x.sub_(m)
    x.exp_()
    s = x.sum(dim=1, keepdim=True)
    log_s = s.log()
    loss = (m - x_t) + log_s
    if eps:
        loss = (1 - eps) * loss + eps * ((m - row_sum / n_cols) + log_s)
    lse = m + log_s
    if zl:
        loss = loss + zl * lse * lse
    if not compute_grad:
        return loss[:, 0]
    # d loss / d x = (coef e - eps s / V - (1 - eps) s [j == y]) * scale / s, with e = exp(x - m)
    if zl:
        x.mul_(1 + 2 * zl * lse)
    if eps:
        x.sub_(s * (eps / n_cols))
    x.scatter_add_(1, y, -(1 - eps) * s)
    factor = (scale[:, None] if scale.dim() else scale) / s
    x.mul_(factor)
    if cap:
        x.mul_(t.mul_(t).neg_().add_(1))  # d softcap / dx = 1 - t^2
    if x is not z:
        z.copy_(x)  # the one rounding to the logits' dtype
    return loss[:, 0]


@contextlib.contextmanager
def _one_thread(z):
    """The torch twin's row pass on the CPU runs on one thread: its operations stream a chunk a few
    times, and each parallel operation waits on every thread at its end, a scheduling round per
    operation on a busy machine (measured: ~10 ms each at a load of 10 on 2 cores, 5-10x the work)."""
    threads = torch.get_num_threads()
    if z.device.type != "cpu" or threads == 1 or os.environ.get("FASTSFT_ROW_PASS_THREADS") == "all":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _chunks(hidden, keep, w, b, y, scale, opts, backend, *, need_h, need_w, need_b, compute_grad, chunk):
    """Per-row losses of the kept rows and, with `compute_grad`, the gradients (grad_h full-size, zero
    on the ignored rows). One logits buffer (and the torch twin's scratch) is reused by every chunk."""
    n = keep.numel()
    all_kept = n == hidden.shape[0]
    per_row = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = None
    if need_h and compute_grad:
        # in the compute dtype (out= below); backward returns it in the hidden states' dtype
        alloc = torch.empty if all_kept else torch.zeros
        grad_h = alloc(hidden.shape, dtype=w.dtype, device=hidden.device)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w and compute_grad else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b and compute_grad else None
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
            with _one_thread(z):
                per_row[i : i + chunk] = _ce_rows_inplace(z, y_c, row_scale, opts, scratch, compute_grad)
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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, num_items, opts, reduction, backend, chunk, budget):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows = hidden.shape[0]
        keep = (labels != opts["ignore_index"]).nonzero().squeeze(1)  # the one host sync
        compute = _compute_dtype(hidden)
        y = labels.index_select(0, keep)
        w = weight if weight.dtype == compute else weight.to(compute)
        b = None if bias is None else bias.to(compute)
        if num_items is not None:
            denom = torch.as_tensor(num_items, device=hidden.device).to(torch.float32).clamp(min=1.0)
            scale = 1.0 / denom
        elif reduction == "mean":
            scale = torch.tensor(1.0 / max(keep.numel(), 1), dtype=torch.float32, device=hidden.device)
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        if not chunk:
            kw = dict(backend=backend, weight_grad=need_w, softcap=bool(opts["softcap"]))
            if budget is None:
                budget = default_chunk_budget(n_rows, hidden.shape[1], w.shape[0], w.dtype, **kw)
            chunk = chunk_rows(w.shape[0], w.dtype, budget, **kw)
        # reduction="none" needs the per-row incoming gradient: its gradients are made in backward
        compute_grad = (need_h or need_w or need_b) and reduction != "none"
        with _no_autocast(hidden.device):  # the dtypes are chosen above; out= needs them kept
            per_row, grad_h, grad_w, grad_b = _chunks(
                hidden, keep, w, b, y, scale, opts, backend,
                need_h=need_h, need_w=need_w, need_b=need_b, compute_grad=compute_grad, chunk=chunk,
            )  # fmt: skip
        ctx.reduction, ctx.opts, ctx.backend, ctx.chunk = reduction, opts, backend, chunk
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            ctx.save_for_backward(hidden, w, b, y, keep)
            return torch.zeros(n_rows, dtype=torch.float32, device=hidden.device).index_copy_(
                0, keep, per_row
            )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return (per_row.sum() * scale).reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.reduction == "none":
            hidden, w, b, y, keep = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            row_scale = grad_output.index_select(0, keep).to(torch.float32).contiguous()
            with _no_autocast(hidden.device):
                _, grad_h, grad_w, grad_b = _chunks(
                    hidden, keep, w, b, y, row_scale, ctx.opts, ctx.backend,
                    need_h=need_h, need_w=need_w, need_b=need_b, compute_grad=True, chunk=ctx.chunk,
                )  # fmt: skip
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
            None, None, None, None, None, None, None,
        )  # fmt: skip


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: the hidden states', or under autocast (the Trainer's bf16 / fp16 mixed
    precision) the autocast dtype, as `lm_head` itself would compute there. With QLoRA the hidden
    states and lm_head are float32 (prepare_model_for_kbit_training) while autocast asks for 16 bits.
    The kernel's own arithmetic stays float32 either way; the gradients return in the inputs' dtypes."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


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
    a frozen lm_head). The memory lever: `chunk_size` (rows of logits alive at once) or
    `chunk_bytes` (a budget every buffer of a chunk counts against, see `chunk_memory()`); by default
    the budget is the size of `hidden` (at least 256 rows on the Triton path, 8 on the torch twin, at
    most 256 MiB unless that floor needs more).
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
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, num_items_in_batch, opts, reduction, backend, chunk_size, chunk_bytes
    )


__all__ = ["fused_linear_cross_entropy", "chunk_rows", "chunk_memory", "default_chunk_budget"]
