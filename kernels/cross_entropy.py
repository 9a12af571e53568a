"""Fused cross-entropy with label smoothing: loss and gradient in one kernel launch per call.

Each program owns one row of logits. Pass 1 streams the row in vocabulary blocks with an online
max / sum-exp (and the row sum for the smoothing term) in float32; pass 2 streams it again and writes
the gradient, into a fresh buffer or, when the caller allows it, over the logits themselves. The
loss's backward then only scales that gradient by the incoming gradient: no full-size float32 copy,
no softmax tensor, no host synchronisation.

The PyTorch twin (`backend="torch"`) computes the same in row chunks; it is the CPU fallback and
the speed reference. Both share `ce_rows`, which `linear_cross_entropy` calls per chunk.
"""

from __future__ import annotations

import torch

from ._triton import interpreting, tl, triton, triton_available

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------
# The Triton kernel
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh in float32 to about an ulp everywhere. From e = exp(-2|x|) in (0, 1]: no overflow at
        # either end, but near 0 the 1 - e cancels (relative error ~ 1e-7 / |x|: 1e-3 at |x| = 1e-4),
        # so below |x| = 0.25 the Taylor series (through x^9: the first term left out is < 1e-8 of it)
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        t = (1.0 - e) / (1.0 + e)
        a2 = a * a
        p = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
        t = tl.where(a < 0.25, p, t)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _ce_kernel(
        logits_ptr,
        logits_row_stride,
        grad_ptr,
        grad_row_stride,
        labels_ptr,
        loss_ptr,
        scale_ptr,
        scale_stride,
        n_cols,
        ignore_index,
        label_smoothing,
        lse_square_scale,
        softcap,
        HAS_SMOOTHING: tl.constexpr,
        HAS_ZLOSS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows * vocab passes 2^31 easily
        label = tl.load(labels_ptr + row)
        x_row = logits_ptr + row * logits_row_stride
        g_row = grad_ptr + row * grad_row_stride
        offs = tl.arange(0, BLOCK)

        if label != ignore_index:
            # pass 1: online log-sum-exp (and the row sum for the uniform smoothing term)
            m = float("-inf")
            s = 0.0
            row_sum = 0.0
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    x = softcap * _tanh(x / softcap)
                # padded lanes are masked after the softcap, which would map -inf to -softcap
                x = tl.where(mask, x, float("-inf"))
                if HAS_SMOOTHING:
                    row_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                # a block of -inf logits (masked vocabulary) must not turn exp(-inf - -inf) into NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
                m = m_new
            # keep the max apart from log(s): at |x| ~ 1e4 a float32 lse has lost 1e-3 to rounding
            m = tl.where(m == float("-inf"), 0.0, m)
            log_s = tl.log(s)
            inv_s = 1.0 / s
            lse = m + log_s

            x_t = tl.load(x_row + label).to(tl.float32)
            if HAS_SOFTCAP:
                x_t = softcap * _tanh(x_t / softcap)
            loss = (m - x_t) + log_s
            if HAS_SMOOTHING:
                loss = (1.0 - label_smoothing) * loss + label_smoothing * ((m - row_sum / n_cols) + log_s)
            if HAS_ZLOSS:
                loss += lse_square_scale * lse * lse
            tl.store(loss_ptr + row, loss)

            if COMPUTE_GRAD:
                # pass 2: d loss / d x_j = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == y], times the scale
                scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
                coef = 1.0
                if HAS_ZLOSS:
                    coef = 1.0 + 2.0 * lse_square_scale * lse
                for start in range(0, n_cols, BLOCK):
                    cols = start + offs
                    mask = cols < n_cols
                    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                    if HAS_SOFTCAP:
                        t = _tanh(x / softcap)
                        x = softcap * t
                    g = tl.exp(x - m) * inv_s * coef
                    if HAS_SMOOTHING:
                        g = g - label_smoothing / n_cols
                    g = tl.where(cols == label, g - (1.0 - label_smoothing), g) * scale
                    if HAS_SOFTCAP:
                        g = g * (1.0 - t * t)
                    tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(loss_ptr + row, 0.0)
            if COMPUTE_GRAD:
                for start in range(0, n_cols, BLOCK):
                    cols = start + offs
                    zero = tl.zeros([BLOCK], dtype=tl.float32)
                    tl.store(g_row + cols, zero.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


# Rows whose length or strides are not multiples of 16 elements (V = 32001: a vocabulary after an added
# pad token; 50257: GPT-2's) cannot be proven 16-byte aligned, so every element is loaded on its own,
# each with its own 64-bit address. At 8192 x 16 warps that spilled on sm_90a with Triton 3.6 (ptxas
# 12.8: 8-12 B) and took 87 registers on sm_120a; at 1024 x 4 warps every option set compiles for
# sm_80 to sm_120a with 0 spills, Triton 3.6 and 3.9 (benchmarks/results/2026-12-06-aot/). Only the
# block the online log-sum-exp steps by changes (float32 rounding), not what is computed.
UNALIGNED_MAX_BLOCK = 1024


def _block_and_warps(n_cols: int, aligned: bool = True) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    if interpreting():
        return min(block, 1 << 16), 1  # numpy runs each block at once: large blocks, few iterations
    block = min(block, 8192 if aligned else UNALIGNED_MAX_BLOCK)
    return block, (4 if block <= 2048 else 8 if block <= 4096 else 16)


def _ce_rows_triton(logits, labels, grad, scale, opts) -> torch.Tensor:
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    compute_grad = grad is not None
    strides = (n_cols, logits.stride(0)) + ((grad.stride(0),) if compute_grad else ())
    block, warps = _block_and_warps(n_cols, aligned=all(s % 16 == 0 for s in strides))
    _ce_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        grad if compute_grad else logits,
        grad.stride(0) if compute_grad else 0,
        labels,
        loss,
        scale,
        1 if scale.dim() else 0,
        n_cols,
        opts["ignore_index"],
        float(opts["label_smoothing"]),
        float(opts["lse_square_scale"]),
        float(opts["softcap"] or 1.0),
        HAS_SMOOTHING=opts["label_smoothing"] > 0,
        HAS_ZLOSS=opts["lse_square_scale"] > 0,
        HAS_SOFTCAP=bool(opts["softcap"]),
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        num_warps=warps,
    )
    return loss


# ----------------------------------------------------------------------------------------------
# The PyTorch twin
# ----------------------------------------------------------------------------------------------

_TORCH_CHUNK_ELEMENTS = 1 << 24  # 64 MB of float32 temporaries per chunk


def ce_rows_inplace(z, y, scale, opts, scratch, compute_grad):
    """The PyTorch twin of the kernel on a chunk of rows (every label a column: ignored rows are given
    label 0 and a zero `scale`): per-row losses; with `compute_grad`, the gradient times `scale` (0-d or
    per-row) written over `z`. The float32 work happens in
    `scratch` (z itself when it is float32) in a few whole-chunk operations: on a busy CPU every
    parallel operation costs a scheduling round, so fewer and larger ones are faster."""
    n_rows, n_cols = z.shape
    eps, zl, cap = opts["label_smoothing"], opts["lse_square_scale"], opts["softcap"]
    x = scratch[0][:n_rows] if scratch else z
    same = x.data_ptr() == z.data_ptr()  # working in z itself
    y = y[:, None]
    t = None
    if cap:
        t = scratch[1][:n_rows]
        if not same:
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
        if not same:
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
    if not same:
        z.copy_(x)  # the one rounding to the logits' dtype
    return loss[:, 0]


def _ce_rows_torch(logits, labels, grad, scale, opts) -> torch.Tensor:
    """`ce_rows` on the PyTorch twin (`ce_rows_inplace`), in chunks of at most _TORCH_CHUNK_ELEMENTS
    logits: an ignored row gets loss 0 and a zero gradient. The float32 work happens in one scratch
    buffer (none for float32 logits whose gradient is written over a buffer of their own)."""
    n_rows, n_cols = logits.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return out
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(n_cols, 1))
    rows = min(step, n_rows)
    f32 = lambda: torch.empty((rows, n_cols), dtype=torch.float32, device=logits.device)  # noqa: E731
    work = f32() if grad is None or logits.dtype != torch.float32 else None
    tanh = f32() if opts["softcap"] else None
    for i in range(0, n_rows, step):
        y = labels[i : i + step]
        valid = y != opts["ignore_index"]
        row_scale = valid.to(torch.float32) * (scale[i : i + step] if scale.dim() else scale)
        z = logits[i : i + step] if grad is None else grad[i : i + step]
        if grad is not None and grad.data_ptr() != logits.data_ptr():
            z.copy_(logits[i : i + step])  # the gradient is written over its own copy of the logits
        x = work if work is not None else z
        scratch = None if (work is None and tanh is None) else [x, tanh]
        safe = torch.where(valid, y, torch.zeros_like(y))
        loss = ce_rows_inplace(z, safe, row_scale, opts, scratch, grad is not None)
        out[i : i + step] = torch.where(valid, loss, torch.zeros_like(loss))
    return out


# ----------------------------------------------------------------------------------------------
# Shared entry points
# ----------------------------------------------------------------------------------------------


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    if backend == "auto":
        return "triton" if triton_available(device) else "torch"
    if (
        backend == "triton" and not triton_available(device) and device.type != "meta"
    ):  # (meta: a plan of a GPU run)
        raise RuntimeError(
            f"backend='triton' cannot run on {device.type} tensors here: Triton needs a CUDA device, "
            "or TRITON_INTERPRET=1 set before triton is first imported (to run on the CPU). "
            "Use backend='auto' or 'torch' for the PyTorch implementation."
        )
    return backend


def ce_rows(logits, labels, grad, scale, opts, backend) -> torch.Tensor:
    """Per-row losses (float32, 0 on ignored rows) of `logits` (rows, V); when `grad` is given, the
    gradient times `scale` (a 0-d or per-row float32 tensor) is written into it (it may be `logits`)."""
    fn = _ce_rows_triton if backend == "triton" else _ce_rows_torch
    return fn(logits, labels, grad, scale, opts)


def check_labels(labels: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """Out-of-range labels would read out of bounds: assert on the device, without a host sync."""
    ok = ((labels >= 0) & (labels < n_cols)) | (labels == ignore_index)
    torch._assert_async(ok.all(), "fastsft cross-entropy: a label is outside [0, vocab) and not ignore_index")


def options(label_smoothing, ignore_index, lse_square_scale, softcap, reduction, num_items_in_batch) -> dict:
    """The loss options both entry points take, checked once."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, not {reduction!r}")
    if reduction == "none" and num_items_in_batch is not None:
        raise ValueError(
            "num_items_in_batch divides a summed loss; it does not combine with reduction='none'"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], not {label_smoothing}")
    if lse_square_scale < 0:
        raise ValueError(f"lse_square_scale must be >= 0, not {lse_square_scale}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, not {softcap}")
    return dict(
        label_smoothing=float(label_smoothing),
        ignore_index=int(ignore_index),
        lse_square_scale=float(lse_square_scale),
        softcap=float(softcap) if softcap else None,
    )


def denominator_scale(labels, reduction, num_items_in_batch, ignore_index, device) -> torch.Tensor:
    """1 / the loss's denominator, as a 0-d float32 tensor on `device` (no host sync)."""
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, device=device).to(torch.float32)
        return 1.0 / n.clamp(min=1.0)
    if reduction == "mean":
        return 1.0 / (labels != ignore_index).sum().to(torch.float32).clamp(min=1.0)
    return torch.ones((), dtype=torch.float32, device=device)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, scale, opts, reduction, backend, inplace):
        compute_grad = ctx.needs_input_grad[0]
        grad = None
        if compute_grad:
            grad = logits if inplace else torch.empty_like(logits)
        row_scale = (
            scale if reduction != "none" else torch.ones((), dtype=torch.float32, device=logits.device)
        )
        per_row = ce_rows(logits, labels, grad, row_scale, opts, backend)
        ctx.reduction = reduction
        if compute_grad:
            ctx.save_for_backward(grad)
            ctx.mark_non_differentiable(labels)
        if reduction == "none":
            return per_row
        return (per_row.sum() * scale).reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # the gradient was computed for d(loss) = 1; scale it in place (the buffer is ours to spend)
        if ctx.reduction == "none":
            grad.mul_(grad_output[:, None].to(grad.dtype))
        else:
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None, None, None


def fused_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy of `logits` (N, V) against `labels` (N,), with the semantics of
    `torch.nn.functional.cross_entropy(logits.double(), labels, ...)` (see `reference.py`).

    - `num_items_in_batch`: the loss is the sum over tokens divided by this number (the token count of
      a whole accumulated batch, as transformers passes it); overrides `reduction`'s mean.
    - A batch whose labels are all `ignore_index` gives 0 and a zero gradient.
    - `lse_square_scale` adds the z-loss, `softcap` applies `softcap * tanh(x / softcap)` first.
    - `inplace_backward=True` writes the gradient over `logits` (saves one N x V buffer; only when
      nothing else reads the logits after the loss). Backward may run once.
    - The loss is float32; the gradient has the logits' dtype.
    """
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected logits (N, V) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, not {logits.dtype}")
    opts = options(label_smoothing, ignore_index, lse_square_scale, softcap, reduction, num_items_in_batch)
    backend = resolve_backend(backend, logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.to(device=logits.device, dtype=torch.int64).contiguous()
    check_labels(labels, logits.shape[1], ignore_index)
    scale = denominator_scale(labels, reduction, num_items_in_batch, ignore_index, logits.device)
    return _FusedCrossEntropy.apply(logits, labels, scale, opts, reduction, backend, inplace_backward)


__all__ = ["fused_cross_entropy", "ce_rows", "ce_rows_inplace", "resolve_backend"]
