"""Fused linear cross-entropy: from the last hidden states to the loss, never holding the full logits.

    loss = cross_entropy(softcap(hidden @ weight.T + bias), labels)

The forward computes the gradients too, so backward only scales them and no logit is computed twice.
Rows whose label is ignored (the prompt) are skipped (gathered chunk by chunk): FLOPs and memory scale
with the supervised tokens only (this costs one host sync to learn their number). Two ways through:

Row chunks (the Triton path; the PyTorch twin when the lm_head or its bias trains, or with a softcap):

    for each chunk of supervised tokens:
        z  = h_c @ W.T (+ b)                  one (chunk x V) buffer, allocated once, the only one alive
        dz = ce_rows(z, y_c)  written over z   our fused cross-entropy kernel (or the PyTorch twin below)
        dh_c = dz @ W;  dW += dz.T @ h_c;  db += dz.sum(0)     (dW / db only when W / b need grad)

Tiles with an online softmax (the PyTorch twin with a frozen lm_head, LoRA's case, on the CPU). The
hidden-state gradient of a row is a softmax-weighted sum of lm_head rows,

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
(`free_cpu_threads`; all of them on an idle machine): at a few hundred rows the matmuls run near the
cores' peak, and one tile is alive, not one per thread; on a shared machine a thread waiting for a
core would stall each of the tile's many small parallel operations.

A chunk's or tile's size comes from a memory budget that counts every buffer it holds
(`chunk_memory`, `tile_memory`); by default the budget follows the size of the hidden states passed
in (`default_chunk_budget`), and `loss_memory` is the whole peak above the inputs (guard.py's
estimate uses it).
"""

from __future__ import annotations

import os

import torch

from .cross_entropy import _DTYPES, ce_rows, check_labels, options, resolve_backend

F32 = torch.float32
# The fewest rows a default chunk gets: the matmuls read the whole lm_head once per chunk, which a GPU
# amortises over a few hundred rows.
MIN_CHUNK_ROWS = {"triton": 256, "torch": 8}
# The default tile: rows x columns of logits. A CPU matmul needs a few hundred rows to reach the core's peak
# (bf16, 2 threads, AVX512-BF16, H = 1024, V = 128256, N = 512, 25% ignored, forward + backward: 128 x 512
# tiles 691 ms, 128 x 1024 622 ms, 192 x 1024 572 ms, 256 x 1024 575 ms, 192 x 2048 556 ms; the matmuls
# alone are ~520 ms at 192 rows). More rows add memory (the float32 accumulator, 4 H bytes a row).
MAX_TILE_ROWS = 192
FAST_TILE_COLS = 1024
MIN_TILE_COLS = 256
# Elements of a float32 temporary: a float32 sum of 16-bit logits, or a 16-bit product added to the float32
# accumulator, copies its 16-bit operand to float32 first, so those run in row groups of this many elements.
TEMP_ELEMENTS = 65536
# The online softmax rescales only when a block's max passes the running one by this much: exp(20)
# is far inside the float32 / bfloat16 range, and skipping the rescale saves a pass over acc. float16
# tiles must stay <= 1 (its largest number is 65504 = exp(11.1)), so they always rescale.
RESCALE_SLACK = {torch.float16: 0.0, torch.bfloat16: 20.0, torch.float32: 20.0}


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def chunk_memory(rows: int, n_cols: int, dtype: torch.dtype, *, backend: str = "triton",
                 weight_grad: bool = False, softcap: bool = False) -> int:  # fmt: skip
    """Bytes the buffers of one row chunk of `rows` logits rows hold: the logits / gradient buffer in
    `dtype`; for the torch twin, its float32 working copy (not needed in float32) and, with a softcap,
    the tanh it keeps for the gradient; the float32 copy the weight gradient's matmul takes when the
    lm_head trains in 16 bits."""
    per_elem = _size(dtype)
    if backend == "torch":
        per_elem += (4 if dtype != F32 else 0) + (4 if softcap else 0)
    if weight_grad and dtype != F32:
        per_elem += 4
    return rows * n_cols * per_elem


def chunk_rows(n_cols: int, dtype: torch.dtype, budget: int, *, backend: str = "triton",
               weight_grad: bool = False, softcap: bool = False) -> int:  # fmt: skip
    """The most rows whose chunk (`chunk_memory`, every buffer counted) fits in `budget` bytes, in
    multiples of 64 (tile-friendly matmuls) when there are 64 or more; at least 1."""
    lo, hi = 1, max(1, budget // max(1, n_cols))  # one byte per element is a bound no dtype passes
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (
            chunk_memory(mid, n_cols, dtype, backend=backend, weight_grad=weight_grad, softcap=softcap)
            <= budget
        ):
            lo = mid
        else:
            hi = mid - 1
    return lo if lo < 64 else lo // 64 * 64


def tile_memory(rows: int, cols: int, n_hidden: int, dtype: torch.dtype) -> int:
    """Bytes the buffers of the online path hold, a tile of (`rows` x `cols`) logits: per
    tile the logits in `dtype` (float16 adds their float32 exponentials: its running-max path); per
    row the float32 gradient accumulator and one H slice (at most `cols` wide) of a block's product
    with the lm_head in `dtype`; in 16 bits the float32 copy of a row group (TEMP_ELEMENTS). The
    tile's gathered hidden rows live in the rows of the gradient it will write: no buffer."""
    size = _size(dtype)
    tile = cols * (size + (4 if dtype == torch.float16 else 0))
    per_row = n_hidden * 4 + min(n_hidden, cols) * size
    wide = max(cols, n_hidden)
    temp = 0 if dtype == F32 else 4 * min(rows * wide, max(TEMP_ELEMENTS, wide))  # (`_grouped`)
    return rows * (tile + per_row) + temp


def tile_plan(n_rows: int, n_hidden: int, n_cols: int, dtype: torch.dtype, budget: int, *,
              rows: int | None = None) -> tuple[int, int]:  # fmt: skip
    """(rows, cols) of the online path's tiles for `n_rows` kept rows within `budget` bytes
    (`tile_memory`): rows first (MAX_TILE_ROWS, halved until MIN_TILE_COLS columns fit; or `rows` when
    given), the rest for columns (multiples of 64, at least MIN_TILE_COLS or V)."""
    share = max(1, budget)
    if rows is None:
        rows = min(MAX_TILE_ROWS, max(1, n_rows))
        while rows > 1 and tile_memory(rows, MIN_TILE_COLS, n_hidden, dtype) > share:
            rows //= 2
    rows = max(1, min(rows, n_rows))
    lo, hi = 0, -(-n_cols // 64)  # the most 64-column units that fit (the last may be short)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tile_memory(rows, min(n_cols, mid * 64), n_hidden, dtype) <= share:
            lo = mid
        else:
            hi = mid - 1
    cols = min(n_cols, max(lo * 64, MIN_TILE_COLS))
    return rows, cols


def default_chunk_budget(n_rows: int, n_hidden: int, n_cols: int, dtype: torch.dtype, *,
                         backend: str = "triton", online: bool = False, **kw) -> int:  # fmt: skip
    """The budget when the caller gives none, from the size of the hidden states passed in (`n_rows`
    of them, ignored ones included), as torch's `aspect_ratio` chunking does: row chunks get that size
    (the loss then holds at most its input beside that input's gradient), at least a
    `MIN_CHUNK_ROWS[backend]`-row chunk; online tiles get half of it, at least one fast tile
    (MAX_TILE_ROWS x FAST_TILE_COLS, or fewer when there are fewer rows or columns)."""
    size = n_rows * n_hidden * _size(dtype)
    if online:
        fast = tile_memory(min(MAX_TILE_ROWS, n_rows), min(n_cols, FAST_TILE_COLS), n_hidden, dtype)
        return max(size // 2, fast)
    return max(size, chunk_memory(MIN_CHUNK_ROWS[backend], n_cols, dtype, backend=backend, **kw))


def loss_memory(n_rows: int, n_hidden: int, n_cols: int, dtype: torch.dtype, *, backend: str = "triton",
                weight_grad: bool = False, softcap: bool = False) -> int:  # fmt: skip
    """Bytes the loss holds above its inputs at its peak with the default budget: the chunk's or the
    tiles' buffers, the hidden-state gradient and, when the lm_head trains, its float32 gradient. This
    is the figure guard.py's memory estimate uses."""
    grads = n_rows * n_hidden * _size(dtype) + (n_cols * n_hidden * 4 if weight_grad else 0)
    if _online(backend, weight_grad, False, softcap):
        budget = default_chunk_budget(n_rows, n_hidden, n_cols, dtype, online=True)
        rows, cols = tile_plan(n_rows, n_hidden, n_cols, dtype, budget)
        return tile_memory(rows, cols, n_hidden, dtype) + grads
    kw = dict(backend=backend, weight_grad=weight_grad, softcap=softcap)
    rows = min(
        n_rows, chunk_rows(n_cols, dtype, default_chunk_budget(n_rows, n_hidden, n_cols, dtype, **kw), **kw)
    )
    return chunk_memory(rows, n_cols, dtype, **kw) + grads


def _online(backend: str, need_w: bool, need_b: bool, softcap) -> bool:
    """The online path serves the torch twin when only the hidden states need a gradient (a trained
    lm_head or bias needs the final softmax per logit, a softcap a per-logit factor: row chunks)."""
    return backend == "torch" and not need_w and not need_b and not softcap


def _ce_rows_inplace(z, y, scale, opts, scratch, compute_grad):
    """The torch twin on a chunk of kept rows (every label valid): per-row losses; with `compute_grad`,
    the gradient times `scale` (0-d or per-row) written over `z`. The float32 work happens in
    `scratch` (z itself when it is float32) in a few whole-chunk operations: on a busy CPU every
    parallel operation costs a scheduling round, so fewer and larger ones are faster."""
    n_rows, n_cols = z.shape
    eps, zl, cap = opts["label_smoothing"], opts["lse_square_scale"], opts["softcap"]
    x = scratch[0][:n_rows] if scratch else z
    y = y[:, None]
    t = None
    if cap:
        t = scratch[1][:n_rows]
        if x is not z:
            x.copy_(z)
        torch.tanh(x.div_(cap), out=t)
        torch.mul(t, cap, out=x)
        m = x.amax(dim=1, keepdim=True)
        x_t = x.gather(1, y)
        row_sum = x.sum(dim=1, keepdim=True) if eps else None
        x.sub_(m)
    else:  # max and gather are exact in the logits' own dtype; the rest in float32
        m = z.amax(dim=1, keepdim=True).float()
        x_t = z.gather(1, y).float()
        row_sum = z.sum(dim=1, keepdim=True, dtype=torch.float32) if eps else None
        if x is not z:
            x.copy_(z)  # (a mixed-dtype `sub` would make a float32 temporary of its own)
        x.sub_(m)
    x.exp_()
    s = x.sum(dim=1, keepdim=True)
    log_s = s.log()
    loss = (m - x_t) + log_s
    if eps:
        loss = (1 - eps) * loss + eps * ((m - row_sum / n_cols) + log_s)
    lse = m + log_s
    if zl:
        loss = loss + zl * lse * lse
    if not compute_grad:
        return loss[:, 0]
    # d loss / d x = (coef e - eps s / V - (1 - eps) s [j == y]) * scale / s, with e = exp(x - m)
    if zl:
        x.mul_(1 + 2 * zl * lse)
    if eps:
        x.sub_(s * (eps / n_cols))
    x.scatter_add_(1, y, -(1 - eps) * s)
    factor = (scale[:, None] if scale.dim() else scale) / s
    x.mul_(factor)
    if cap:
        x.mul_(t.mul_(t).neg_().add_(1))  # d softcap / dx = 1 - t^2
    if x is not z:
        z.copy_(x)  # the one rounding to the logits' dtype
    return loss[:, 0]


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


def _online_chunks(hidden, keep, w, b, y, scale, opts, *, compute_grad, plan):
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
    threads (an instant, cheap count); elsewhere the 1-minute load average stands in for it."""
    if threads <= 1:
        return 1
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


def _chunks(hidden, keep, w, b, y, scale, opts, backend, *, need_h, need_w, need_b, compute_grad, chunk):
    """Per-row losses of the kept rows and, with `compute_grad`, the gradients (grad_h full-size, zero
    on the ignored rows). One logits buffer (and the torch twin's scratch) is reused by every chunk."""
    n = keep.numel()
    all_kept = n == hidden.shape[0]
    per_row = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = None
    if need_h and compute_grad:
        # in the compute dtype (out= below); backward returns it in the hidden states' dtype
        alloc = torch.empty if all_kept else torch.zeros
        grad_h = alloc(hidden.shape, dtype=w.dtype, device=hidden.device)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w and compute_grad else None
    grad_b = (
        torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b and compute_grad else None
    )
    if n == 0:
        return per_row, grad_h, grad_w, grad_b
    rows = min(chunk, n)
    buf = torch.empty((rows, w.shape[0]), dtype=w.dtype, device=w.device)
    scratch = None
    if backend == "torch" and (w.dtype != torch.float32 or opts["softcap"]):
        f32 = lambda: torch.empty((rows, w.shape[0]), dtype=torch.float32, device=w.device)  # noqa: E731
        scratch = [f32() if w.dtype != torch.float32 else buf]
        if opts["softcap"]:
            scratch.append(f32())
    for i in range(0, n, chunk):
        idx = keep[i : i + chunk]
        h_c = hidden[i : i + chunk] if all_kept else hidden.index_select(0, idx)
        h_c = h_c.to(w.dtype)  # the compute dtype (autocast's under mixed precision); a chunk's copy at most
        z = buf[: h_c.shape[0]]
        if b is not None:
            torch.addmm(b, h_c, w.T, out=z)
        else:
            torch.mm(h_c, w.T, out=z)
        row_scale = scale[i : i + chunk] if scale.dim() else scale
        y_c = y[i : i + chunk]
        if backend == "torch":
            per_row[i : i + chunk] = _ce_rows_inplace(z, y_c, row_scale, opts, scratch, compute_grad)
        else:
            per_row[i : i + chunk] = ce_rows(z, y_c, z if compute_grad else None, row_scale, opts, backend)
        if not compute_grad:
            continue
        if grad_h is not None:
            if all_kept:
                torch.mm(z, w, out=grad_h[i : i + chunk])
            else:
                grad_h.index_copy_(0, idx, z @ w)
        if need_w:
            grad_w.addmm_(z.T.to(torch.float32) if z.dtype != torch.float32 else z.T, h_c.float())
        if need_b:
            grad_b += z.sum(0, dtype=torch.float32)
    return per_row, grad_h, grad_w, grad_b


def _plan(hidden, w, keep, opts, backend, need_w, need_b, chunk, budget) -> tuple:
    """("online", rows, cols) or ("rows", chunk rows), from `chunk` (rows) or `budget` (bytes)
    or, when neither is given, the default budget."""
    n_rows, n_hidden, n_cols = hidden.shape[0], hidden.shape[1], w.shape[0]
    if _online(backend, need_w, need_b, opts["softcap"]):
        if budget is None:
            budget = default_chunk_budget(n_rows, n_hidden, n_cols, w.dtype, online=True)
        return ("online", *tile_plan(max(1, keep.numel()), n_hidden, n_cols, w.dtype, budget, rows=chunk))
    if not chunk:
        kw = dict(backend=backend, weight_grad=need_w, softcap=bool(opts["softcap"]))
        if budget is None:
            budget = default_chunk_budget(n_rows, n_hidden, n_cols, w.dtype, **kw)
        chunk = chunk_rows(n_cols, w.dtype, budget, **kw)
    return ("rows", chunk)


def _run(hidden, keep, w, b, y, scale, opts, backend, *, need_h, need_w, need_b, compute_grad, plan):
    if plan[0] == "online":
        per_row, grad_h = _online_chunks(
            hidden, keep, w, b, y, scale, opts, compute_grad=compute_grad and need_h, plan=plan[1:]
        )
        return per_row, grad_h, None, None
    return _chunks(hidden, keep, w, b, y, scale, opts, backend, need_h=need_h, need_w=need_w, need_b=need_b,
                   compute_grad=compute_grad, chunk=plan[1])  # fmt: skip


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, num_items, opts, reduction, backend, chunk, budget):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows = hidden.shape[0]
        keep = (labels != opts["ignore_index"]).nonzero().squeeze(1)  # the one host sync
        compute = _compute_dtype(hidden)
        y = labels.index_select(0, keep)
        w = weight if weight.dtype == compute else weight.to(compute)
        b = None if bias is None else bias.to(compute)
        if num_items is not None:
            denom = torch.as_tensor(num_items, device=hidden.device).to(torch.float32).clamp(min=1.0)
            scale = 1.0 / denom
        elif reduction == "mean":
            scale = torch.tensor(1.0 / max(keep.numel(), 1), dtype=torch.float32, device=hidden.device)
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        plan = _plan(hidden, w, keep, opts, backend, need_w, need_b, chunk, budget)
        # reduction="none" needs the per-row incoming gradient: its gradients are made in backward
        compute_grad = (need_h or need_w or need_b) and reduction != "none"
        with _no_autocast(hidden.device):  # the dtypes are chosen above; out= needs them kept
            per_row, grad_h, grad_w, grad_b = _run(
                hidden, keep, w, b, y, scale, opts, backend,
                need_h=need_h, need_w=need_w, need_b=need_b, compute_grad=compute_grad, plan=plan,
            )  # fmt: skip
        ctx.reduction, ctx.opts, ctx.backend, ctx.plan = reduction, opts, backend, plan
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            ctx.save_for_backward(hidden, w, b, y, keep)
            return torch.zeros(n_rows, dtype=torch.float32, device=hidden.device).index_copy_(
                0, keep, per_row
            )
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return (per_row.sum() * scale).reshape(())

    @staticmethod
    def backward(ctx, grad_output):
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        if ctx.reduction == "none":
            hidden, w, b, y, keep = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            row_scale = grad_output.index_select(0, keep).to(torch.float32).contiguous()
            with _no_autocast(hidden.device):
                _, grad_h, grad_w, grad_b = _run(
                    hidden, keep, w, b, y, row_scale, ctx.opts, ctx.backend,
                    need_h=need_h, need_w=need_w, need_b=need_b, compute_grad=True, plan=ctx.plan,
                )  # fmt: skip
        else:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            g = grad_output.to(torch.float32)
            grad_h = grad_h.mul_(g.to(grad_h.dtype)) if grad_h is not None else None
            grad_w = grad_w.mul_(g) if grad_w is not None else None
            grad_b = grad_b.mul_(g) if grad_b is not None else None
        return (
            None if grad_h is None else grad_h.to(h_dtype),
            None if grad_w is None else grad_w.to(w_dtype),
            None if grad_b is None else grad_b.to(b_dtype),
            None, None, None, None, None, None, None,
        )  # fmt: skip


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: the hidden states', or under autocast (the Trainer's bf16 / fp16 mixed
    precision) the autocast dtype, as `lm_head` itself would compute there. With QLoRA the hidden
    states and lm_head are float32 (prepare_model_for_kbit_training) while autocast asks for 16 bits.
    The kernel's own arithmetic stays float32 either way; the gradients return in the inputs' dtypes."""
    kind = hidden.device.type
    # a torch function mode that emulates autocast where there is none (fastsft plan's, on meta tensors)
    for mode in torch.overrides._get_current_function_mode_stack():
        if getattr(mode, "autocast_dtype", None) is not None:
            return mode.autocast_dtype
    if kind == "meta":
        return hidden.dtype
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    backend: str = "auto",
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """`fused_cross_entropy(softcap(hidden @ weight.T + bias), labels, ...)` without the full logits.

    `hidden` (N, H), `weight` (V, H) (the lm_head), `bias` (V,) or None, `labels` (N,) already
    shifted. Gradients flow to whichever of hidden / weight / bias require grad (none is computed for
    a frozen lm_head). The memory lever: `chunk_size` (rows of logits alive at once: a chunk's, or an
    online tile's) or `chunk_bytes` (a budget every buffer counts against, see `chunk_memory()` and
    `tile_memory()`); by default `default_chunk_budget()`: the size of `hidden` for row chunks (at
    least 256 rows on the Triton path, 8 on the torch twin), half of it for the online tiles.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected labels ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"expected bias ({weight.shape[0]},), got {tuple(bias.shape)}")
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, not {hidden.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, not {chunk_bytes}")
    if chunk_size is not None and chunk_bytes is not None:
        raise ValueError("give chunk_size (rows) or chunk_bytes (a budget), not both")
    opts = options(label_smoothing, ignore_index, lse_square_scale, softcap, reduction, num_items_in_batch)
    backend = resolve_backend(backend, hidden.device)
    labels = labels.to(device=hidden.device, dtype=torch.int64).contiguous()
    check_labels(labels, weight.shape[0], ignore_index)
    if reduction != "none" and (hidden.device.type == "meta" or torch.compiler.is_compiling()):
        # the custom op (kernels/ops.py), the same computation: torch.compile traces it without a graph
        # break, and on meta tensors (fastsft plan) its fake implementation gives the outputs' shapes
        from .ops import linear_cross_entropy

        grad = torch.is_grad_enabled()
        num_items = None if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss, *_ = linear_cross_entropy(
            hidden, weight, bias, labels, num_items, opts["label_smoothing"], opts["ignore_index"],
            opts["lse_square_scale"], opts["softcap"], reduction == "mean", backend, _compute_dtype(hidden),
            grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad, chunk_size, chunk_bytes,
        )  # fmt: skip
        return loss
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, num_items_in_batch, opts, reduction, backend, chunk_size, chunk_bytes
    )


__all__ = [
    "fused_linear_cross_entropy",
    "chunk_rows",
    "chunk_memory",
    "tile_memory",
    "tile_plan",
    "default_chunk_budget",
    "loss_memory",
]
