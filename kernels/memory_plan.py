"""The memory plan of the fused linear cross-entropy: how many rows of logits a chunk or an online tile
holds, from a budget that counts every buffer it holds (`chunk_memory`, `tile_memory`); by default the
budget follows the size of the hidden states passed in (`default_chunk_budget`), and `loss_memory` is
the whole peak above the inputs (guard.py's estimate and the custom op's workspace use it). `plan`
picks the path (row chunks or online tiles) and its size for one call.
"""

from __future__ import annotations

import torch

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


def _size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def chunk_memory(
    rows: int,
    n_cols: int,
    dtype: torch.dtype,
    *,
    backend: str = "triton",
    weight_grad: bool = False,
    softcap: bool = False,
) -> int:
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


def chunk_rows(
    n_cols: int,
    dtype: torch.dtype,
    budget: int,
    *,
    backend: str = "triton",
    weight_grad: bool = False,
    softcap: bool = False,
) -> int:
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


def tile_plan(
    n_rows: int, n_hidden: int, n_cols: int, dtype: torch.dtype, budget: int, *, rows: int | None = None
) -> tuple[int, int]:
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


def default_chunk_budget(
    n_rows: int,
    n_hidden: int,
    n_cols: int,
    dtype: torch.dtype,
    *,
    backend: str = "triton",
    online: bool = False,
    **kw,
) -> int:
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


def loss_memory(
    n_rows: int,
    n_hidden: int,
    n_cols: int,
    dtype: torch.dtype,
    *,
    backend: str = "triton",
    weight_grad: bool = False,
    softcap: bool = False,
) -> int:
    """Bytes the loss holds above its inputs at its peak with the default budget: the chunk's or the
    tiles' buffers, the hidden-state gradient and, when the lm_head trains, its float32 gradient. This
    is the figure guard.py's memory estimate uses."""
    grads = n_rows * n_hidden * _size(dtype) + (n_cols * n_hidden * 4 if weight_grad else 0)
    if online(backend, weight_grad, False, softcap):
        budget = default_chunk_budget(n_rows, n_hidden, n_cols, dtype, online=True)
        rows, cols = tile_plan(n_rows, n_hidden, n_cols, dtype, budget)
        return tile_memory(rows, cols, n_hidden, dtype) + grads
    kw = dict(backend=backend, weight_grad=weight_grad, softcap=softcap)
    rows = min(
        n_rows, chunk_rows(n_cols, dtype, default_chunk_budget(n_rows, n_hidden, n_cols, dtype, **kw), **kw)
    )
    return chunk_memory(rows, n_cols, dtype, **kw) + grads


def online(backend: str, need_w: bool, need_b: bool, softcap) -> bool:
    """The online path serves the torch twin when only the hidden states need a gradient (a trained
    lm_head or bias needs the final softmax per logit, a softcap a per-logit factor: row chunks)."""
    return backend == "torch" and not need_w and not need_b and not softcap


def plan(hidden, w, keep, opts, backend, need_w, need_b, chunk, budget) -> tuple:
    """("online", rows, cols) or ("rows", chunk rows), from `chunk` (rows) or `budget` (bytes)
    or, when neither is given, the default budget."""
    n_rows, n_hidden, n_cols = hidden.shape[0], hidden.shape[1], w.shape[0]
    if online(backend, need_w, need_b, opts["softcap"]):
        if budget is None:
            budget = default_chunk_budget(n_rows, n_hidden, n_cols, w.dtype, online=True)
        return ("online", *tile_plan(max(1, keep.numel()), n_hidden, n_cols, w.dtype, budget, rows=chunk))
    if not chunk:
        kw = dict(backend=backend, weight_grad=need_w, softcap=bool(opts["softcap"]))
        if budget is None:
            budget = default_chunk_budget(n_rows, n_hidden, n_cols, w.dtype, **kw)
        chunk = chunk_rows(n_cols, w.dtype, budget, **kw)
    return ("rows", chunk)
