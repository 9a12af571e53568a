"""kernels/ sits at the top of the repository and installs as fastsft.kernels, without ever being a
regular top-level package `kernels` (which shadowed Hugging Face's `kernels` that transformers and
bitsandbytes import: "cannot import name 'get_kernel' from 'kernels'")."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.util, json
import kernels
from transformers.utils import import_utils
import fastsft.kernels as fk
print(json.dumps({
    "kernels_file": getattr(kernels, "__file__", None),
    "kernels_path": [str(p) for p in getattr(kernels, "__path__", [])],
    "available": import_utils.is_kernels_available(),
    "fk_path": list(fk.__path__),
    "fk_loss": fk.fused_linear_cross_entropy.__module__,
}))
"""


def test_the_repository_root_on_sys_path_does_not_shadow_kernels():
    """Run from the repository root (`python -c` puts it first on sys.path, as `python -m pytest`
    does): `import kernels` is at most a namespace package (no __file__) and transformers reports the
    kernels hub as absent; fastsft.kernels still loads from the folder. With a kernels/__init__.py
    the first assertion fails."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if got["kernels_file"] is not None:  # a regular package or module named kernels
        assert not str(got["kernels_file"]).startswith(str(ROOT)), got
    assert got["available"] is False or not any(p.startswith(str(ROOT)) for p in got["kernels_path"]), got
    assert got["fk_path"] == [str(ROOT / "kernels")], got
    assert got["fk_loss"] == "fastsft.kernels.linear_cross_entropy"


@pytest.mark.slow  # builds a wheel
def test_a_built_wheel_installs_the_folder_as_fastsft_kernels(tmp_path):
    """`pip wheel .`: the kernels land in fastsft/kernels/ beside fastsft/kernels.py (their __init__),
    nothing at the top level; installed into a folder, fastsft.kernels imports from there."""
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("fastsft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastsft/kernels.py" in names
    for mod in ("cross_entropy", "linear_cross_entropy", "reference", "_triton"):
        assert f"fastsft/kernels/{mod}.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    assert "fastsft/kernels/__init__.py" not in names
    site = tmp_path / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    probe = (
        "import fastsft.kernels as k; print(k.__path__[0]); print(k.fused_cross_entropy.__code__.co_filename)"
    )
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    path, code = out.stdout.split()[-2:]
    assert Path(path) == site / "fastsft" / "kernels" and Path(code).parent == site / "fastsft" / "kernels"
