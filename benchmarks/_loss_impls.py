"""The loss benchmark's implementations and inputs, shared by test_loss_bench.py (its GPU and CPU rows)
and _loss_worker.py (the CPU rows, measured in a child process).

`make_inputs(n, v)`: the hidden states, the lm_head and the labels (see test_loss_bench.py for their
distribution). `IMPLS`: name -> (what it takes: "logits" or "hidden", build(h, w, y, eps) -> a function
that runs one forward + backward and returns the loss, whether it needs a GPU). `REQUIRES` / `_importable`:
the library a row needs, and why it cannot run here.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import warnings

# Unsloth reads its chunk budget when unsloth_zoo is imported: a fixed budget, so its peak is comparable
os.environ.setdefault("UNSLOTH_CE_LOSS_TARGET_GB", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastsft.kernels import cross_entropy_reference, fused_cross_entropy, fused_linear_cross_entropy  # noqa: E402

from _bench import GPU  # noqa: E402

DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
H = 4096 if GPU else 32
SIGMA = 2.0  # std of the non-target logits
IGNORED_SHARE = 0.25


def make_inputs(n: int, v: int, seed: int = 0, *, h: int = H, dtype=DTYPE, device=DEV):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(v, h, generator=g, device=device) / h**0.5
    y = torch.randint(0, v, (n,), generator=g, device=device)
    unit = w[y] / w[y].norm(dim=1, keepdim=True)
    margin = math.log(v) + SIGMA**2 / 2 + 2.0 * torch.randn(n, 1, generator=g, device=device)
    hid = SIGMA * torch.randn(n, h, generator=g, device=device) + margin * unit
    del unit
    y[torch.rand(n, generator=g, device=device) < IGNORED_SHARE] = -100
    return hid.to(dtype).requires_grad_(), w.to(dtype), y


_CACHE: dict = {}


def inputs_for(n: int, v: int):
    """This size's inputs, their float64 losses and fastsft's, made once (the tests run size by size)."""
    if _CACHE.get("size") != (n, v):
        _CACHE.clear()
        if GPU:
            torch.cuda.empty_cache()
        h, w, y = make_inputs(n, v)
        _CACHE.update(size=(n, v), inputs=(h, w, y), ref={}, anchor={})
    return _CACHE["inputs"]


def reference_loss(n: int, v: int, eps: float) -> float:
    """The float64 definition, on the same bf16-rounded inputs, in row chunks (bounded memory)."""
    h, w, y = inputs_for(n, v)
    if eps not in _CACHE["ref"]:
        wd = w.double()
        total = 0.0
        rows = max(1, 2**28 // v)  # a 2 GiB float64 chunk at most
        for i in range(0, n, rows):
            z = h[i : i + rows].detach().double() @ wd.T
            total += float(cross_entropy_reference(z, y[i : i + rows], label_smoothing=eps, reduction="sum"))
            del z
        _CACHE["ref"][eps] = total / max(1, int((y != -100).sum()))
        del wd
    return _CACHE["ref"][eps]


def fastsft_loss(n: int, v: int, eps: float) -> float:
    """fastsft's loss on these inputs (the anchor every row is compared with)."""
    h, w, y = inputs_for(n, v)
    if eps not in _CACHE["anchor"]:
        with torch.no_grad():
            _CACHE["anchor"][eps] = float(fused_linear_cross_entropy(h.detach(), w, y, label_smoothing=eps))
    return _CACHE["anchor"][eps]


def _as_loss(out) -> torch.Tensor:
    """Libraries return a tensor, a tuple (loss, extras...) or an output object with `.loss`."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "loss", out)


# ----------------------------------------------------------------------------------------------
# Implementations. Each builder returns run: run() does forward + backward, returns the loss and
# leaves no gradient behind (so that a peak-memory measurement starts from the inputs alone).
# Builders raise ImportError (not installed: skip) or NotImplementedError (no such option: skip the row).
# ----------------------------------------------------------------------------------------------


def _logits_in(loss_fn):
    def build(h, w, y, eps):
        logits = (h.detach() @ w.T).requires_grad_()  # the input (bf16, as a model's lm_head returns it)

        def run():
            loss = _as_loss(loss_fn(logits, y, eps))
            loss.backward()
            logits.grad = None  # for in-place kernels the gradient is the logits' own storage
            return loss.detach()

        return run

    return build


def _hidden_in(loss_fn):
    def build(h, w, y, eps):
        def run():
            loss = _as_loss(loss_fn(h, w, y, eps))
            loss.backward()
            h.grad = None
            return loss.detach()

        return run

    return build


def _fastsft(logits, y, eps):
    return fused_cross_entropy(logits, y, label_smoothing=eps, inplace_backward=True)


def _fastsft_linear(h, w, y, eps):
    return fused_linear_cross_entropy(h, w, y, label_smoothing=eps)


def _fastsft_linear_1mib(h, w, y, eps):
    # the memory lever turned down: 1 MiB of tiles (the default: half the hidden states' size, at least
    # one fast 192 x 1024 tile, 1.75 MiB at H = 1024 in bf16)
    return fused_linear_cross_entropy(h, w, y, label_smoothing=eps, chunk_bytes=2**20)


def _fastsft_linear_all_threads(h, w, y, eps):
    # the online tiles with every intra-op thread whatever the load (fastsft before it checked for
    # contention): the comparison the loaded rows make
    from fastsft.kernels import online_tiles

    free = online_tiles.free_cpu_threads
    online_tiles.free_cpu_threads = lambda threads: threads
    try:
        return _fastsft_linear(h, w, y, eps)
    finally:
        online_tiles.free_cpu_threads = free


def _stock(logits, y, eps):
    return F.cross_entropy(logits.float(), y, ignore_index=-100, label_smoothing=eps)


def _stock_linear(h, w, y, eps):
    return _stock(h @ w.T, y, eps)


_compiled: dict = {}


def _stock_compiled(logits, y, eps):
    key = (tuple(logits.shape), eps)
    if key not in _compiled:
        import torch._dynamo

        # one graph per size: never let dynamo's recompile limit fall back to eager without saying so
        torch._dynamo.reset()
        _compiled.clear()
        _compiled[key] = torch.compile(_stock, dynamic=False)
    return _compiled[key](logits, y, eps)


def _torch_linear(h, w, y, eps, **option_kw):
    if not hasattr(F, "linear_cross_entropy"):
        raise ImportError(name=f"torch.nn.functional.linear_cross_entropy (torch {torch.__version__})")
    if eps:
        raise NotImplementedError("its chunked path has no label smoothing (it falls back to full logits)")
    options = (
        torch.nn.LinearCrossEntropyOptions(**option_kw)
        if hasattr(torch.nn, "LinearCrossEntropyOptions")
        else None
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = F.linear_cross_entropy(h, w, y, ignore_index=-100, options=options)
    for wrn in caught:  # a silent fallback to the full-logits reference path is not this row
        if "ignored" in str(wrn.message) or "fall" in str(wrn.message):
            raise NotImplementedError(f"its chunked path refused these inputs: {str(wrn.message)[:200]}")
    return loss


def _torch_linear_compact(h, w, y, eps):
    # the least-memory policy, and half-size chunks (what torch picks by default on CUDA)
    return _torch_linear(h, w, y, eps, acc_policy="compact", chunking_method="aspect_ratio:2")


def _liger(logits, y, eps):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(ignore_index=-100, label_smoothing=eps)(logits, y)


def _liger_linear(h, w, y, eps):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, label_smoothing=eps)(w, h, y)


def _unsloth(logits, y, eps):
    if eps:
        raise NotImplementedError("Unsloth's Triton cross-entropy has no label smoothing")
    from unsloth.kernels.cross_entropy_loss import fast_cross_entropy_loss

    # (batch, seq, vocab) and (batch, seq); it does not shift the labels; mean over non-ignored labels
    return fast_cross_entropy_loss(logits[None], y[None])


def _unsloth_fused(h, w, y, eps):
    import unsloth  # noqa: F401  (unsloth_zoo refuses to import unless unsloth was imported first)
    from unsloth_zoo.fused_losses import cross_entropy_loss as zoo

    params = inspect.signature(zoo.unsloth_fused_ce_loss).parameters
    extra = {}
    if eps:
        if "label_smoothing" not in inspect.getsource(zoo.compute_fused_ce_loss):
            raise NotImplementedError("this unsloth_zoo's fused loss has no label smoothing")
        extra["label_smoothing"] = eps
    hs, labels = h[None], y[None]
    if "shift_labels" in params:
        extra["shift_labels"] = False
    else:
        # it predicts labels[t + 1] from hidden[t]: one ignored label in front and a dummy row at the end
        hs = torch.cat([h, h.new_zeros(1, h.shape[1])])[None]
        labels = torch.cat([y.new_full((1,), -100), y])[None]
    target_gb = float(os.environ.get("UNSLOTH_CE_LOSS_TARGET_GB", "1"))
    return zoo.unsloth_fused_ce_loss(
        trainer=None,
        hidden_states=hs,
        lm_head_weight=w,
        lm_head_bias=None,
        labels=labels,
        mask=None,
        n_items=None,
        scaling=None,
        target_gb=target_gb,
        torch_compile=True,
        **extra,
    )


def _cce(h, w, y, eps):
    if eps:
        raise NotImplementedError("Cut Cross-Entropy has no label smoothing")
    from cut_cross_entropy import linear_cross_entropy

    # its Triton kernels need CUDA; on the CPU its own torch.compile implementation
    impl = "cce" if h.is_cuda else "torch_compile"
    return linear_cross_entropy(h, w, y, ignore_index=-100, reduction="mean", impl=impl)


def _trl(h, w, y, eps):
    if eps:
        raise NotImplementedError("TRL's chunked log-prob head has no label smoothing")
    from trl.kernels import chunked_logprob
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    if not h.is_cuda and not hasattr(chunked_logprob, "_use_triton"):
        raise NotImplementedError("TRL < 1.16's chunked log-prob kernel is Triton-only (no CPU path)")

    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 4096
    keep = y != -100
    hv, yv = h[keep], y[keep]  # as add_fused_lm_head does: ignored positions are dropped before the head
    logp = ChunkedLogProbFunction.apply(hv, w, None, yv, 1.0, chunk, None, 1.0, ("log_probs",))[0]
    return -logp.sum() / keep.sum().clamp(min=1)


IMPLS = {
    # name: (input, builder, runs on the CPU)
    "fastsft": ("logits", _logits_in(_fastsft), True),
    "torch": ("logits", _logits_in(_stock), True),
    "torch-compile": ("logits", _logits_in(_stock_compiled), False),
    "liger": ("logits", _logits_in(_liger), False),
    "unsloth": ("logits", _logits_in(_unsloth), False),
    "fastsft-linear": ("hidden", _hidden_in(_fastsft_linear), True),
    "fastsft-linear-1mib": ("hidden", _hidden_in(_fastsft_linear_1mib), False),
    "fastsft-linear-all-threads": ("hidden", _hidden_in(_fastsft_linear_all_threads), False),
    "torch-stock-linear": ("hidden", _hidden_in(_stock_linear), True),
    "torch-linear": ("hidden", _hidden_in(_torch_linear), True),
    "torch-linear-compact": ("hidden", _hidden_in(_torch_linear_compact), True),
    "liger-linear": ("hidden", _hidden_in(_liger_linear), False),
    "unsloth-fused": ("hidden", _hidden_in(_unsloth_fused), False),
    "cce": ("hidden", _hidden_in(_cce), False),
    "trl": ("hidden", _hidden_in(_trl), True),
}
BASELINE = {"logits": "torch", "hidden": "torch-stock-linear"}
REQUIRES = {
    "liger": "liger_kernel.transformers",
    "liger-linear": "liger_kernel.transformers",
    "unsloth": "unsloth.kernels.cross_entropy_loss",
    "unsloth-fused": (
        "unsloth",
        "unsloth_zoo.fused_losses.cross_entropy_loss",
    ),  # unsloth_zoo needs unsloth first
    "cce": "cut_cross_entropy",
    "trl": "trl.kernels.chunked_logprob",
}


def _importable(impl: str) -> str | None:
    """None when the library `impl` needs imports here, else why not (any error: Unsloth raises several)."""
    modules = REQUIRES.get(impl)
    if modules is None:
        return None
    for module in (modules,) if isinstance(modules, str) else modules:
        try:
            importlib.import_module(module)
        except Exception as e:
            return (
                f"{module} cannot be imported: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
    return None
