"""A pytest plugin for benchmarks/gpu_check.sh (`-p _gpu_report`): one JSON line per test outcome,
appended to $FASTSFT_GPU_REPORT as each test finishes, so a part stopped by its timeout still says
which tests passed, failed (first line of the error) or were skipped (the reason)."""

import json
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTSFT_GPU_REPORT")
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    rec = {"test": report.nodeid, "when": report.when, "outcome": report.outcome}
    if report.skipped and isinstance(report.longrepr, tuple):
        rec["message"] = str(report.longrepr[2])
    elif report.failed:
        lines = [x for x in str(report.longreprtext).splitlines() if x.startswith("E ")]
        rec["message"] = (lines[0] if lines else str(report.longreprtext).splitlines()[-1:] or [""])[0][:300]
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
