"""Loss measurements on the CPU, in a child process (run by test_loss_bench.py's CPU benchmark).

    python benchmarks/_loss_worker.py time N V H IMPLS EPS REPS OUT_JSON
    python benchmarks/_loss_worker.py mem  N V H IMPLS EPS      OUT_JSON

`time`: builds every implementation in IMPLS (comma-separated) on the same inputs, runs each once
(warm-up, its loss recorded), then REPS rounds of one forward + backward each, interleaved
(A B C, B C A, C A B, ...: a load change on the shared machine hits every row alike); the medians
are compared as ratios in the parent. `mem`: per implementation in IMPLS (one per child for the committed
grid, all of a smoothing in one child in CI), one warm-up run, then the peak resident set of one more
run above the resident set before it (the inputs, and for logits-in rows
the logits): /proc/self/clear_refs resets the peak, and MALLOC_MMAP_THRESHOLD_ (set by the parent)
makes every large buffer a mapping of its own, returned to the system when freed, so the resident
set follows the live tensors. The child is started without TRITON_INTERPRET, so fastsft takes its
CPU path (the PyTorch twin), as a CPU user's run does.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_above(fn) -> float:
    """MiB: the peak resident set during `fn()` minus the resident set just before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def main(argv: list[str]) -> None:
    mode, n, v, h = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    import _loss_impls as B
    import torch

    torch.manual_seed(0)
    hid, w, y = B.make_inputs(n, v, h=h, dtype=torch.bfloat16, device="cpu")
    if mode == "time":
        impls, eps, reps, out = argv[4].split(","), float(argv[5]), int(argv[6]), Path(argv[7])
        runs, rows = {}, {}
        for impl in impls:
            kind, build, _ = B.IMPLS[impl]
            try:
                run = build(hid, w, y, eps)
                t0 = time.perf_counter()
                loss = float(run())
                rows[impl] = {"loss": loss, "warmup_s": time.perf_counter() - t0, "samples_ms": []}
                runs[impl] = run
            except (NotImplementedError, ImportError) as e:
                rows[impl] = {"skipped": f"{type(e).__name__}: {e}"}
            except Exception as e:  # a row that breaks is reported, the others still run
                rows[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        order = list(runs)
        for r in range(reps):
            k = r % max(1, len(order))
            for impl in order[k:] + order[:k]:
                t0 = time.perf_counter()
                runs[impl]()
                rows[impl]["samples_ms"].append((time.perf_counter() - t0) * 1e3)
        for impl in runs:
            rows[impl]["ms"] = statistics.median(rows[impl]["samples_ms"])
        out.write_text(json.dumps(rows))
    elif mode == "mem":
        impls, eps, out = argv[4].split(","), float(argv[5]), Path(argv[6])
        recs = {}
        for impl in impls:  # one after another, each after its own warm-up run
            kind, build, _ = B.IMPLS[impl]
            try:
                run = build(hid, w, y, eps)
                run()
                recs[impl] = {"peak_mib": peak_rss_above(run)}
            except (NotImplementedError, ImportError) as e:
                recs[impl] = {"skipped": f"{type(e).__name__}: {e}"}
            except Exception as e:
                recs[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            run = None
        out.write_text(json.dumps(recs))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
