"""Offloaded gradient checkpointing: a decoder layer's input (its checkpoint) kept in host memory.

Plain checkpointing keeps every layer's input hidden states on the GPU until backward (L x B x T x H
values: at long sequences the largest part of the step) and recomputes the layer from it in backward.
Here the forward copies that input to pinned host memory (`non_blocking`: the copy overlaps the next
layers' work) and drops the GPU copy; backward brings it back, recomputes the layer with the forward's
autocast and RNG state, and backpropagates through it, as Unsloth's offloaded checkpointing does. The
arithmetic is the plain path's: the loss and every gradient are the same.

`install(model)` replaces transformers' checkpointing function of every `GradientCheckpointingLayer`
(the model's `gradient_checkpointing_enable()` must have run: the Trainer's, or the plan's).
"""

from __future__ import annotations

import torch

from ._recompute import RunState
from .tiled_layer import donate


class _MetaHost:
    """The host copy of a `meta` tensor (the plan's simulation): its shape, no bytes on the device."""

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype = t.shape, t.dtype

    def to(self, device, non_blocking=False):
        return torch.empty(self.shape, dtype=self.dtype, device=device)


def to_host(t: torch.Tensor):
    if t.device.type == "meta":
        return _MetaHost(t)
    if t.device.type == "cpu":
        return t.detach().clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden, *rest):
        ctx.run, ctx.rest, ctx.device = run, rest, hidden.device
        ctx.state = RunState(hidden.device)
        ctx.host = to_host(hidden)
        with torch.no_grad():
            out = run(hidden, *rest)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"offloaded checkpointing expects a layer returning a tensor, got {type(out)}")
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.host.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
        ctx.host = None
        with ctx.state.replay():
            out = ctx.run(hidden, *ctx.rest)
        with donate(grad_out):  # nothing reads grad_out after this: a tiled layer may reuse its memory
            torch.autograd.backward(out, grad_out)
        return (None, hidden.grad) + (None,) * len(ctx.rest)


def offloaded_checkpoint(run, hidden, *rest):
    """`run(hidden, *rest)` with `hidden` offloaded to host memory until backward recomputes `run`."""
    if not hidden.requires_grad:  # the first layer over frozen embeddings: still a node in the graph,
        hidden = hidden.detach().requires_grad_(True)  # so backward reaches the layer's adapters
    return _OffloadedCheckpoint.apply(run, hidden, *rest)


def install(model) -> int:
    """Offload the checkpoints of every checkpointed decoder layer of `model`; returns how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = offloaded_checkpoint
            n += 1
    return n
