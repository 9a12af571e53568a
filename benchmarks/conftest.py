"""`pytest benchmarks/`: measurements on a GPU, a smoke pass of the same code on the CPU.

Each benchmark appends rows to the session's `Results`; at the end the terminal shows the tables and,
when at least one GPU measurement was taken, `benchmarks/results/<date>-<device>/` receives
summary.json, summary.md and the plots. CPU smoke runs write to a temporary folder (or to
FASTSFT_BENCH_OUT) so that CI never touches the committed figures.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from _bench import Results, loadavg  # noqa: E402

_RESULTS = Results()


def pytest_configure(config):
    for name, doc in (
        ("loss", "loss benchmark (benchmarks/test_loss_bench.py)"),
        ("logits_in", "loss implementations that take the logits"),
        ("hidden_in", "loss implementations that take the hidden states and the lm_head"),
        ("e2e", "end-to-end QLoRA training benchmark (benchmarks/test_training_bench.py)"),
        ("gpu", "needs a CUDA GPU (skipped without one)"),
        ("slow", "a long benchmark, not part of the quick run"),
        ("context", "longest sequence per GPU size, simulated by fastsft plan (benchmarks/test_context.py)"),
        ("fit", "fastsft plan with fit = auto on the shipped 8B recipe (benchmarks/test_fit_plan.py)"),
        ("cpu", "measures on the CPU (FASTSFT_BENCH_CPU=full: the committed grid)"),
    ):
        config.addinivalue_line("markers", f"{name}: {doc}")
    _RESULTS.extra["loadavg_start"] = loadavg()  # the machine may be shared: say how busy it was


@pytest.fixture(scope="session")
def results():
    return _RESULTS


def pytest_runtest_logfinish(nodeid, location):
    """With FASTSFT_BENCH_OUT (benchmarks/gpu_check.sh), the figures so far are written after every test:
    a run stopped by its timeout (SIGTERM skips the terminal summary) keeps what it measured."""
    if os.environ.get("FASTSFT_BENCH_OUT") and (_RESULTS.loss or _RESULTS.e2e or _RESULTS.notes):
        _RESULTS.write()


def pytest_terminal_summary(terminalreporter):
    if not (_RESULTS.loss or _RESULTS.e2e or _RESULTS.notes):
        return
    _RESULTS.extra["loadavg_end"] = loadavg()
    terminalreporter.write_sep("=", "fastsft benchmarks")
    terminalreporter.write_line(_RESULTS.markdown())
    folder = _RESULTS.write()
    if folder is not None:
        terminalreporter.write_line(f"results written to {folder}")
