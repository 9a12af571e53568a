"""`pytest benchmarks` leaves the checkout as it found it (issue 38): figures go to the git-ignored
benchmarks/results/scratch/ unless asked to update the committed ones (`_bench.results_folder`)."""

import os
import subprocess
import sys
from pathlib import Path

from _bench import RESULTS_ROOT, SCRATCH, results_folder

REPO = Path(__file__).resolve().parents[1]


def _porcelain() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_the_results_folder_is_scratch_unless_asked(monkeypatch, tmp_path):
    for var in ("FASTSFT_BENCH_OUT", "FASTSFT_BENCH_RESULTS", "FASTSFT_BENCH_UPDATE"):
        monkeypatch.delenv(var, raising=False)
    assert results_folder("context") == SCRATCH / "context"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(SCRATCH / "context" / "context.json")], cwd=REPO
    )
    assert ignored.returncode == 0, "benchmarks/results/scratch/ is not git-ignored"
    monkeypatch.setenv("FASTSFT_BENCH_RESULTS", str(tmp_path))
    assert results_folder("context") == tmp_path / "context"
    monkeypatch.delenv("FASTSFT_BENCH_RESULTS")
    monkeypatch.setenv("FASTSFT_BENCH_UPDATE", "1")
    new = results_folder("context")
    assert new.parent == RESULTS_ROOT and new.name.endswith("-context") and new.name[:4].isdigit()
    monkeypatch.setenv("FASTSFT_BENCH_OUT", str(tmp_path / "out"))
    assert results_folder("context") == tmp_path / "out"


CHILD = """
from _bench import Results
import test_context
rows = [{"gpu_gib": gb, "hf_simulated": 1000, "fastsft_2026_12_06": 90000, "fastsft_tiled_layer": 120000,
         "unsloth_published": 89000, "hf_published": 900 if gb < 80 else None} for gb in test_context.SIZES]
print(test_context.write_outputs(rows, 1.0))
results = Results()
results.loss.append({"impl": "fastsft-linear", "input": "hidden", "vocab": 32768, "tokens": 512,
                     "label_smoothing": 0.0, "ms": 1.0, "peak_mem_gib": 0.1, "loss": 10.4})
print(results.write())
"""


def test_the_benchmarks_leave_git_status_clean():
    """The context benchmark rewrote benchmarks/results/2026-12-06-context/ (its time and load lines) on
    every `pytest benchmarks`. Its writer and the session's summary writer run here as `pytest benchmarks`
    runs them (no FASTSFT_BENCH_* variable; the full context table takes ~15 minutes, so its rows are
    given), and `git status` is compared before and after."""
    before = _porcelain()
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("FASTSFT_BENCH_OUT", "FASTSFT_BENCH_RESULTS", "FASTSFT_BENCH_UPDATE", "FASTSFT_BENCH_CPU")
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "benchmarks"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [Path(line) for line in proc.stdout.split()[-2:]]
    assert all(folder.is_relative_to(SCRATCH) for folder in written), written
    assert (written[0] / "context.json").exists() and (written[1] / "summary.json").exists()
    assert _porcelain() == before
