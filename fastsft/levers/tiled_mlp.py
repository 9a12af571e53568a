"""Sequence-tiled MLP (ALST's TiledMLP, arXiv 2506.13996): each decoder layer's MLP over `shards`
slices of the sequence.

A gated MLP holds several (B x T x intermediate) tensors (gate, up, their activation and product, and
their gradients in backward): at long sequences the largest working set of a checkpointed layer. Run
shard by shard, forward keeps only the MLP's input (the output is assembled slice by slice) and backward
recomputes each shard and backpropagates through it before the next, so those tensors exist for one
shard at a time. Each output row depends on its own input row only, so the result is the plain MLP's;
weight gradients are summed shard by shard (float rounding only).
"""

from __future__ import annotations

import types

import torch

from ._recompute import RunState


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, shards, x):
        ctx.fn, ctx.shards = fn, shards
        ctx.state = RunState(x.device)
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for i, xs in _slices(x, shards):
                o = fn(xs)
                if out is None:
                    out = o.new_empty((*x.shape[:-1], o.shape[-1]))
                out[:, i : i + xs.shape[1]] = o
                del o
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        for i, xs in _slices(x, ctx.shards):
            xs = xs.detach().requires_grad_(True)
            with ctx.state.replay():
                o = ctx.fn(xs)
            torch.autograd.backward(o, grad_out[:, i : i + xs.shape[1]])
            dx[:, i : i + xs.shape[1]] = xs.grad
            del o, xs
        return None, None, dx


def _slices(x, shards):
    t = x.shape[1]
    step = -(-t // shards)
    for i in range(0, t, step):
        yield i, x[:, i : i + step]


def tiled_forward(self, x):
    if x.dim() != 3 or x.shape[1] < 2:
        return self._fastsft_untiled_forward(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _TiledMLP.apply(self._fastsft_untiled_forward, self._fastsft_shards, x)
    # no graph to keep (evaluation, or the forward of an offloaded checkpoint): shard by shard all the same
    out = None
    for i, xs in _slices(x, self._fastsft_shards):
        o = self._fastsft_untiled_forward(xs)
        if out is None:
            out = o.new_empty((*x.shape[:-1], o.shape[-1]))
        out[:, i : i + xs.shape[1]] = o
        del o
    return out


def install(model, shards: int) -> int:
    """Tile the MLP (`.mlp` of each decoder layer) of `model` into `shards` sequence slices."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None) if isinstance(module, GradientCheckpointingLayer) else None
        if mlp is None:
            continue
        if getattr(mlp, "_fastsft_untiled_forward", None) is None:
            mlp._fastsft_untiled_forward = mlp.forward
        mlp._fastsft_shards = int(shards)
        mlp.forward = types.MethodType(tiled_forward, mlp)
        n += 1
    return n
