"""How the `fastsft` command shares the CPU with other work: OpenMP threads that wait for a core sleep
instead of spinning. Decided once, in the command's entry (`fastsft.cli.entry`), before torch is
imported, because OpenMP reads its settings once, when torch's libgomp loads.

Why: torch's CPU wheel runs its intra-op parallel regions (and MKL's) on GNU OpenMP, whose threads spin
at each barrier for ~300,000 iterations before sleeping. Beside other processes one of them often waits
for a core another process holds, and its partners spin through their time slices meanwhile: measured
on 2 cores at load 6-10, `recipes/tiny.toml` for 120 steps took 313-353 s by default, 41 s with
OMP_NUM_THREADS=1 and 36-43 s with OMP_WAIT_POLICY=PASSIVE (benchmarks/test_busy_cpu.py measures it
again, beside the default, quiet and busy). PASSIVE keeps every core on a quiet machine, so no thread
count is guessed here; the loss tiles choose their own from the cores free
(`fastsft.kernels.online_tiles.free_cpu_threads`).

What a user set wins: any of OMP_WAIT_POLICY, GOMP_SPINCOUNT (libgomp's own spin count) or
KMP_BLOCKTIME (Intel OpenMP's, for a torch built with it) in the environment leaves the wait policy
alone; OMP_NUM_THREADS is never set here. FASTSFT_THREAD_POLICY=off turns the policy off (OpenMP's own
defaults, as before it). A Python program that imports fastsft is not touched at all: its thread
counts (`torch.set_num_threads`) and environment are its own, and it sets OMP_WAIT_POLICY=PASSIVE itself,
before importing torch, if it wants the same.

The ranks of `fastsft run --launch N` run the `fastsft` command too and inherit the environment.
"""

from __future__ import annotations

import os
import sys

# Set by the user, these decide how OpenMP waits; fastsft then sets nothing.
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# FASTSFT_THREAD_POLICY=off: OpenMP's defaults (spinning waits), as fastsft ran before the policy.
SWITCH = "FASTSFT_THREAD_POLICY"
# Marks a wait policy fastsft set, so that a child (a rank of `run --launch`) records who chose it.
MARK = "FASTSFT_SET_OMP_WAIT_POLICY"


def apply(environ=os.environ) -> str:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` unless the user chose how OpenMP waits (USER_KEYS) or
    turned the policy off; returns what decided (see `facts`). Call it before torch is imported: a
    policy set later is not read (OpenMP read its environment when torch loaded) and is not set."""
    if environ.get(SWITCH, "").lower() in ("off", "0", "no", "false"):
        return "off"
    if environ.get(MARK) and environ.get("OMP_WAIT_POLICY") == "PASSIVE":
        return "fastsft"  # a parent fastsft (run --launch) set it
    if any(k in environ for k in USER_KEYS):
        return "user"
    if "torch" in sys.modules:
        return "too late"
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    environ[MARK] = "1"
    return "fastsft"


def facts(environ=os.environ) -> dict:
    """How this process uses the CPU, for run.json: the wait policy, who set it, OMP_NUM_THREADS, and
    torch's intra-op threads when torch is loaded."""
    if environ.get(SWITCH, "").lower() in ("off", "0", "no", "false"):
        by = "off"
    elif environ.get(MARK) and environ.get("OMP_WAIT_POLICY") == "PASSIVE":
        by = "fastsft"
    elif any(k in environ for k in USER_KEYS):
        by = "user"
    else:
        by = "OpenMP default"
    out = {
        "omp_wait_policy": environ.get("OMP_WAIT_POLICY"),
        "set_by": by,
        "omp_num_threads": environ.get("OMP_NUM_THREADS"),
    }
    for k in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        if k in environ:
            out[k.lower()] = environ[k]
    torch = sys.modules.get("torch")
    if torch is not None:
        out["intra_op_threads"] = torch.get_num_threads()
    try:
        out["cores"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        out["cores"] = os.cpu_count()
    return out
