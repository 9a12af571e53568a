"""fused_linear_cross_entropy against the float64 reference: loss and every gradient (the row chunks,
kernels/linear_forward.py and ops.py, and the online tiles, kernels/online_tiles.py); the sizes it plans
are tests/kernels/test_memory_plan.py."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsft.kernels import chunk_rows, fused_linear_cross_entropy, linear_cross_entropy_reference
from fastsft.kernels.memory_plan import (
    MIN_TILE_COLS,
    chunk_memory,
    default_chunk_budget,
    tile_memory,
    tile_plan,
)

from _kernel_util import DTYPES, GRAD_TOL, LOSS_TOL, fresh_generator, params, rel


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


def check(hidden, weight, bias, y, seed, backend, *, frozen_weight=False, frozen_bias=False, **kw):
    hk = hidden.clone().requires_grad_()
    wk = weight.clone().requires_grad_(not frozen_weight)
    bk = bias.clone().requires_grad_(not frozen_bias) if bias is not None else None
    loss = fused_linear_cross_entropy(hk, wk, y, bk, backend=backend, **kw)
    hr = hidden.double().requires_grad_()
    wr = weight.double().requires_grad_(not frozen_weight)
    br = bias.double().requires_grad_() if bias is not None else None
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "chunk_bytes")}
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
    if bias is not None and not frozen_bias:
        assert rel(bk.grad, br.grad) < tol, f"bias grad {rel(bk.grad, br.grad)}, seed {seed}"
    return loss, hk


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-head", "trained-head"])
def test_matches_reference(device, backend, dtype, bias, frozen):
    """On the torch twin a frozen head takes the online tiles (here 8-row tiles of 256 + 247 columns),
    a trained one the row chunks."""
    hidden, weight, b, y, seed = make(45, 32, 503, dtype, device, bias=bias)
    if frozen and b is not None:
        b.requires_grad_(False)
    check(
        hidden,
        weight,
        b,
        y,
        seed,
        backend,
        label_smoothing=0.1,
        chunk_size=8,  # 8 does not divide 45
        frozen_weight=frozen,
        frozen_bias=frozen,
    )


@pytest.mark.parametrize("device,backend", params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-head", "trained-head"])
def test_reductions_and_chunking(device, backend, reduction, frozen):
    hidden, weight, b, y, seed = make(31, 16, 97, torch.float32, device)
    for chunk in (1, 7, 31, None):
        check(
            hidden, weight, b, y, seed, backend, reduction=reduction, chunk_size=chunk, frozen_weight=frozen
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ignored", [0.0, 0.3], ids=["all-kept", "ignored"])
def test_online_tiles_odd_sizes_smoothing_and_zloss(dtype, ignored):
    """The online path (torch twin, frozen head) over many vocabulary blocks of odd sizes (a 1000-word
    vocabulary in 256-column blocks: 4 blocks, the last of 232) and 5-row tiles (the last one short),
    every row kept or some ignored (the gathered rows stashed in the gradient's), with smoothing,
    z-loss and a frozen bias."""
    hidden, weight, b, y, seed = make(37, 24, 1000, dtype, "cpu", ignored=ignored)
    budget = tile_memory(5, MIN_TILE_COLS, 24, dtype)
    assert tile_plan(int((y != -100).sum()), 24, 1000, dtype, budget, rows=5) == (5, MIN_TILE_COLS)
    for kw in ({"label_smoothing": 0.1}, {"lse_square_scale": 1e-3}, {"reduction": "none"}):
        check(
            hidden,
            weight,
            b,
            y,
            seed,
            "torch",
            frozen_weight=True,
            frozen_bias=True,
            chunk_bytes=budget,
            **kw,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_online_tiles_rescale_when_a_later_block_holds_the_max(dtype):
    """Logits up to 120 whose largest sits in the last vocabulary block, 110 nats above the target's:
    exp(z - z_y) overflows every dtype, so the row is redone with a running max that grows by 100,
    more than the rescale slack, so the earlier blocks' sums must be rescaled (float16 takes the
    running max from the start)."""
    gen, seed = torch.Generator().manual_seed(0), 0
    n, h, v = 16, 8, 600
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.1
    weight[-50:] = hidden[:1].repeat(50, 1) / hidden[0].norm() ** 2 * 120  # row 0: logits of 120 at the end
    weight[:50] = hidden[:1].repeat(50, 1) / hidden[0].norm() ** 2 * 20  # and of 20 in the first block
    y = torch.randint(0, v, (n,), generator=gen)
    y[0] = 10  # the target in the first block, the max in the last
    budget = tile_memory(4, MIN_TILE_COLS, h, dtype)
    check(hidden.to(dtype), weight.to(dtype), None, y, seed, "torch", frozen_weight=True, chunk_bytes=budget)


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
def test_frozen_lm_head_gets_no_weight_gradient(device, backend, monkeypatch):
    """LoRA / QLoRA: the lm_head is frozen, so no weight gradient is computed or stored. Autograd
    hands back None either way, so count the matrix products the kernel runs: per chunk (or online
    tile: 211 columns are one block), the logits and the hidden gradient only (2), where a trainable
    head adds its weight gradient (3)."""
    hidden, weight, _, y, seed = make(25, 16, 211, torch.bfloat16, device, bias=False)
    check(hidden, weight, None, y, seed, backend, frozen_weight=True, chunk_size=4)
    chunks = -(-int((y != -100).sum()) // 4)
    for frozen, per_chunk in ((True, 2), (False, 3)):  # the trainable head shows the count sees dW
        with _Matmuls() as count:
            loss = fused_linear_cross_entropy(
                hidden.clone().requires_grad_(),
                weight.clone().requires_grad_(not frozen),
                y,
                backend=backend,
                chunk_size=4,
            )
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


MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul"}


def allocated_peak(fn) -> int:
    """Bytes: the peak of the memory torch's CPU allocator holds during `fn()` above what it held before,
    from the profiler's allocation events: every tensor and every operator's internal temporary (a
    float32 copy a mixed-dtype operation makes) except a matrix product's own workspace (oneDNN packs a
    block of its operand for a bf16 product and frees it before returning: the BLAS's, not the loss's).
    Only this process's allocations count, so the figure is the same whatever else the machine runs
    (the resident set is not: thread stacks, malloc arenas, oneDNN's scratch)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []  # (time, bytes, address, the operator it happened in)

    def walk(node, op):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, op))
        for child in node.children:
            walk(child, node)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, None)
    events.sort(key=lambda e: e[0])
    opened = {}  # address -> the matmul that allocated it
    workspace = set()  # indices of the allocation and free events of a matmul's own workspace
    for i, (_, size, ptr, op) in enumerate(events):
        if size > 0:
            opened[ptr] = (i, op if op is not None and op.name in MATMULS else None)
        elif ptr in opened:
            j, mm = opened.pop(ptr)
            if mm is not None and op is mm:  # freed inside the matmul that made it
                workspace.update((i, j))
    live = peak = 0
    for i, (_, size, _, _) in enumerate(events):
        if i not in workspace:
            live += size
            peak = max(peak, live)
    return peak


@pytest.mark.parametrize("path", ["online", "online-2MiB", "online-smoothing", "rows-softcap"])
def test_peak_memory_is_one_chunk(path):
    """The torch twin's peak memory above its inputs is the hidden-state gradient plus its tiles
    (online, frozen head) or one chunk (row chunks, here for a softcap) as `tile_memory` /
    `chunk_memory` count them: every allocation the loss makes, kernels' temporaries included."""
    softcap = 30.0 if path == "rows-softcap" else None
    n, h, v = 256 if softcap else 1024, 256, 32768  # (fewer 8-row chunks: each op is profiled)
    chunk_bytes = 2 * 1024 * 1024 if path == "online-2MiB" else None
    eps = 0.1 if path == "online-smoothing" else 0.0  # its sum_j W_j must not copy W to float32
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, generator=g) / 16).bfloat16()
    y = torch.randint(0, v, (n,), generator=g)
    y[: n // 4] = -100

    def run():
        loss = fused_linear_cross_entropy(
            hid, w, y, backend="torch", chunk_bytes=chunk_bytes, softcap=softcap, label_smoothing=eps
        )
        loss.backward()
        hid.grad = None

    run()
    peak = allocated_peak(run)
    bf = torch.bfloat16
    if softcap is None:
        budget = chunk_bytes or default_chunk_budget(n, h, v, bf, online=True)
        chunk = tile_memory(*tile_plan(n - n // 4, h, v, bf, budget), h, bf)
    else:
        kw = dict(backend="torch", softcap=True)
        budget = default_chunk_budget(n, h, v, bf, **kw)
        chunk = chunk_memory(chunk_rows(v, bf, budget, **kw), v, bf, **kw)
    grad = hid.numel() * 2
    assert chunk <= budget
    # one chunk and the gradient, give or take 64 KiB of per-row vectors (not 2 chunks, not the logits)
    slack = 64 * 1024
    assert chunk + grad - slack <= peak <= chunk + grad + slack, (peak, chunk, grad, peak - chunk - grad)


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


@pytest.mark.slow  # beside busy processes
def test_online_tiles_leave_cores_other_processes_hold(monkeypatch):
    """On the CPU, where OpenMP's threads spin while they wait, each online tile takes only the cores no
    other process is running on (its many small parallel operations wait for a thread that waits for a
    core): beside a busy process per core, one thread; and never more than it was given. Where they
    sleep (OMP_WAIT_POLICY=PASSIVE, the test session's policy) every thread is kept."""
    import os
    import subprocess
    import sys
    import time

    from fastsft.kernels.online_tiles import free_cpu_threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert free_cpu_threads(4) == 4
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert free_cpu_threads(1) == 1
    assert 1 <= free_cpu_threads(4) <= 4
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        deadline, seen = time.monotonic() + 10, []
        while time.monotonic() < deadline:  # (the busy processes need a moment to start)
            seen.append(free_cpu_threads(cores))
            if seen[-3:] == [1, 1, 1]:
                break
            time.sleep(0.1)
        assert seen[-3:] == [1, 1, 1], seen
    finally:
        for p in busy:
            p.kill()
            p.wait()
