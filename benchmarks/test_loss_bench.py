"""Loss benchmark: fastsft's kernels against the stock loss and the other fused losses.

Two groups, each timed forward + backward in bf16:
- logits in (N, V): fastsft (`fused_cross_entropy`, gradient written over the logits), torch (stock:
  float32 upcast + F.cross_entropy, as transformers does), torch-compile, liger, unsloth;
- hidden states in (N, H) with a frozen lm_head (V, H): fastsft-linear, torch (lm_head matmul + the
  stock loss), torch-linear (F.linear_cross_entropy), liger-linear, unsloth-fused, cce, trl.

Inputs: hidden states are built so the softmax is peaked like a trained model's (a target-aligned
direction plus noise, logit std ~4), not uniform noise, which would flatter Cut Cross-Entropy's
sparsity skipping. On a GPU: H = 4096, V in {32768, 128256, 151936, 262144}, N in {4096, 16384}, label
smoothing 0 and 0.1 (FASTSFT_BENCH_QUICK=1: V = 128256, N = 16384). Without a GPU each implementation
runs once at a tiny size (a smoke pass: the code cannot rot) and its loss is checked.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fastsft.kernels import cross_entropy_reference, fused_cross_entropy, fused_linear_cross_entropy

from _bench import GPU, QUICK, copy_bandwidth_gbs, peak_gib, time_ms

DEV = "cuda" if GPU else "cpu"
H = 4096 if GPU else 32
if GPU:
    SIZES = [(16384, 128256)] if QUICK else [(n, v) for v in (32768, 128256, 151936, 262144) for n in (4096, 16384)]
else:
    SIZES = [(64, 509)]
SMOOTHING = [0.0, 0.1]


def make_inputs(n, v, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    dt = torch.bfloat16 if GPU else torch.float32
    w = torch.randn(v, H, generator=g, device=DEV, dtype=torch.float32) / H**0.5
    y = torch.randint(0, v, (n,), generator=g, device=DEV)
    # peaked softmax: each hidden state leans towards its target's row
    h = 0.5 * torch.randn(n, H, generator=g, device=DEV) + 3.0 * w[y] * H**0.5 / w[y].norm(dim=1, keepdim=True)
    y[torch.rand(n, generator=g, device=DEV) < 0.25] = -100  # a prompt share, as in SFT
    return h.to(dt).requires_grad_(), w.to(dt), y


# ----------------------------------------------------------------------------------------------
# Implementations: each returns a function doing forward + backward and returning the loss
# ----------------------------------------------------------------------------------------------


def _logits_in(loss_fn):
    def build(h, w, y, eps):
        logits = (h.detach() @ w.T).requires_grad_()
        pristine = logits.detach().clone() if not GPU else None

        def run():
            if pristine is not None:
                logits.data.copy_(pristine)
            logits.grad = None
            loss = loss_fn(logits, y, eps)
            loss.backward()
            return loss

        return run, logits

    return build


def _hidden_in(loss_fn):
    def build(h, w, y, eps):
        def run():
            h.grad = None
            loss = loss_fn(h, w, y, eps)
            loss.backward()
            return loss

        return run, h

    return build


def _stock(logits, y, eps):
    return F.cross_entropy(logits.float(), y, ignore_index=-100, label_smoothing=eps)


_compiled = None


def _stock_compiled(logits, y, eps):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_stock, dynamic=False)
    return _compiled(logits, y, eps)


def _liger(logits, y, eps):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(label_smoothing=eps)(logits, y)


def _unsloth(logits, y, eps):
    if eps:
        raise NotImplementedError("Unsloth's cross-entropy has no label smoothing")
    from unsloth.kernels.cross_entropy_loss import fast_cross_entropy_loss

    return fast_cross_entropy_loss(logits[None], y[None])


def _torch_linear(h, w, y, eps):
    return F.linear_cross_entropy(h, w, y, ignore_index=-100, label_smoothing=eps)


def _liger_linear(h, w, y, eps):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(label_smoothing=eps)(w, h, y)


def _unsloth_fused(h, w, y, eps):
    if eps:
        raise NotImplementedError("unsloth_fused_ce_loss has no label smoothing")
    os.environ.setdefault("UNSLOTH_CE_LOSS_TARGET_GB", "1")  # a fixed chunk budget: a fair peak-memory figure
    from unsloth_zoo.fused_losses.cross_entropy_loss import unsloth_fused_ce_loss

    return unsloth_fused_ce_loss(
        trainer=None, hidden_states=h[None], lm_head_weight=w, lm_head_bias=None, labels=y[None],
        mask=None, n_items=None, scaling=None, target_gb=1, torch_compile=True,
    )  # fmt: skip


def _cce(h, w, y, eps):
    if eps:
        raise NotImplementedError("Cut Cross-Entropy has no label smoothing")
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, y, ignore_index=-100)


def _trl(h, w, y, eps):
    if eps:
        raise NotImplementedError("TRL's chunked log-prob head has no label smoothing")
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    keep = y != -100
    hv, yv = h[keep], y[keep]  # TRL drops ignored positions before the lm_head, as its SFTTrainer does
    logp = ChunkedLogProbFunction.apply(hv, w, None, yv, 1.0, 4096, None, 1.0, ("log_probs",))[0]
    return -logp.sum() / keep.sum()


IMPLS = {
    # name: (input, builder)
    "fastsft": ("logits", _logits_in(lambda z, y, eps: fused_cross_entropy(z, y, label_smoothing=eps, inplace_backward=True))),
    "torch": ("logits", _logits_in(_stock)),
    "torch-compile": ("logits", _logits_in(_stock_compiled)),
    "liger": ("logits", _logits_in(_liger)),
    "unsloth": ("logits", _logits_in(_unsloth)),
    "fastsft-linear": ("hidden", _hidden_in(lambda h, w, y, eps: fused_linear_cross_entropy(h, w, y, label_smoothing=eps))),
    "torch-stock-linear": ("hidden", _hidden_in(lambda h, w, y, eps: _stock(h @ w.T, y, eps))),
    "torch-linear": ("hidden", _hidden_in(_torch_linear)),
    "liger-linear": ("hidden", _hidden_in(_liger_linear)),
    "unsloth-fused": ("hidden", _hidden_in(_unsloth_fused)),
    "cce": ("hidden", _hidden_in(_cce)),
    "trl": ("hidden", _hidden_in(_trl)),
}  # fmt: skip
GPU_ONLY = {"torch-compile", "liger", "unsloth", "liger-linear", "unsloth-fused", "cce"}


def _reference(h, w, y, eps) -> float:
    return float(cross_entropy_reference(h.detach().double() @ w.double().T, y, label_smoothing=eps))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_loss(impl, results):
    kind, build = IMPLS[impl]
    if impl in GPU_ONLY and not GPU:
        pytest.skip(f"{impl}: a GPU-only implementation")
    bandwidth = copy_bandwidth_gbs()
    if bandwidth and "copy_gbs" not in results.extra:
        results.extra["copy_gbs"] = round(bandwidth, 1)
    for n, v in SIZES:
        h, w, y = make_inputs(n, v)
        for eps in SMOOTHING:
            try:
                run, _ = build(h, w, y, eps)
                loss = float(run().detach())
            except NotImplementedError as e:
                results.notes.append(f"{impl}, smoothing {eps}: skipped ({e})")
                continue
            except ImportError as e:
                pytest.skip(f"{impl}: not installed ({e.name})")
            # parity against the float64 definition, on every size we run
            ref = _reference(h, w, y, eps) if (n * v <= 4096 * 152064 or not GPU) else None
            parity = None if ref is None else abs(loss - ref) / abs(ref)
            if parity is not None:
                assert parity < 2e-2, f"{impl} computes a different loss: {loss} vs {ref}"
            row = {"impl": impl, "input": kind, "vocab": v, "tokens": n, "hidden": H, "label_smoothing": eps,
                   "dtype": "bf16" if GPU else "fp32", "loss": loss,
                   "parity": None if parity is None else f"{parity:.1e}"}  # fmt: skip
            if GPU:
                row["ms"] = time_ms(run)
                row["peak_mem_gib"] = peak_gib(run)
                supervised = int((y != -100).sum())
                if kind == "logits":
                    gbs = 6 * n * v / (row["ms"] / 1e3) / 1e9  # bf16 read twice, gradient written once
                    row["achieved_gbs"] = gbs
                    row["achieved"] = f"{gbs:.0f} GB/s"
                    if bandwidth:
                        row["achieved"] += f" ({gbs / bandwidth:.0%} of copy)"
                else:
                    flops = 4 * supervised * H * v  # frozen lm_head, supervised tokens only
                    row["achieved_tflops"] = flops / (row["ms"] / 1e3) / 1e12
                    row["achieved"] = f"{row['achieved_tflops']:.0f} TFLOP/s"
            results.loss.append(row)
            del run
        del h, w, y
        if GPU:
            torch.cuda.empty_cache()
    _ratios(results)
    if not GPU:
        pytest.skip("no GPU: smoke pass only (the code ran and its loss matched), nothing measured")


def _ratios(results):
    """Speed and memory as ratios to the stock loss of the same group and size, in one run."""
    base = {}
    for r in results.loss:
        if r["impl"] in ("torch", "torch-stock-linear") and r.get("ms"):
            base[(r["input"], r["vocab"], r["tokens"], r["label_smoothing"])] = r
    for r in results.loss:
        b = base.get((r["input"], r["vocab"], r["tokens"], r["label_smoothing"]))
        if b and r.get("ms"):
            r["speedup_vs_torch"] = b["ms"] / r["ms"]
            if r.get("peak_mem_gib") and b.get("peak_mem_gib"):
                r["mem_vs_torch"] = r["peak_mem_gib"] / b["peak_mem_gib"]
