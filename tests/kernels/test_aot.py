"""Every launch of the Triton kernel, compiled for sm_80, sm_86, sm_89, sm_90a and sm_120a without a GPU
(`_aot.py`: the host code's real launch arguments, Triton's own compiler and bundled ptxas under a
stand-in driver), with 0 spilled bytes, registers x threads within the register file and shared memory
within each architecture's limit. By default a subset (bf16 and float32, V = 32001 and 128256, the
plain and the all-options kernels, sm_90a and sm_120a: ~15-60 s); FASTSFT_AOT_FULL=1 runs the whole
matrix (3 dtypes x 8 option sets x reductions x gradients x 5 vocabularies x 5 architectures, ~10-30
minutes; its table is committed under benchmarks/results/2026-12-06-aot/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles every kernel ahead of time for five GPUs
pytest.importorskip("triton")
from fastsft.kernels import cross_entropy as _ce  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FULL = os.environ.get("FASTSFT_AOT_FULL") == "1"
# Also compiled with the triton of .cache/triton-3.6 (tests/install-test-extras.sh: the GPU image's 3.6,
# whose ptxas 12.8 spilled where the venv's newer one did not), or of FASTSFT_AOT_TRITON_SITE=DIR
# (`pip install --target DIR triton==X`)
_SITE = os.environ.get("FASTSFT_AOT_TRITON_SITE") or str(ROOT / ".cache" / "triton-3.6")
SITES = [None] + ([_SITE] if (Path(_SITE) / "triton").is_dir() else [])


@pytest.mark.parametrize(
    "site", SITES, ids=lambda s: "venv-triton" if s is None else f"triton-{Path(s).name}"
)
def test_every_launch_compiles_for_five_gpus_without_spills(tmp_path, site):
    if getattr(_ce, "triton", None) is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [*([site] if site else []), str(ROOT), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compiled afresh: ptxas's report is read each time
    out = tmp_path / "aot.json"
    cmd = [sys.executable, str(ROOT / "tests/kernels/_aot.py"), "--json", str(out)] + (
        ["--full"] if FULL else []
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    rows = [dict(zip(got["columns"], r, strict=True)) for r in got["rows"]]
    if site:  # that triton compiled them, not the venv's
        (dist,) = Path(site).glob("triton-*.dist-info")
        assert got["meta"]["triton"] == dist.name[len("triton-") : -len(".dist-info")]
    archs = {"sm_80", "sm_86", "sm_89", "sm_90a", "sm_120a"} if FULL else {"sm_90a", "sm_120a"}
    assert {r["arch"] for r in rows} == archs
    assert {r["case"].split("-")[2] for r in rows} >= {"V32001", "V128256"}
    bad = [f"{r['case']} {r['arch']}: {r.get('problems') or r.get('error')}" for r in rows if not r["ok"]]
    assert not bad, "\n".join(bad[:20])
    assert all(r["regs"] and r["spill_stores"] == 0 == r["spill_loads"] for r in rows)
    assert proc.returncode == 0, proc.stderr[-3000:]
