"""fused_linear_cross_entropy against the float64 reference: loss and every gradient."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsft.kernels import chunk_rows, fused_linear_cross_entropy, linear_cross_entropy_reference
from fastsft.kernels.linear_cross_entropy import (
    DEFAULT_CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    chunk_memory,
    default_chunk_budget,
)

from _kernel_util import GRAD_TOL, LOSS_TOL, fresh_generator, params, rel

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(n, h, v, dtype, device, *, bias=True, ignored=0.3):
    gen, seed = fresh_generator()
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5 * 2).to(dtype).to(device)
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(device) if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    if ignored == "all":
        y[:] = -100
    elif ignored:
        y[torch.rand(n, generator=gen) < ignored] = -100
    return hidden, weight, b, y.to(device), seed


def check(hidden, weight, bias, y, seed, backend, *, frozen_weight=False, **kw):
    hk = hidden.clone().requires_grad_()
    wk = weight.clone().requires_grad_(not frozen_weight)
    bk = bias.clone().requires_grad_() if bias is not None else None
    loss = fused_linear_cross_entropy(hk, wk, y, bk, backend=backend, **kw)
    hr = hidden.double().requires_grad_()
    wr = weight.double().requires_grad_(not frozen_weight)
    br = bias.double().requires_grad_() if bias is not None else None
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    ref = linear_cross_entropy_reference(hr, wr, y, br, **ref_kw)
    up = torch.rand(ref.shape, dtype=torch.float64, device=hidden.device) + 0.5
    (loss * up.float()).sum().backward()
    (ref * up).sum().backward()
    tol = GRAD_TOL[hidden.dtype]
    # low-precision logits are rounded once before the loss: the loss is good to that rounding
    loss_tol = LOSS_TOL if hidden.dtype == torch.float32 else 2e-3
    assert loss.dtype == torch.float32
    assert rel(loss, ref) < loss_tol, f"loss {loss} vs {ref}, seed {seed}"
    assert hk.grad.dtype == hidden.dtype
    assert rel(hk.grad, hr.grad) < tol, f"hidden grad {rel(hk.grad, hr.grad)}, seed {seed}"
    if frozen_weight:
        assert wk.grad is None
    else:
        assert wk.grad.dtype == weight.dtype
        assert rel(wk.grad, wr.grad) < tol, f"weight grad {rel(wk.grad, wr.grad)}, seed {seed}"
    if bias is not None:
        assert rel(bk.grad, br.grad) < tol, f"bias grad {rel(bk.grad, br.grad)}, seed {seed}"
    return loss, hk


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_matches_reference(device, backend, dtype, bias):
    hidden, weight, b, y, seed = make(45, 32, 503, dtype, device, bias=bias)
    check(hidden, weight, b, y, seed, backend, label_smoothing=0.1, chunk_size=8)  # 8 does not divide 45


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_chunking(device, backend, reduction):
    hidden, weight, b, y, seed = make(31, 16, 97, torch.float32, device)
    for chunk in (1, 7, 31, None):
        check(hidden, weight, b, y, seed, backend, reduction=reduction, chunk_size=chunk)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap(device, backend, dtype):
    hidden, weight, b, y, seed = make(20, 24, 300, dtype, device)
    check(hidden, weight * 8, b, y, seed, backend, softcap=5.0, label_smoothing=0.1, chunk_size=6)


class _Matmuls(TorchDispatchMode):
    """Counts the matrix products that run (in place ones too), by aten op."""

    OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.split(".")[0] in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,backend", params())
def test_frozen_lm_head_gets_no_weight_gradient(device, backend):
    """LoRA / QLoRA: the lm_head is frozen, so no weight gradient is computed or stored. Autograd
    hands back None either way, so count the matrix products the kernel runs: per chunk, the logits
    and the hidden gradient only (2), where a trainable head adds its weight gradient (3)."""
    hidden, weight, _, y, seed = make(25, 16, 211, torch.bfloat16, device, bias=False)
    check(hidden, weight, None, y, seed, backend, frozen_weight=True, chunk_size=4)
    chunks = -(-int((y != -100).sum()) // 4)
    for frozen, per_chunk in ((True, 2), (False, 3)):  # the trainable head shows the count sees dW
        with _Matmuls() as count:
            loss = fused_linear_cross_entropy(
                hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen), y,
                backend=backend, chunk_size=4,
            )  # fmt: skip
            loss.backward()
        assert count.n == per_chunk * chunks, (frozen, count.n, chunks, seed)


@pytest.mark.parametrize("device,backend", params())
def test_num_items_in_batch_divides_once(device, backend):
    hidden, weight, b, y, seed = make(30, 16, 64, torch.float32, device)
    n = int((y != -100).sum()) * 4
    loss, _ = check(hidden, weight, b, y, seed, backend, num_items_in_batch=n)
    total = linear_cross_entropy_reference(hidden, weight, y, b, reduction="sum")
    assert abs(float(loss.detach()) * n - float(total)) < 1e-4 * abs(float(total))


@pytest.mark.parametrize("device,backend", params())
def test_ignored_rows_get_zero_gradient_and_all_ignored_is_zero(device, backend):
    hidden, weight, b, y, seed = make(12, 16, 50, torch.float32, device)
    _, hk = check(hidden, weight, b, y, seed, backend)
    assert torch.all(hk.grad[y == -100] == 0)
    hidden, weight, b, y, _ = make(6, 16, 50, torch.float32, device, ignored="all")
    hk = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hk, weight, y, b, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(hk.grad == 0)


def test_chunk_size_follows_the_memory_budget():
    mib = 1024 * 1024
    for backend in ("triton", "torch"):
        for dtype in DTYPES:
            for kw in ({}, {"weight_grad": True}, {"softcap": True}):
                rows = chunk_rows(128256, dtype, 64 * mib, backend=backend, **kw)  # Llama-3's vocabulary
                assert chunk_memory(rows, 128256, dtype, backend=backend, **kw) <= 64 * mib
                assert chunk_memory(rows + 64, 128256, dtype, backend=backend, **kw) > 64 * mib
    # every buffer counts: the torch twin's float32 working copy makes a bf16 row 6 bytes a logit
    assert chunk_memory(10, 1000, torch.bfloat16, backend="torch") == 10 * 1000 * 6
    assert chunk_memory(10, 1000, torch.bfloat16, backend="triton") == 10 * 1000 * 2
    assert chunk_rows(13, torch.float32, 1) == 1
    # the default budget: the size of the hidden states, within a floor of rows and a 256 MiB cap
    budget = default_chunk_budget(16384, 4096, 128256, torch.bfloat16)
    assert budget == 16384 * 4096 * 2 and chunk_rows(128256, torch.bfloat16, budget) >= 256
    small = default_chunk_budget(8, 64, 1000, torch.bfloat16, backend="torch")
    assert chunk_rows(1000, torch.bfloat16, small, backend="torch") == MIN_CHUNK_ROWS["torch"]
    assert default_chunk_budget(10**6, 8192, 1000, torch.float32) == DEFAULT_CHUNK_BYTES


@pytest.mark.parametrize("chunk_bytes", [None, 2 * 1024 * 1024])
def test_peak_memory_is_one_chunk(chunk_bytes, tmp_path):
    """The torch twin's peak resident memory above its inputs is the hidden-state gradient plus one
    chunk as `chunk_memory` counts it (measured in a child: no Triton interpreter, and every buffer
    of 64 KiB or more its own mapping, so that the resident set follows the live tensors)."""
    n, h, v = 1024, 256, 32768
    script = f"""
import gc, sys, torch
from fastsft.kernels import fused_linear_cross_entropy
from fastsft.kernels.linear_cross_entropy import chunk_memory, chunk_rows, default_chunk_budget
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
g = torch.Generator().manual_seed(0)
hid = torch.randn({n}, {h}, generator=g).bfloat16().requires_grad_()
w = (torch.randn({v}, {h}, generator=g) / 16).bfloat16()
y = torch.randint(0, {v}, ({n},), generator=g)
y[:{n} // 4] = -100
def run():
    fused_linear_cross_entropy(hid, w, y, backend="torch", chunk_bytes={chunk_bytes}).backward()
    hid.grad = None
run(); gc.collect()
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
run()
peak = (kib("VmHWM") - before) * 1024
budget = {chunk_bytes} or default_chunk_budget({n}, {h}, {v}, torch.bfloat16, backend="torch")
chunk = chunk_memory(chunk_rows({v}, torch.bfloat16, budget, backend="torch"), {v}, torch.bfloat16, backend="torch")
print(peak, chunk, hid.numel() * 2)
"""
    import os
    import subprocess
    import sys

    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, chunk, grad = map(int, out.stdout.split()[-3:])
    if chunk_bytes:
        assert chunk <= chunk_bytes
    # one chunk and the gradient, give or take 1 MiB of small buffers (not 4 chunks, not the logits)
    assert peak <= chunk + grad + 1024 * 1024, (peak, chunk, grad)
    assert peak >= chunk + grad - 1024 * 1024, (peak, chunk, grad)


    rows = chunk_rows(128256, torch.bfloat16)  # Llama-3's vocabulary
    assert rows * 128256 * 2 <= 256 * 1024 * 1024
    assert rows >= 512
    assert chunk_rows(13, torch.float32) >= 1


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-head", "trained-head"])
def test_float32_inputs_under_autocast(device, backend, amp, reduction, frozen):
    """The Trainer's bf16 / fp16 mixed precision runs the model under torch.autocast, while QLoRA's
    hidden states and lm_head are float32 (prepare_model_for_kbit_training casts them). The matmuls run
    in the autocast dtype, as the lm_head's own would; the gradients come back float32."""
    hidden, weight, b, y, seed = make(45, 32, 503, torch.float32, device)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    hk = hidden.clone().requires_grad_()
    wk = weight.clone().requires_grad_(not frozen)
    bk = b.clone().requires_grad_()
    with torch.autocast(device, dtype=amp):
        loss = fused_linear_cross_entropy(hk, wk, y, bk, backend=backend, chunk_size=8, **kw)
        stock = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(hidden, weight, b).float(), y, **kw
        )  # what transformers' head and loss give under the same autocast
    # the definition, on the inputs as autocast rounds them
    hr, wr, br = (t.to(amp).double().requires_grad_() for t in (hidden, weight, b))
    ref = linear_cross_entropy_reference(hr, wr, y, br, **kw)
    up = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
    (loss * up.float()).sum().backward()
    (ref * up).sum().backward()
    assert loss.dtype == torch.float32 and hk.grad.dtype == torch.float32 and bk.grad.dtype == torch.float32
    assert rel(loss, ref) < 2e-3, f"loss {rel(loss, ref)}, seed {seed}"
    assert rel(loss, stock) < 2e-3, f"vs stock {rel(loss, stock)}, seed {seed}"
    assert rel(hk.grad, hr.grad) < GRAD_TOL[amp], f"hidden grad {rel(hk.grad, hr.grad)}, seed {seed}"
    assert rel(bk.grad, br.grad) < GRAD_TOL[amp], f"bias grad {rel(bk.grad, br.grad)}, seed {seed}"
    if frozen:
        assert wk.grad is None
    else:
        assert wk.grad.dtype == torch.float32
        assert rel(wk.grad, wr.grad) < GRAD_TOL[amp], f"weight grad {rel(wk.grad, wr.grad)}, seed {seed}"


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_hidden_and_float32_head_under_autocast(device, backend, amp):
    """Unsloth / 16-bit LoRA with a float32 lm_head (or the reverse): the autocast dtype decides, and
    each gradient comes back in its own input's dtype."""
    hidden, weight, _, y, seed = make(21, 16, 97, amp, device, bias=False)
    weight = weight.float()
    hk, wk = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(device, dtype=amp):
        loss = fused_linear_cross_entropy(hk, wk, y, backend=backend)
    loss.backward()
    hr, wr = hidden.double().requires_grad_(), weight.to(amp).double().requires_grad_()
    ref = linear_cross_entropy_reference(hr, wr, y)
    ref.backward()
    assert hk.grad.dtype == amp and wk.grad.dtype == torch.float32
    assert rel(loss, ref) < 2e-3, seed
    assert rel(hk.grad, hr.grad) < GRAD_TOL[amp] and rel(wk.grad, wr.grad) < GRAD_TOL[amp], seed
