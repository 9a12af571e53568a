"""kernels/memory_plan.py: the fused linear loss's row chunks and online tiles fit the memory budget with
every buffer counted, the default budget follows the hidden states' size, and loss_memory is the estimate
guard.py takes."""

import torch

from fastsft.kernels import chunk_rows
from fastsft.kernels.memory_plan import (
    FAST_TILE_COLS,
    MAX_TILE_ROWS,
    MIN_CHUNK_ROWS,
    MIN_TILE_COLS,
    TEMP_ELEMENTS,
    chunk_memory,
    default_chunk_budget,
    loss_memory,
    tile_memory,
    tile_plan,
)

from _kernel_util import DTYPES


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
    # the default budget of row chunks: the size of the hidden states (no fixed cap), at least a floor of rows
    budget = default_chunk_budget(16384, 4096, 128256, torch.bfloat16)
    assert budget == 16384 * 4096 * 2 and chunk_rows(128256, torch.bfloat16, budget) >= 256
    assert default_chunk_budget(65536, 8192, 1000, torch.float32) == 65536 * 8192 * 4
    small = default_chunk_budget(8, 64, 1000, torch.bfloat16, backend="torch")
    assert chunk_rows(1000, torch.bfloat16, small, backend="torch") == MIN_CHUNK_ROWS["torch"]
    assert default_chunk_budget(8, 64, 1000, torch.bfloat16) == chunk_memory(256, 1000, torch.bfloat16)


def test_online_tiles_follow_the_memory_budget():
    """Online tiles: within the budget, rows before columns, and the default budget half the hidden
    states' size (torch's compact chunking picks the same) or one fast tile, whichever is more."""
    mib = 1024 * 1024
    for dtype in DTYPES:
        for budget in (mib, 2 * mib, 8 * mib, 64 * mib):
            rows, cols = tile_plan(3000, 1024, 128256, dtype, budget)
            assert tile_memory(rows, cols, 1024, dtype) <= budget
            assert (cols % 64 == 0 or cols == 128256) and cols >= MIN_TILE_COLS and rows >= 8
            assert cols == 128256 or tile_memory(rows, cols + 64, 1024, dtype) > budget  # the columns fill it
            assert rows == MAX_TILE_ROWS or tile_memory(rows * 2, MIN_TILE_COLS, 1024, dtype) > budget
    # bf16: the tile, a float32 accumulator and a bf16 H slice (<= cols wide) a row, a float32 row group
    assert tile_memory(10, 100, 64, torch.bfloat16) == 10 * (100 * 2 + 64 * 4 + 64 * 2) + 4 * 10 * 100
    assert tile_memory(10, 100, 256, torch.bfloat16) == 10 * (100 * 2 + 256 * 4 + 100 * 2) + 4 * 10 * 256
    big = tile_memory(200, 4096, 1024, torch.bfloat16)
    assert big == 200 * (4096 * 2 + 1024 * 6) + 4 * max(TEMP_ELEMENTS, 4096)  # the row group's cap
    assert tile_memory(10, 100, 64, torch.float32) == 10 * (100 * 4 + 64 * 8)  # no row group
    assert tile_memory(10, 100, 64, torch.float16) == 10 * (100 * 6 + 64 * 6) + 4 * 10 * 100  # + its f32 e
    assert tile_plan(3000, 1024, 128256, torch.bfloat16, 64 * mib, rows=7)[0] == 7
    assert tile_plan(5, 1024, 500, torch.bfloat16, 64 * mib) == (5, 500)
    assert default_chunk_budget(16384, 1024, 32768, torch.bfloat16, online=True) == 16 * mib  # half the size
    # small inputs still get a fast tile (MAX_TILE_ROWS x FAST_TILE_COLS: the matmuls need a few hundred
    # rows to run near the CPU's peak), or all their rows and columns when they have fewer
    for n, h, v in ((512, 1024, 128256), (1024, 1024, 32768), (1024, 256, 32768), (64, 24, 1000)):
        floor = default_chunk_budget(n, h, v, torch.bfloat16, online=True)
        rows, cols = tile_plan(n * 3 // 4, h, v, torch.bfloat16, floor)
        assert rows == min(MAX_TILE_ROWS, n * 3 // 4), (n, h, v, rows)
        assert cols >= min(v, FAST_TILE_COLS) - 64, (n, h, v, cols)
        assert tile_memory(rows, cols, h, torch.bfloat16) <= floor
    # the estimate guard.py takes: the tiles and the hidden-state gradient (+ a trained head's float32 one)
    frozen = loss_memory(1024, 1024, 32768, torch.bfloat16, backend="torch")
    assert 2 * mib < frozen <= 2 * mib + default_chunk_budget(1024, 1024, 32768, torch.bfloat16, online=True)
    trained = loss_memory(1024, 1024, 32768, torch.bfloat16, backend="torch", weight_grad=True)
    assert trained >= 32768 * 1024 * 4 + 2 * mib
    gpu = loss_memory(16384, 4096, 128256, torch.bfloat16)
    size = 16384 * 4096 * 2  # a chunk about the size of the hidden states, and their gradient
    assert 1.9 * size <= gpu <= 2 * size
