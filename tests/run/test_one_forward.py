"""fastsft's training step runs the model once per micro-batch, on both TRL versions the resolver can pick
(the core's, 1.16+, and 1.15 from .cache/trl-1.15), label smoothing included.

TRL's own `compute_loss` (loss_type "nll") runs the model through its fused LM head and, with label
smoothing or a `compute_loss_func`, a second no-grad forward for its metrics; FastSFTTrainer replaces
`compute_loss`, so neither happens. A child `fastsft run` (TRL 1.15 first on its path for that case)
counts, with a global forward hook, the calls of the model's *ForCausalLM module made in training mode,
with and without grad: micro-batches = max_steps x gradient_accumulation_steps forwards with grad, none
without.
"""

import json
import os
import subprocess
import sys

import pytest
from packaging.version import Version

from _tiny import RECIPES, REPO

pytestmark = pytest.mark.slow  # whole `fastsft run` children

TRL_115 = REPO / ".cache" / "trl-1.15"
STEPS, ACCUMULATION = 3, 2

CHILD = """
import json, sys, torch
from torch.nn.modules.module import register_module_forward_hook

counts = {"grad": 0, "no_grad": 0}

def hook(module, args, output):
    name = type(module).__name__
    if name.endswith("ForCausalLM") and not name.startswith("Peft") and module.training:
        counts["grad" if torch.is_grad_enabled() else "no_grad"] += 1

register_module_forward_hook(hook)
out_file, argv = sys.argv[1], sys.argv[2:]
sys.argv = ["fastsft", *argv]
from fastsft.cli import entry
try:
    entry()
except SystemExit as e:
    counts["exit"] = e.code
import trl
counts["trl"] = trl.__version__
open(out_file, "w").write(json.dumps(counts))
"""


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("trl_version", ["core", "1.15"])
def test_one_forward_per_micro_batch(trl_version, smoothing, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU path, as a user runs it
    path = [str(REPO)]
    if trl_version == "1.15":
        if not (TRL_115 / "trl").is_dir():
            pytest.skip("TRL 1.15 not installed in .cache/trl-1.15 (see README)")
        path.insert(0, str(TRL_115))
    env["PYTHONPATH"] = os.pathsep.join(path)
    out = tmp_path / "counts.json"
    argv = [
        "run",
        str(RECIPES / "tiny.toml"),
        *("--set", f"train.max_steps={STEPS}"),
        *("--set", f"train.gradient_accumulation_steps={ACCUMULATION}"),
        *("--set", "train.eval_strategy=no", "--set", "train.save_strategy=no"),
        *("--set", f"loss.label_smoothing={smoothing}"),
        *("-o", str(tmp_path / "run")),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), proc.stderr[-3000:]
    counts = json.loads(out.read_text())
    assert counts.get("exit") in (0, None), proc.stderr[-3000:]
    if trl_version == "1.15":
        assert counts["trl"] == "1.15.0"
    else:
        assert Version(counts["trl"]) >= Version("1.16"), counts["trl"]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["loss"]["label_smoothing"] == smoothing
    assert counts["grad"] == STEPS * ACCUMULATION, counts
    assert counts["no_grad"] == 0, counts  # no metrics forward
