"""Sequence-tiled decoder layer (ALST's TiledCompute, arXiv 2506.13996, extended around attention): every
per-token part of a decoder layer over `tiles` slices of the sequence, only attention over all of it.

A decoder layer is per-token work (input norm, q/k/v projections with their LoRA adapters and 4-bit
dequantisation, rotary embedding; then o_proj, the residual adds, the post-attention norm, the MLP)
around one operation that mixes tokens: attention. Plain, each per-token step keeps its (B x T x width)
activations at full length for backward, and recomputation (checkpointing) makes them all again at once.
Tiled, the layer is three steps:

1. `pre` per tile: x -> q, k, v (after the norm, the projections and RoPE, in the dtype attention takes);
   only q, k, v are made at full length;
2. attention over the full q, k, v (the model's own attention function: FA2 / SDPA keep only the
   log-sum-exp per row beyond their inputs and output);
3. `post` per tile: (x, attention output) -> the layer's output (o_proj, residual, norm, MLP, residual).

Steps 1 and 3 are `_Tiled`: the forward runs tile by tile without a graph and keeps only its inputs;
backward recomputes one tile with its graph, backpropagates the tile's slice of the output gradient
through it (LoRA weights' gradients accumulate tile after tile) and drops it before the next. Every
output row depends on its own input row only, so the values are the plain layer's; the weight gradients
are sums over tiles (float rounding only; tests/levers/test_levers.py).

`install(model, tiles)` replaces the forward of every supported decoder layer (`ARCHITECTURES`: one
small table, the attention's extra arguments per model type) whose class forward is still transformers'
own; other layers (a layer class patched by Unsloth) are left as they are.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch

from ._recompute import RunState

# decoder layer class -> keyword arguments its attention passes to the attention function, from the
# attention module (the only difference between these layers' forwards; Qwen3's q/k norms are found
# by name)
ARCHITECTURES = {
    "LlamaDecoderLayer": lambda attn: {},
    "MistralDecoderLayer": lambda attn: {"sliding_window": getattr(attn.config, "sliding_window", None)},
    "Qwen2DecoderLayer": lambda attn: {"sliding_window": attn.sliding_window},
    "Qwen3DecoderLayer": lambda attn: {"sliding_window": attn.sliding_window},
}


def recomputing() -> bool:
    """Whether this forward runs inside backward (checkpointing's recomputation: the autograd engine is
    running a graph task): there the layer's output is only a root to backpropagate from."""
    return getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1


class _Tiled(torch.autograd.Function):
    """`fn(*slices)` over `tiles` slices of dim 1 of every input, outputs concatenated along dim 1.

    `lazy`: the outputs are read by nothing when the forward is a recomputation inside backward (the
    decoder layer's output: checkpointing backpropagates from it, and this function's backward recomputes
    each tile anyway); there only the first tile runs (for the outputs' dtypes) and the outputs are
    placeholders of the right shape that hold no memory (one element, expanded)."""

    @staticmethod
    def forward(ctx, fn, tiles, lazy, *xs):
        ctx.fn, ctx.tiles = fn, tiles
        ctx.state = RunState(xs[0].device)
        ctx.save_for_backward(*xs)
        outs = None
        length = xs[0].shape[1]
        with torch.no_grad():
            if lazy and recomputing():
                i, j = spans(length, tiles)[0]
                o = fn(*(x[:, i:j] for x in xs))
                return tuple(y.new_empty(()).expand(y.shape[0], length, *y.shape[2:]) for y in o)
            for i, j in spans(length, tiles):
                o = fn(*(x[:, i:j] for x in xs))
                if outs is None:
                    outs = tuple(t.new_empty((t.shape[0], xs[0].shape[1], *t.shape[2:])) for t in o)
                for full, t in zip(outs, o, strict=True):
                    full[:, i:j] = t
                del o
        return outs

    @staticmethod
    def backward(ctx, *grads):
        xs = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        g, x0 = grads[0], xs[0]
        # the output's gradient, given up by its only holder (offload's backward), becomes the input's: tile
        # i's slice is read by tile i's backward before tile i's input gradient is written there
        donated = _donated(g) and g.shape == x0.shape and g.dtype == x0.dtype and g.is_contiguous()
        dxs = [
            (g if i == 0 and donated else torch.empty_like(x)) if n else None
            for i, (x, n) in enumerate(zip(xs, need, strict=True))
        ]
        for i, j in spans(xs[0].shape[1], ctx.tiles):
            sl = [x[:, i:j].detach().requires_grad_(n) for x, n in zip(xs, need, strict=True)]
            with ctx.state.replay():
                o = ctx.fn(*sl)
            pairs = [
                (t, g[:, i:j]) for t, g in zip(o, grads, strict=True) if g is not None and t.requires_grad
            ]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            for d, s in zip(dxs, sl, strict=True):
                if d is not None:
                    d[:, i:j] = s.grad if s.grad is not None else 0
            del o, sl, pairs
        return (None, None, None, *dxs)


_DONATED: list = []  # storages of output gradients their holder gives up (`donate`)


@contextlib.contextmanager
def donate(grad: torch.Tensor):
    """Inside, a tiled function receiving `grad` as its first output's gradient may overwrite it with its
    first input's gradient (the decoder layer: the residual stream's gradient in, the same shape out),
    which saves one B x T x hidden tensor in each layer's backward. Only for a gradient nothing else
    reads afterwards: offload's backward, which holds the layer output's gradient and only passes it to
    the recomputed layer."""
    _DONATED.append(grad.untyped_storage()._cdata)
    try:
        yield
    finally:
        _DONATED.pop()


def _donated(g) -> bool:
    return g is not None and bool(_DONATED) and g.untyped_storage()._cdata == _DONATED[-1]


def spans(t: int, tiles: int):
    """(start, end) of `tiles` slices of `t` positions: equal (the allocator reuses one size), the last
    one shorter when `tiles` does not divide `t`."""
    step = -(-t // max(1, tiles))
    return [(i, min(t, i + step)) for i in range(0, t, step)]


def _rotary(attn):
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def tiled_forward(
    self,
    hidden_states,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    use_cache=False,
    position_embeddings=None,
    **kwargs,
):
    attn = self.self_attn
    if past_key_values is not None or position_embeddings is None or hidden_states.dim() != 3:
        return self._fastsft_untiled_forward(
            hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache,
            position_embeddings=position_embeddings, **kwargs,
        )  # fmt: skip
    tiles = self._fastsft_tiles
    x = hidden_states
    if torch.is_grad_enabled() and not x.requires_grad:  # the first layer over frozen embeddings: a node
        x = x.detach().requires_grad_(True)  # in the graph all the same, so backward reaches the adapters
    cos, sin = position_embeddings
    rope = _rotary(attn)
    d = attn.head_dim

    def pre(x, cos, sin):
        h = self.input_layernorm(x)
        shape = (*h.shape[:-1], -1, d)
        q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        v = attn.v_proj(h).view(shape)
        q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        kind = "cuda" if x.device.type == "meta" else x.device.type
        if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
            # attention runs in the autocast dtype (FA2's cast, autocast's for SDPA / the eager matmul):
            # cast per tile, so no full-length float32 q / k exists
            dt = torch.get_autocast_dtype(kind)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        # one tensor per head group, so that attention runs (and its backward holds scratch) per group
        return (*q.chunk(groups, 2), *k.chunk(groups, 2), *v.chunk(groups, 2))

    groups = head_groups(attn.config)
    qkv = _Tiled.apply(pre, tiles, False, x, cos, sin)  # 3 x groups tensors (B, T, heads / groups, D)
    attention = attn.config._attn_implementation
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention, _eager(attn))
    outs = []
    for g in range(groups):
        q, k, v = qkv[g], qkv[groups + g], qkv[2 * groups + g]
        o, _ = interface(
            attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
            dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling,
            **self._fastsft_attn_kwargs(attn), **kwargs,
        )  # fmt: skip
        outs.append(o)  # (B, T, heads / groups, D)
    del qkv, q, k, v, o
    # the plain MLP inside a tile (a tile is already a slice of the sequence; the tiled MLP's shards inside
    # it would recompute the MLP once more, and their small blocks fragment the allocator's segments)
    mlp = getattr(self.mlp, "_fastsft_untiled_forward", None) or self.mlp

    def post(x, *a):
        a = (torch.cat(a, 2) if len(a) > 1 else a[0]).reshape(*x.shape[:-1], -1)
        h = x + attn.o_proj(a)
        return (h + mlp(self.post_attention_layernorm(h)),)

    (y,) = _Tiled.apply(post, tiles, True, x, *outs)
    return y


def head_groups(config, most: int = 8) -> int:
    """How many groups the heads are attended in: one per key/value head (each group its query heads),
    at most `most` (KV heads merged in equal groups); FA2's backward holds a float32 dQ accumulator and,
    with grouped-query attention, dK and dV expanded to every query head, so per group that scratch is
    1 / groups of the whole's, for `groups` kernel launches instead of one."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return max(n for n in range(1, min(kv, most) + 1) if kv % n == 0)


def _eager(attn):
    return sys.modules[type(attn).__module__].eager_attention_forward


def install(model, tiles: int) -> int:
    """Tile every supported decoder layer of `model` into `tiles` sequence slices; returns how many."""
    n = 0
    for module in model.modules():
        kw = ARCHITECTURES.get(type(module).__name__)
        if kw is None or not type(module).forward.__module__.startswith("transformers."):
            continue  # not a layer this forward reproduces (another model, or one patched: Unsloth's)
        if getattr(module, "_fastsft_untiled_forward", None) is None:
            module._fastsft_untiled_forward = module.forward
        module._fastsft_tiles = int(tiles)
        module._fastsft_attn_kwargs = kw
        module.forward = types.MethodType(tiled_forward, module)
        n += 1
    for module in model.modules():  # the final norm of a model whose layers are tiled
        layers, norm = getattr(module, "layers", None), getattr(module, "norm", None)
        if norm is None or not isinstance(layers, torch.nn.ModuleList) or not layers:
            continue
        if getattr(layers[0], "_fastsft_tiles", None) is None or not callable(norm):
            continue
        if getattr(norm, "_fastsft_untiled_forward", None) is None:
            norm._fastsft_untiled_forward = norm.forward
        norm._fastsft_tiles = int(tiles)
        norm.forward = types.MethodType(_tiled_norm, norm)
    return n


def _tiled_norm(self, x):
    """The model's final norm over sequence tiles: under QLoRA (float32 norm weights) the norm's backward
    otherwise holds several float32 B x T x hidden tensors at once, at the step's peak once the layers
    are tiled."""
    if x.dim() != 3 or not (torch.is_grad_enabled() and x.requires_grad):
        return self._fastsft_untiled_forward(x)
    (y,) = _Tiled.apply(lambda t: (self._fastsft_untiled_forward(t),), self._fastsft_tiles, False, x)
    return y
