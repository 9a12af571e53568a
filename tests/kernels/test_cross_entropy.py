"""fused_cross_entropy against the float64 reference, forward and backward, on fresh random inputs.

Runs the Triton kernel (natively on CUDA, under TRITON_INTERPRET=1 on the CPU) and the PyTorch twin.
"""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastsft.kernels import cross_entropy_reference, fused_cross_entropy
from fastsft.kernels.cross_entropy import _tanh

from _kernel_util import DEVICES, DTYPES, GRAD_TOL, LOSS_TOL, fresh_generator, params, rel
from _launches import launch_counts


def make(n, v, dtype, device, *, scale=3.0, ignored=0.25):
    gen, seed = fresh_generator()
    x = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    if ignored == "all":
        y[:] = -100
    elif ignored:
        y[torch.rand(n, generator=gen) < ignored] = -100
    return x.to(device), y.to(device), seed


def check(x, y, seed, backend, **kw):
    """Loss and gradient of the kernel vs the float64 reference, with a random upstream gradient."""
    xk = x.clone().requires_grad_()
    loss = fused_cross_entropy(xk, y, backend=backend, **kw)
    xr = x.double().requires_grad_()
    ref = cross_entropy_reference(xr, y, **kw)
    assert loss.dtype == torch.float32
    up = torch.rand(ref.shape, dtype=torch.float64, device=x.device) + 0.5
    (loss * up.float()).sum().backward()
    (ref * up).sum().backward()
    assert xk.grad.dtype == x.dtype
    assert torch.isfinite(xk.grad).all(), f"seed {seed}"
    assert rel(loss, ref) < LOSS_TOL, f"loss {loss} vs {ref}, seed {seed}"
    assert rel(xk.grad, xr.grad) < GRAD_TOL[x.dtype], f"grad error {rel(xk.grad, xr.grad)}, seed {seed}"
    return loss, xk.grad


def test_reference_is_torch_cross_entropy():
    """The reference is the definition: torch's own cross_entropy in float64, where that is defined."""
    x, y, seed = make(11, 29, torch.float64, "cpu")
    y[0] = 3  # at least one label kept
    for eps in (0.0, 0.2):
        for red in ("mean", "sum", "none"):
            ours = cross_entropy_reference(x, y, label_smoothing=eps, reduction=red)
            torchs = F.cross_entropy(x, y, label_smoothing=eps, reduction=red, ignore_index=-100)
            assert torch.allclose(ours, torchs, rtol=1e-12, atol=1e-12), (eps, red, seed)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1, 13), (37, 1000), (3, 32771)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference(device, backend, dtype, eps, shape):
    x, y, seed = make(*shape, dtype, device)
    check(x, y, seed, backend, label_smoothing=eps)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0.0, 0.5], ids=["none-ignored", "half-ignored"])
def test_reductions(device, backend, reduction, ignored):
    x, y, seed = make(19, 257, torch.float32, device, ignored=ignored)
    check(x, y, seed, backend, reduction=reduction, label_smoothing=0.05)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_all_labels_ignored_gives_zero_not_nan(device, backend, reduction, eps):
    x, y, _ = make(5, 77, torch.bfloat16, device, ignored="all")
    xk = x.clone().requires_grad_()
    loss = fused_cross_entropy(xk, y, reduction=reduction, label_smoothing=eps, backend=backend)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(xk.grad == 0)


@pytest.mark.parametrize("device,backend", params())
def test_num_items_in_batch(device, backend):
    """The sum divided by the accumulated batch's token count: not the local mean, exactly once."""
    x, y, seed = make(23, 301, torch.float32, device)
    n_local = int((y != -100).sum())
    for num in (n_local * 3, torch.tensor(n_local * 3, device=device)):
        loss, grad = check(x, y, seed, backend, num_items_in_batch=num, label_smoothing=0.1)
        total = cross_entropy_reference(x, y, reduction="sum", label_smoothing=0.1)
        assert abs(float(loss.detach()) - float(total) / (n_local * 3)) < 1e-4 * abs(float(total))


@pytest.mark.parametrize("device,backend", params())
def test_strided_rows(device, backend):
    """Rows of a wider buffer (a causal LM's logits[:, :-1] flattened, say) are read in place."""
    x, y, seed = make(17, 300, torch.float32, device)
    wide = torch.zeros(17, 333, device=device)
    wide[:, 5:305] = x
    view = wide[:, 5:305]
    assert not view.is_contiguous()
    check(view, y, seed, backend, label_smoothing=0.1)


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits_do_not_overflow(device, backend, dtype):
    x, y, seed = make(9, 517, dtype, device, scale=1e4)
    check(x, y, seed, backend, label_smoothing=0.1)


@pytest.mark.parametrize("device,backend", params())
def test_minus_inf_logits(device, backend):
    """A masked-out vocabulary entry (-inf) and whole -inf blocks: finite loss and gradient, no NaN."""
    x, y, seed = make(6, 70000, torch.float32, device, ignored=0.0)
    x[:, 100:200] = float("-inf")
    x[:, 40000:] = float("-inf")  # whole vocabulary blocks masked
    y = torch.where((y >= 100) & (y < 200) | (y >= 40000), torch.zeros_like(y), y)
    loss, grad = check(x, y, seed, backend)
    assert torch.isfinite(loss)
    assert torch.all(grad[:, 100:200] == 0)
    # with smoothing the uniform term over a -inf entry is infinite, as in the reference: never NaN
    xk = x.clone().requires_grad_()
    smoothed = fused_cross_entropy(xk, y, label_smoothing=0.1, backend=backend)
    smoothed.backward()
    assert smoothed == float("inf") and torch.isfinite(xk.grad).all()


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap_and_z_loss(device, backend, dtype):
    x, y, seed = make(13, 1031, dtype, device, scale=20.0)
    check(x, y, seed, backend, softcap=30.0, lse_square_scale=1e-4, label_smoothing=0.1)


@pytest.mark.parametrize("device,backend", params())
def test_inplace_backward_writes_the_gradient_over_the_logits(device, backend):
    x, y, seed = make(8, 999, torch.bfloat16, device)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # an intermediate, as a model's logits are
    fused_cross_entropy(logits, y, backend=backend, inplace_backward=True).backward()
    xr = x.double().requires_grad_()
    cross_entropy_reference(xr, y).backward()
    assert rel(leaf.grad, xr.grad) < GRAD_TOL[torch.bfloat16], seed
    # the logits' own storage now holds their gradient (leaf * 1.0: the leaf's gradient, bit for bit);
    # a gradient written to a fresh buffer would leave the logits as they were
    assert torch.equal(logits.detach(), leaf.grad)
    assert not torch.equal(logits.detach(), x)


@pytest.mark.parametrize("device,backend", params())
def test_without_inplace_the_logits_are_left_alone(device, backend):
    x, y, _ = make(8, 999, torch.bfloat16, device)
    logits = x.clone().requires_grad_() * 1.0
    fused_cross_entropy(logits, y, backend=backend).backward()
    assert torch.equal(logits.detach(), x)


@pytest.mark.parametrize("device,backend", params())
def test_no_grad_computes_no_gradient(device, backend):
    x, y, seed = make(4, 64, torch.float32, device)
    with torch.no_grad():
        loss = fused_cross_entropy(x, y, backend=backend)
    assert rel(loss, cross_entropy_reference(x, y)) < LOSS_TOL, seed


@pytest.mark.parametrize("device", DEVICES)
def test_triton_backend_counts_launches(device):
    from fastsft.kernels import triton_available

    if not triton_available(device):
        pytest.skip("Triton cannot run here")
    x, y, _ = make(4, 64, torch.float32, device)
    before = launch_counts["cross_entropy"]
    fused_cross_entropy(x.requires_grad_(), y, backend="triton")
    assert launch_counts["cross_entropy"] == before + 1


def test_bad_input_is_a_clear_error():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="labels"):
        fused_cross_entropy(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        fused_cross_entropy(x, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(TypeError, match="float32"):
        fused_cross_entropy(x.double(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="backend"):
        fused_cross_entropy(x, torch.zeros(4, dtype=torch.long), backend="cuda")
    with pytest.raises(RuntimeError, match="outside"):
        fused_cross_entropy(x, torch.tensor([0, 1, 10, -100]), backend="torch")


def test_triton_where_it_cannot_run_is_a_clear_error(monkeypatch):
    from fastsft.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "triton_available", lambda device: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="triton")


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Applies the cross-entropy kernel's own `_tanh` (the softcap's) elementwise."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _tanh(x), mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_softcap_tanh_is_accurate_in_float32_near_zero_and_far_out(device):
    """softcap * tanh(x / softcap) with a 30-softcap sees x / 30 ~ 1e-3 for ordinary logits: a tanh
    built from exp alone loses most of its float32 digits there (1 - exp(-2|x|) cancels)."""
    from fastsft.kernels import triton_available

    if not triton_available(device):
        pytest.skip("Triton cannot run here")
    gen, seed = fresh_generator()
    mag = torch.logspace(-8, 1.5, 4001, dtype=torch.float64)  # 1e-8 .. 31.6, through the 0.25 switch
    jitter = 1 + 0.01 * torch.rand(mag.shape, generator=gen, dtype=torch.float64)
    x64 = torch.cat([mag * jitter, -mag * jitter, torch.tensor([0.0, 0.25, -0.25, 100.0, -100.0])])
    x = x64.float().to(device)
    out = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    want = torch.tanh(x.double().cpu())
    err = ((out.double().cpu() - want).abs() / want.abs().clamp(min=1e-300)).nan_to_num(0.0)
    ulp = 2.0**-23
    assert float(err.max()) < 8 * ulp, (
        f"worst relative error {float(err.max()):.3g} at x = {float(x[err.argmax()])}, seed {seed}"
    )
    assert float(out[x == 0].abs().max()) == 0.0
    # the float32 twin uses torch.tanh, which is that accurate too
    assert float(((torch.tanh(x.cpu()).double() - want).abs() / want.abs().clamp(min=1e-300)).max()) < 8 * ulp


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
def test_logits_from_an_autocast_head(device, backend, amp):
    """The logits-in route under the Trainer's mixed precision: a float32 head under autocast gives
    16-bit logits; the loss is float32, and the gradient reaches the float32 hidden states."""
    gen, seed = fresh_generator()
    hidden = torch.randn(19, 24, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(301, 24, generator=gen) / 24**0.5 * 2).to(device)
    y = torch.randint(0, 301, (19,), generator=gen).to(device)
    y[::4] = -100
    with torch.autocast(device, dtype=amp):
        logits = F.linear(hidden, weight)
        loss = fused_cross_entropy(logits, y, backend=backend, label_smoothing=0.1, inplace_backward=True)
    assert logits.dtype == amp and loss.dtype == torch.float32
    loss.backward()
    hr = hidden.detach().to(amp).double().requires_grad_()
    ref = cross_entropy_reference(hr @ weight.to(amp).double().T, y, label_smoothing=0.1)
    ref.backward()
    assert rel(loss, ref) < 2e-3, seed
    assert hidden.grad.dtype == torch.float32 and rel(hidden.grad, hr.grad) < GRAD_TOL[amp], seed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_gpu_block_for_an_odd_vocabulary_matches_reference(monkeypatch, dtype):
    """A row of V = 32001 (not a multiple of 16, so not provably aligned) takes the GPU's smaller block
    (UNALIGNED_MAX_BLOCK, chosen so that it compiles without spills: test_aot.py); the interpreter runs
    that very block here, with every option, against float64."""
    from fastsft.kernels import cross_entropy as ce

    if not ce.triton_available("cpu"):
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    monkeypatch.setattr(ce, "interpreting", lambda: False)  # the block a GPU launch would get
    assert ce._block_and_warps(32001, aligned=False)[0] == ce.UNALIGNED_MAX_BLOCK < 32001
    assert ce._block_and_warps(32000, aligned=True)[0] == 8192
    x, y, seed = make(3, 32001, dtype, "cpu")
    y[0] = 32000  # the last column, in the last (partial) block
    check(x, y, seed, "triton", label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0)
