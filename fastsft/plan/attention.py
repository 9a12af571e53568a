"""Attention with FlashAttention-2's memory, for the plan (and, on the CPU, its exact math).

SDPA on `meta` tensors takes the math path, which holds the whole (T x T) attention matrix that a GPU
running FlashAttention-2 never makes; this module is what the simulated model attends with instead, as
two custom ops whose outputs (the tensors the tracker counts) are FA2's:

- forward (flash_attn/flash_api.cpp, `mha_fwd`): `out` (B, T, H, D) in the inputs' dtype and
  `softmax_lse` (B, H, T) float32, both saved for backward with q, k, v: O(T) beyond q, k, v.
- backward (`mha_bwd`): dq, dk, dv like q, k, v, and while it runs `dq_accum` (B, T128, H, D8) float32 and
  `softmax_d` (B, H, T128) float32 (T128: T rounded up to 128, D8: D to 8), and with grouped-query
  attention dk, dv for all H query heads before the sum over each group (2 x B T H D in the dtype).

On real tensors the ops compute exact causal attention (SDPA inside the op, below the tracker), so a
model attending with them trains as with SDPA; only the memory a tracker sees is FA2's.
"""

from __future__ import annotations

import torch

from .tracker import WORKSPACE

NAME = "fastsft_plan_attention"  # (a name with "flash" in it makes transformers import flash_attn)  # the attn_implementation name the plan's models use


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


@torch.library.custom_op("fastsft_plan::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, D), k and v (B, T, Hk, D) -> out (B, T, H, D), lse (B, H, T) float32; causal."""
    qt, kt, vt = (x.transpose(1, 2).float() for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    kt, vt = kt.repeat_interleave(groups, 1), vt.repeat_interleave(groups, 1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    t = q.shape[1]
    s.masked_fill_(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = (torch.softmax(s, -1) @ vt).to(q.dtype).transpose(1, 2).contiguous()
    return out, lse


@flash_attn_fwd.register_fake
def _(q, k, v, scale):
    b, t, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (b, h, t), dtype=torch.float32
    )


@torch.library.custom_op("fastsft_plan::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the math of attention's backward (autograd is off inside a custom op): P = softmax(S),
    # dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)), dQ = scale dS K, dK = scale dS^T Q
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    qt, kt, vt, do = (x.transpose(1, 2).float() for x in (q, k, v, dout))
    kt, vt = kt.repeat_interleave(groups, 1), vt.repeat_interleave(groups, 1)
    s = (qt @ kt.transpose(-1, -2)) * scale
    s.masked_fill_(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    dv = p.transpose(-1, -2) @ do
    dp = do @ vt.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ kt) * scale
    dk = (ds.transpose(-1, -2) @ qt) * scale

    def back(x, like):  # (B, H, T, D) -> the grouped heads summed, (B, T, Hk, D) in the input's dtype
        x = x.reshape(b, like.shape[2], -1, t, d).sum(2) if like.shape[2] != h else x
        return x.transpose(1, 2).to(like.dtype).contiguous()

    dq, dk, dv = back(dq, q), back(dk, k), back(dv, v)
    return dq, dk, dv


@flash_attn_bwd.register_fake
def _(dout, q, k, v, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _bwd_workspace(args, kwargs) -> int:
    """mha_bwd's scratch beyond dq, dk, dv (see the module docstring)."""
    _, q, k = args[:3]
    b, t, h, d = q.shape
    ws = 4 * b * _round(t, 128) * h * _round(d, 8) + 4 * b * h * _round(t, 128)
    if k.shape[2] != h:
        ws += 2 * b * k.shape[1] * h * d * q.element_size()
    return ws


WORKSPACE["fastsft_plan.flash_attn_bwd.default"] = _bwd_workspace


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(dout, q, k, v, ctx.scale)
    return dq, dk, dv, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: query (B, H, T, D), key / value (B, Hk, T, D) ->
    ((B, T, H, D), None). Causal, no padding mask (the plan's batches are full rows)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.dtype == torch.float32:  # as transformers' flash_attention_forward (`get_target_dtype`):
        # FA2 takes 16 bits, so float32 q, k, v (QLoRA's float32 residual stream makes RoPE's output float32)
        # are cast to the autocast dtype (on meta: the emulated CUDA autocast's)
        kind = "cuda" if query.device.type == "meta" else query.device.type
        if torch.is_autocast_enabled(kind):
            target = torch.get_autocast_dtype(kind)
            query, key, value = query.to(target), key.to(target), value.to(target)
    out, _ = flash_attn_fwd(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), float(scale))
    return out, None


def register() -> str:
    """Make `attn_implementation=NAME` available to transformers' models; returns NAME."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import flash_attention_mask

        AttentionMaskInterface.register(NAME, flash_attention_mask)
    except ImportError:  # pragma: no cover
        pass
    return NAME
