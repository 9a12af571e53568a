"""How the `fastsft` command shares the CPU with other work: OpenMP threads spin only briefly before they
sleep, and each training step, evaluation batch, generated token and loss tile runs on the intra-op
threads the cores other processes leave free. Decided once, in the command's entry
(`fastsft.cli.entry`), before torch is imported, because OpenMP reads its settings once, when torch's
libgomp loads.

Why: torch's CPU wheel runs its intra-op parallel regions on GNU OpenMP, whose threads spin at each
barrier for ~300,000 iterations before sleeping. Beside other processes one of them often waits for a
core another process holds, and its partners spin through their time slices meanwhile: measured on
2 cores at load 6-10, `recipes/tiny.toml` for 120 steps took 313-353 s by default, 41 s with
OMP_NUM_THREADS=1 and 36-43 s with OMP_WAIT_POLICY=PASSIVE. PASSIVE (no spin at all) was this module's
first answer, but on an idle machine each barrier then pays a sleep and a wake-up: the same 120 steps
took 6.1 s under PASSIVE against 4.2 s by default and 3.5 s with GOMP_SPINCOUNT=10000 (2026-12-07,
benchmarks/results/2026-12-07-busy-cpu-idle). So:
- GOMP_SPINCOUNT=10000 (`SPIN`): a waiting thread spins ~10,000 iterations (microseconds: enough to
  bridge the gap between two of a small model's operations), then sleeps;
- when other processes hold cores, a short spin still wastes a time slice per barrier (17 s beside two
  busy processes, against 7 s with one thread): the work that loops (`Follower`) sets torch's
  intra-op threads to the cores free at each step, from /proc's count of running threads
  (`fastsft.kernels.online_tiles.free_cpu_threads`): beside a busy process per core, one thread, which
  has no barrier to wait at; on an idle machine, all of them.

What a user set wins: any of OMP_WAIT_POLICY, GOMP_SPINCOUNT (libgomp's own spin count) or
KMP_BLOCKTIME (Intel OpenMP's, for a torch built with it) in the environment leaves the policy alone
(and nothing follows the free cores: the thread count is the user's); OMP_NUM_THREADS is never set here,
and the free cores only ever lower the count the process started with. FASTSFT_THREAD_POLICY=off turns the
policy off (OpenMP's own defaults, as before it). A Python program that imports fastsft is not touched at
all: its thread counts (`torch.set_num_threads`) and environment are its own.

The ranks of `fastsft run --launch N` run the `fastsft` command too and inherit the environment.
"""

from __future__ import annotations

import collections
import os
import sys

# Set by the user, these decide how OpenMP waits; fastsft then sets nothing.
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# FASTSFT_THREAD_POLICY=off: OpenMP's defaults (spinning waits), as fastsft ran before the policy.
SWITCH = "FASTSFT_THREAD_POLICY"
# Marks a policy fastsft set, so that a child (a rank of `run --launch`) records who chose it.
MARK = "FASTSFT_SET_THREAD_POLICY"
# libgomp's spin count fastsft sets: iterations a waiting thread spins before it sleeps (default 300,000)
SPIN = "10000"


def apply(environ=os.environ) -> str:
    """Set GOMP_SPINCOUNT=SPIN in `environ` unless the user chose how OpenMP waits (USER_KEYS) or turned
    the policy off; returns what decided (see `facts`). Call it before torch is imported: a policy set
    later is not read (OpenMP read its environment when torch loaded) and is not set."""
    if environ.get(SWITCH, "").lower() in ("off", "0", "no", "false"):
        return "off"
    if following(environ):
        return "fastsft"  # a parent fastsft (run --launch) set it
    if any(k in environ for k in USER_KEYS):
        return "user"
    if "torch" in sys.modules:
        return "too late"
    environ["GOMP_SPINCOUNT"] = SPIN
    environ[MARK] = "1"
    return "fastsft"


def following(environ=os.environ) -> bool:
    """Whether fastsft's policy is in force in this process (so its loops follow the free cores)."""
    return (
        bool(environ.get(MARK))
        and environ.get("GOMP_SPINCOUNT") == SPIN
        and "OMP_WAIT_POLICY" not in environ
        and "KMP_BLOCKTIME" not in environ
        and environ.get(SWITCH, "").lower() not in ("off", "0", "no", "false")
    )


# Free-core samples a loop keeps: it runs on fewer threads only when every one of the last WINDOW samples
# saw the cores taken. One sample is an instant: on an idle machine a passing process (a shell, a
# daemon's wake-up, this process's own thread caught running) read as "a core taken" put a step on one
# thread, and the idle round ran 1.27x the old default's time (4.6 s against 3.6 s, 2026-12-07).
WINDOW = 3


class Follower:
    """One piece of work that loops (a training run, one `generate`), following the free cores: called
    before each step, batch or token, it sets torch's intra-op threads to the most the last WINDOW
    samples found free (at most `threads`, the count the work began with), under fastsft's policy;
    nothing otherwise. torch must be loaded."""

    def __init__(self, threads: int, window: int = WINDOW):
        self.threads = threads
        self.recent: collections.deque = collections.deque(maxlen=max(1, window))

    def __call__(self) -> None:
        if not following():
            return
        import torch

        from fastsft.kernels.online_tiles import free_cpu_threads

        self.recent.append(free_cpu_threads(self.threads))
        want = max(self.recent)
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)


def facts(environ=os.environ) -> dict:
    """How this process uses the CPU, for run.json: the wait policy, who set it, OMP_NUM_THREADS, and
    torch's intra-op threads when torch is loaded."""
    if environ.get(SWITCH, "").lower() in ("off", "0", "no", "false"):
        by = "off"
    elif following(environ):
        by = "fastsft"
    elif any(k in environ for k in USER_KEYS):
        by = "user"
    else:
        by = "OpenMP default"
    out = {
        "omp_wait_policy": environ.get("OMP_WAIT_POLICY"),
        "set_by": by,
        "omp_num_threads": environ.get("OMP_NUM_THREADS"),
        "follows_free_cores": by == "fastsft",
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
