"""The CPU path trains with both TRL versions the resolver can pick: the newest the core admits and
1.15, the newest unsloth (the `gpu` extra) accepts, whose own fused lm-head has no CPU fallback.

The README's test command installs TRL 1.15 into .cache/trl-1.15 (no dependencies); this test puts it
first on the path of a child `fastsft run`, without TRITON_INTERPRET, as a CPU user would run it.
"""

import json
import os
import subprocess
import sys

import pytest

from _tiny import RECIPES, REPO

TRL_115 = REPO / ".cache" / "trl-1.15"


@pytest.mark.skipif(
    not (TRL_115 / "trl").is_dir(), reason="TRL 1.15 not installed in .cache/trl-1.15 (see README)"
)
@pytest.mark.slow  # a whole `fastsft run` child
def test_cpu_training_with_trl_1_15(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(TRL_115)
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastsft.cli",
            "run",
            str(RECIPES / "tiny.toml"),
            "--set",
            "train.max_steps=40",
            "--set",
            "train.logging_steps=5",
            "-o",
            str(out),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["versions"]["trl"] == "1.15.0"
    assert info["loss"]["kernel"] == "fastsft-linear"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    assert train[-1] < 0.6 * train[0], train
