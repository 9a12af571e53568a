"""The online-softmax path of the fused linear cross-entropy (the PyTorch twin with a frozen lm_head,
LoRA's case, on the CPU). The hidden-state gradient of a row is a softmax-weighted sum of lm_head rows,

    dL/dh = sum_j p_j W_j - (1 - eps) W_y - eps / V sum_j W_j        p = softmax(h W^T)

which accumulates over vocabulary blocks as flash attention's output does (Q = h, K = V = W): per tile
of (rows x cols) logits, e = exp(z - m), s += sum(e), acc += e @ W_b; at the end dL/dh = acc / s - ...
So a row's logits are never all alive at once, the memory is one tile whatever the vocabulary, and
still only two matmuls per tile (the logits and their product with W), both with many rows. The shift m
is the row's own target logit, subtracted inside the first matmul (rounded once, after its float32
sum): the target's term is exp(0) = 1, so s >= 1 and nothing underflows; float32 (and bfloat16, its
exponent range) hold exp(z - m) until a logit passes the target's by ~88 nats, so no running max is
kept and nothing is rescaled (rows that overflow are redone with a running max, as float16 always is).
The tile's gathered hidden rows are stashed in the rows of the gradient they will produce. On a CPU
a tile's operations use the intra-op threads the cores other processes leave free at its start
(`free_cpu_threads`; all of them on an idle machine or where waiting threads sleep): at a few hundred rows the matmuls run near the
cores' peak, and one tile is alive, not one per thread; on a shared machine a thread waiting for a
core would stall each of the tile's many small parallel operations.
"""

from __future__ import annotations

import os

import torch

from .memory_plan import F32, TEMP_ELEMENTS

# The online softmax rescales only when a block's max passes the running one by this much: exp(20)
# is far inside the float32 / bfloat16 range, and skipping the rescale saves a pass over acc. float16
# tiles must stay <= 1 (its largest number is 65504 = exp(11.1)), so they always rescale.
RESCALE_SLACK = {torch.float16: 0.0, torch.bfloat16: 20.0, torch.float32: 20.0}


def _online_tiles(hidden, keep, w, b, y, scale, opts, per_row, grad_h, pre, rows, cols, tile_threads=None):
    """The online path on the kept rows: their losses into `per_row`, their hidden-state gradients
    (times `scale`) into `grad_h` when it is given. `pre` = (z_y, row_sum, w_sum) of every kept row,
    from `_row_terms`."""
    n_hidden, cd, dev = hidden.shape[1], w.dtype, w.device
    eps, zl, n_cols = opts["label_smoothing"], opts["lse_square_scale"], w.shape[0]
    z_y_all, row_sum_all, w_sum = pre
    n = keep.numel()
    rows = min(rows, n)
    bufs = _TileBuffers(rows, cols, n_hidden, cd, dev, grad=grad_h is not None)
    all_kept = keep.numel() == hidden.shape[0]
    # the gathered hidden rows of a tile live in the rows of the gradient it will write (`_tile_hidden`)
    hbuf = None
    if (grad_h is None and not all_kept) or (all_kept and hidden.dtype != cd):
        hbuf = torch.empty((rows, n_hidden), dtype=cd, device=dev)
    for i in range(0, n, rows):
        if tile_threads is not None:
            tile_threads()
        idx = keep[i : i + rows]
        r = idx.numel()
        h_c, stash = _tile_hidden(hidden, idx, i, r, all_kept, cd, hbuf, grad_h)
        z_y = z_y_all[i : i + r]
        a = bufs.acc[:r].zero_() if bufs.acc is not None else None
        if cd == torch.float16:  # exp overflows float16 at 11 nats: the running max throughout
            m, s = _scan_blocks(h_c, w, b, cols, bufs, a)
        else:
            m, s = z_y.to(F32, copy=True), _shifted_scan(h_c, w, b, -z_y, cols, bufs, a)
            _rescan_overflow(h_c, w, b, cols, m, s, a)
        # the loss: lse - z_y, the target logit rounded to the logits' dtype as every other one
        log_s = s.log()
        lse = m + log_s
        loss = lse - z_y.float()
        if eps:  # (1 - eps) nll + eps mean_j(lse - z_j)
            loss = (1 - eps) * loss + eps * (lse - row_sum_all[i : i + r] / n_cols)
        if zl:
            loss = loss + zl * lse * lse
        per_row[i : i + r] = loss
        if a is None:
            continue
        # dL/dh = (coef acc / s - (1 - eps) W_y - eps / V sum_j W_j) * scale, coef = 1 + 2 zl lse
        sc = scale[i : i + r] if scale.dim() else scale.expand(r)
        coef = sc / s
        if zl:
            coef = coef * (1 + 2 * zl * lse)
        a.mul_(coef[:, None])
        w_y_coef = (-(1 - eps) * sc)[:, None].expand(r, bufs.width)
        for hs, part in bufs.slices(r, n_hidden):  # - (1 - eps) sc W_y, one H slice at a time
            w_y = torch.index_select(w[:, hs], 0, y[i : i + r], out=part)
            _grouped("addcmul_", a[:, hs], w_y, bufs.scratch, w_y_coef[:, : w_y.shape[1]])
        if eps:
            a.addr_(sc * (-eps / n_cols), w_sum)
        if all_kept:
            grad_h[i : i + r].copy_(a)
            continue
        if stash is not None:
            stash.zero_()  # its ignored rows stay zero; its kept ones are this tile's, written next
        for g0 in range(0, r, bufs.part_rows):
            g = slice(g0, min(r, g0 + bufs.part_rows))
            grad_h.index_copy_(0, idx[g], bufs.part_view(g.stop - g0, n_hidden).copy_(a[g]))


class _TileBuffers:
    """The online path's buffers: the (rows x cols) logits tile in the compute dtype (and, on the float16
    running-max path, its float32 exponentials), the float32 gradient accumulator (rows x H), and
    `part`, the product of a block with the lm_head in the compute dtype, one H slice of at most
    `cols` columns at a time (so it never outgrows the tile)."""

    def __init__(self, rows, cols, n_hidden, cd, dev, *, grad, running_max=None):
        if running_max is None:
            running_max = cd == torch.float16
        self.z = torch.empty(rows * cols, dtype=cd, device=dev)
        # the running-max scan's float32 exponentials (a float32 tile holds its own)
        self.e = torch.empty(rows * cols, dtype=F32, device=dev) if running_max and cd != F32 else None
        self.acc = torch.empty((rows, n_hidden), dtype=F32, device=dev) if grad else None
        self.width = min(n_hidden, cols)
        self.part = torch.empty(rows * self.width, dtype=cd, device=dev)
        self.part_rows = max(1, rows * self.width // n_hidden)  # whole rows of H that fit in `part`
        # a float32 row group (`_grouped`, the exponentials' sums); float32 tiles need none
        n_scratch = 0 if cd == F32 else min(rows * max(cols, n_hidden), max(TEMP_ELEMENTS, cols, n_hidden))
        self.scratch = torch.empty(n_scratch, dtype=F32, device=dev)

    def slices(self, r, n_hidden):
        """(H slice, a (r x its width) view of `part`) covering H."""
        for h0 in range(0, n_hidden, self.width):
            n = min(self.width, n_hidden - h0)
            yield slice(h0, h0 + n), self.part[: r * n].view(r, n)

    def part_view(self, r, n_hidden):
        return self.part[: r * n_hidden].view(r, n_hidden)


def _add_product(a, e, w_b, bufs):
    """a += e @ w_b: in float32 directly; in 16 bits (3x faster on CPUs with bf16 instructions) one H
    slice at a time through `bufs.part`, summed into the float32 `a`."""
    if e.dtype == F32:
        a.addmm_(e, w_b)
        return
    for hs, part in bufs.slices(e.shape[0], a.shape[1]):
        _grouped("add_", a[:, hs], torch.mm(e, w_b[:, hs], out=part), bufs.scratch)


def _grouped(op, a, x, scratch, *extra):
    """`a.op(x, *extra)` (an in-place method: "add_", "addcmul_") for a float32 `a` and a 16-bit `x`,
    through the float32 `scratch` a row group at a time: torch would make a float32 copy of `x` of its
    own (a fresh allocation per call, and a page fault per page of it when large buffers are mappings
    of their own, as with MALLOC_MMAP_THRESHOLD_: ~10x slower here)."""
    if x.dtype == a.dtype:
        getattr(a, op)(x, *extra)
        return
    n = x.shape[1]
    g = max(1, scratch.numel() // n)
    for g0 in range(0, x.shape[0], g):
        rows = slice(g0, g0 + g)
        x_g = x[rows]
        getattr(a[rows], op)(scratch[: x_g.numel()].view(x_g.shape).copy_(x_g), *(t[rows] for t in extra))


def _tile_hidden(hidden, idx, i, r, all_kept, cd, hbuf, grad_h):
    """(the tile's hidden rows in the compute dtype, the gradient rows they were stashed in or None).
    With ignored rows, the kept rows idx = keep[i : i + r] are gathered into rows keep[i] ..
    keep[i] + r - 1 of `grad_h`: every one of those is a row of this tile or an ignored row (keep is
    increasing), none is written by any other tile, and this tile writes its own rows only once the
    gathered ones are no longer read. So the gather needs no buffer."""
    if all_kept:
        if hidden.dtype == cd:
            return hidden[i : i + r], None
        return hbuf[:r].copy_(hidden[i : i + r]), None
    if grad_h is not None:
        start = int(idx[0])
        out = stash = grad_h[start : start + r]
    else:
        out, stash = hbuf[:r], None
    if hidden.dtype == cd:
        return torch.index_select(hidden, 0, idx, out=out), stash
    for g0 in range(0, r, 32):  # float32 hidden states under 16-bit autocast: 32 rows' float32 copy at a time
        out[g0 : g0 + 32].copy_(hidden.index_select(0, idx[g0 : g0 + 32]))
    return out, stash


def _shifted_scan(h_c, w, b, shift, cols, bufs, a):
    """Step 1 of a tile in bfloat16 / float32: s = sum_j exp(z_j - z_y) (float32) and a += sum_j
    exp(z_j - z_y) W_j, over the vocabulary blocks. The shift is the row's own target logit, added
    inside the matmul (addmm: rounded once, after the float32 sum, so the logits near the target are
    the most exact), so no running max is kept and nothing is rescaled: the target's own term is
    exp(0) = 1, so s >= 1 (no underflow), and exp(z_j - z_y) overflows only where a logit passes the
    target's by ~88 nats (`_rescan_overflow` redoes those rows). Per block: the matmul, exp in place,
    a row sum, and the product with W_b. Returns s."""
    r, n_cols = h_c.shape[0], w.shape[0]
    s = torch.zeros(r, dtype=F32, device=w.device)
    block_sum = torch.empty(r, dtype=F32, device=w.device)
    col = shift[:, None]
    for v0 in range(0, n_cols, cols):
        c = min(cols, n_cols - v0)
        w_b = w[v0 : v0 + c]
        z = bufs.z[: r * c].view(r, c)
        if b is None:  # (addmm with the shift as its input would copy the expanded shift first)
            z.copy_(col.expand(r, c)).addmm_(h_c, w_b.T)
        else:  # a bias and the shift would round together: the logits, then the shift
            z.copy_(b[v0 : v0 + c].expand(r, c)).addmm_(h_c, w_b.T).add_(col)
        z.exp_()  # (in 16 bits: computed in float32, rounded once, as the matmul below takes it)
        if z.dtype == F32:
            torch.sum(z, 1, out=block_sum)
        else:  # summed in float32 through the scratch (a float32 sum of 16 bits would copy the tile)
            g = max(1, bufs.scratch.numel() // c)
            for g0 in range(0, r, g):
                z_g = z[g0 : g0 + g]
                torch.sum(
                    bufs.scratch[: z_g.numel()].view(z_g.shape).copy_(z_g), 1, out=block_sum[g0 : g0 + g]
                )
        s += block_sum
        if a is not None:
            _add_product(a, z, w_b, bufs)
    return s


def _rescan_overflow(h_c, w, b, cols, m, s, a):
    """Rows whose shifted sums overflowed (a logit ~88 nats above the target's, or non-finite input):
    redone with the running max of `_scan_blocks`, their m, s and a written in place."""
    bad = ~torch.isfinite(s)
    if a is not None:
        bad |= ~torch.isfinite(a.sum(1))
    if not bool(bad.any()):
        return
    rows = bad.nonzero().squeeze(1)
    h_b = h_c.index_select(0, rows)
    bufs = _TileBuffers(
        rows.numel(), cols, h_c.shape[1], w.dtype, w.device, grad=a is not None, running_max=True
    )
    a_b = bufs.acc.zero_() if a is not None else None
    m_b, s_b = _scan_blocks(h_b, w, b, cols, bufs, a_b)
    m.index_copy_(0, rows, m_b)
    s.index_copy_(0, rows, s_b)
    if a is not None:
        a.index_copy_(0, rows, a_b)


def _scan_blocks(h_c, w, b, cols, bufs, a):
    """Step 1 of a tile with a running max (float16, and rows `_shifted_scan` overflowed): over the
    vocabulary blocks, the running max `m` and `s` = sum_j exp(z_j - m) (float32), and `a` +=
    sum_j exp(z_j - m) W_j when `a` is given. Returns (m, s)."""
    r, n_cols, cd, dev = h_c.shape[0], w.shape[0], w.dtype, w.device
    slack = RESCALE_SLACK[cd]
    # the block sums go to rows of one buffer, summed once at the end
    n_blocks = -(-n_cols // cols)
    sums = torch.empty((n_blocks, r), dtype=F32, device=dev)
    m_b = torch.empty(r, dtype=cd, device=dev)
    m = m_cap = None
    for k, v0 in enumerate(range(0, n_cols, cols)):
        c = min(cols, n_cols - v0)
        w_b = w[v0 : v0 + c]
        z = bufs.z[: r * c].view(r, c)
        if b is not None:
            torch.addmm(b[v0 : v0 + c], h_c, w_b.T, out=z)
        else:
            torch.mm(h_c, w_b.T, out=z)
        torch.amax(z, 1, out=m_b)  # exact in the logits' dtype
        if m is None:
            m = m_b.to(F32, copy=True)  # (m_b is refilled by the next block)
            m_cap = m + slack
        elif bool((m_b > m_cap).any()):  # rescale only when exp(z - m) could grow too large
            m_new = torch.maximum(m, m_b.float())
            alpha = (m - m_new).exp_()
            sums[:k].mul_(alpha)
            if a is not None:
                a.mul_(alpha[:, None])
            m, m_cap = m_new, m_new + slack
        e = z if cd == F32 else bufs.e[: r * c].view(r, c)
        torch.sub(z, m[:, None], out=e)  # in float32: a 16-bit difference would lose the small p_j
        e.exp_()
        torch.sum(e, 1, out=sums[k])
        if a is not None:
            _add_product(a, e if cd == F32 else z.copy_(e), w_b, bufs)
    return m, sums.sum(0)


def _row_terms(hidden, keep, w, b, y, eps):
    """Per kept row, before any tile buffer exists: the target logit z_y (a float32 dot product rounded
    once to the compute dtype, as every logit is), and with label smoothing sum_j z_j = h . sum_j W_j
    (+ sum_j b_j) (float32) and sum_j W_j itself. In 16-row groups, so their copies stay small."""
    n, cd = keep.numel(), w.dtype
    z_y = torch.empty(n, dtype=cd, device=w.device)
    w_sum = _column_sum(w) if eps and n else None
    row_sum = torch.empty(n, dtype=F32, device=w.device) if w_sum is not None else None
    b_sum = b.sum(dtype=F32) if b is not None else 0.0
    for g0 in range(0, n, 16):
        rows = slice(g0, g0 + 16)
        h_g = hidden.index_select(0, keep[rows]).to(cd)
        z = torch.linalg.vecdot(h_g.float(), w.index_select(0, y[rows]).float())
        if b is not None:  # the bias added before the one rounding, as addmm's epilogue does
            z += b.index_select(0, y[rows]).float()
        z_y[rows] = z
        if row_sum is not None:
            row_sum[rows] = torch.mv(h_g.float(), w_sum) + b_sum
    return z_y, row_sum, w_sum


def _column_sum(w):
    """sum_j W_j in float32, as matrix-vector products of 256-row float32 blocks: a whole-W float32 sum
    copies W, and torch's CPU column sums of a 16-bit W are ~100x slower."""
    w_sum = torch.zeros(w.shape[1], dtype=F32, device=w.device)
    blk = torch.empty((min(256, w.shape[0]), w.shape[1]), dtype=F32, device=w.device)
    ones = torch.ones(blk.shape[0], dtype=F32, device=w.device)
    for v0 in range(0, w.shape[0], 256):
        c = min(256, w.shape[0] - v0)
        w_sum += torch.mv(blk[:c].copy_(w[v0 : v0 + c]).T, ones[:c])
    return w_sum


def online_chunks(hidden, keep, w, b, y, scale, opts, *, compute_grad, plan):
    """Per-row losses of the kept rows and, with `compute_grad`, the hidden-state gradient (full-size,
    zero on ignored rows), in tiles of `plan` = (rows, cols) kept rows and vocabulary columns."""
    rows, cols = plan
    n = keep.numel()
    per_row = torch.empty(n, dtype=F32, device=w.device)
    grad_h = None
    if compute_grad:
        alloc = torch.empty if n == hidden.shape[0] else torch.zeros
        grad_h = alloc(hidden.shape, dtype=w.dtype, device=w.device)
    if n == 0:
        return per_row, grad_h
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # sum_j W_j's 2 V / 256 small operations: 1.5 s with 2 intra-op threads on a
    try:  # busy 2-core machine, 22 ms with one (V = 32768, H = 1024)
        pre = _row_terms(hidden, keep, w, b, y, opts["label_smoothing"])
        if w.device.type == "cpu":  # each row tile with the threads the cores can give it now
            torch.set_num_threads(threads)
            tile_threads = lambda: torch.set_num_threads(free_cpu_threads(threads))  # noqa: E731
        else:
            tile_threads = None
        _online_tiles(hidden, keep, w, b, y, scale, opts, per_row, grad_h, pre, rows, cols, tile_threads)
    finally:
        torch.set_num_threads(threads)
    return per_row, grad_h


def _running_elsewhere() -> int | None:
    """Threads of other processes that are running or runnable now (Linux: /proc/stat's procs_running,
    less this process's own running threads), or None where /proc is not there."""
    try:
        with open("/proc/stat", "rb") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith(b"procs_running"))
        own = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                    own += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
            except OSError:  # the thread ended meanwhile
                pass
        return max(0, running - max(own, 1))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def free_cpu_threads(threads: int) -> int:
    """The intra-op threads the online tiles use on the CPU: `threads`, or as many as the cores other
    processes leave free right now (at least 1). Each tile runs ~15 small parallel operations per
    vocabulary block, each a barrier that waits for its slowest thread: when another process holds a
    core, that thread waits for a time slice at every barrier. Measured on 2 cores, bf16, H = 1024,
    N = 512, beside two busy processes: 2 threads 1175 ms, 1 thread 151 ms, the stock loss 233 ms
    (V = 8192); on an idle machine 2 threads are ~1.8x faster than one. Linux reads the runnable
    threads (an instant, cheap count); elsewhere the 1-minute load average stands in for it.

    Under OMP_WAIT_POLICY=PASSIVE (which the `fastsft` command sets, `fastsft.threads`) a thread that
    waits at a barrier sleeps instead of spinning, and each thread is one more share of the cores under
    the kernel's fair scheduler: every thread is kept. Measured beside two busy processes on 2 cores
    (V = 8192, PASSIVE, medians of 7): one thread 75-130 ms, both 81-155 ms, the stock loss (both
    threads) 104-119 ms; on CI's machine one thread took 172 ms to the stock loss's 132 ms. The spread is
    the load's, not the thread count's; the fair share is the reason."""
    if threads <= 1:
        return 1
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    others = _running_elsewhere()
    if others is None:
        try:
            others = max(0, round(os.getloadavg()[0]) - 1)
        except OSError:
            return threads
    return max(1, min(threads, cores - others))
