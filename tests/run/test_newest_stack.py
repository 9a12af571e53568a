"""The CPU path on the newest set the core admits (issue 38): transformers 5.25 (with the `kernels` package
it needs), datasets 5, TRL 1.16. The main suite runs on the Unsloth-bounded set the GPU image uses
(tests/constraints-unsloth.txt); tests/install-test-extras.sh installs the newest set into
.cache/newest-stack (no dependencies), and this test puts that folder first on the path of child
`fastsft run`, `eval` and `plan` processes, as test_trl_versions.py does with TRL 1.15.
"""

import json
import os
import subprocess
import sys

import pytest

from _tiny import RECIPES, REPO

NEWEST = REPO / ".cache" / "newest-stack"
WANT = {"transformers": "5.25.0", "datasets": "5.2.0", "trl": "1.16.0"}

pytestmark = [
    pytest.mark.slow,  # whole `fastsft run`, eval and plan children: 30 s
    pytest.mark.skipif(
        not (NEWEST / "transformers").is_dir(),
        reason="the newest stack is not installed in .cache/newest-stack (tests/install-test-extras.sh)",
    ),
]


def _fastsft(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(NEWEST), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "fastsft.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_run_eval_and_plan_on_the_newest_stack(tmp_path):
    out = tmp_path / "run"
    recipe = str(RECIPES / "tiny.toml")
    _fastsft(
        ["run", recipe, "--set", "train.max_steps=40", "--set", "train.logging_steps=5", "-o", str(out)],
        tmp_path,
    )
    info = json.loads((out / "run.json").read_text())
    assert {k: info["versions"][k] for k in WANT} == WANT, info["versions"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    assert train[-1] < 0.6 * train[0], train

    result = tmp_path / "eval.json"
    _fastsft(["eval", str(out), "-n", "2", "--max-new-tokens", "8", "--json-out", str(result)], tmp_path)
    scored = json.loads(result.read_text())
    assert scored["conversations"] > 0 and scored["loss"] < train[0], scored

    plan = _fastsft(["plan", recipe, "--gpu-memory", "24GiB"], tmp_path)
    assert "GiB" in plan.stdout, plan.stdout[-2000:]
