"""fastsft as users install it: the wheel built from the files git tracks, installed without -e into a
fresh environment, used from a folder outside the checkout. (A wheel once shipped without
fastsft/data/, so every command failed on import, while every test passed on the editable install.)

The environment is a venv of the base interpreter with no site-packages of its own but the wheel: a
.pth line puts the test venv's site-packages (the dependencies, already installed) after it on the
path. A .pth *line* adds a folder without running the .pth files inside it, so the editable install's
finder (`__editable__.fastsft-*.pth`) never runs there, and `fastsft.__file__` is checked to be the
new venv's. Every list (modules, files) comes from `git ls-files` or the wheel, never written out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from _tiny import REPO

pytestmark = [
    pytest.mark.slow,  # builds the wheel, installs it into a fresh venv
    pytest.mark.skipif(
        shutil.which("git") is None or not (REPO / ".git").exists(),
        reason="needs the git checkout (the wheel is built from its tracked files)",
    ),
]


def tracked(*folders: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *folders], cwd=REPO, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p and (REPO / p).is_file()]


def in_wheel(path: str) -> str:
    """Where a tracked file lands in the wheel: kernels/ installs as fastsft/kernels/."""
    return "fastsft/" + path if path.startswith("kernels/") else path


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, env): the built wheel, and the environment of a process that runs the installed copy."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # only what git tracks: an untracked file in the checkout cannot make the test pass
    for rel in tracked():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], check=True, cwd=tmp)
    (wheel,) = dist.glob("fastsft-*.whl")

    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    # path lines: the folders join sys.path, but the .pth files inside them do not run
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (site / "deps.pth").write_text("".join(f"{d}\n" for d in deps))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    # pip of the test venv, run by the new venv's python: installs into the new venv's site-packages
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            wheel,
        ],
        check=True,
        env=env,
        cwd=tmp,
    )
    return {"wheel": wheel, "env": env, "python": python, "site": site, "tmp": tmp, "bin": venv / "bin"}


def test_every_tracked_file_of_the_package_is_in_the_wheel(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    want = [in_wheel(p) for p in tracked("fastsft", "kernels")]
    assert want and any(p.startswith("fastsft/data/") for p in want)
    missing = sorted(p for p in want if p not in names)
    assert not missing, f"tracked files the wheel lacks: {missing}"


def test_every_module_imports_from_the_installed_copy(installed):
    # every module but a __main__, which runs the command line when imported (`python -m` is its use)
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    modules = sorted(
        ".".join(
            Path(n).with_suffix("").parts[:-1]
            if n.endswith("/__init__.py")
            else Path(n).with_suffix("").parts
        )
        for n in names
        if n.startswith("fastsft/") and n.endswith(".py") and not n.endswith("/__main__.py")
    )
    assert "fastsft.data" in modules and "fastsft.kernels.cross_entropy" in modules
    code = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "print(json.dumps({m: getattr(importlib.import_module(m), '__file__', None) for m in mods}))\n"
    )
    out = subprocess.run(
        [str(installed["python"]), "-c", code],
        env=installed["env"],
        cwd=installed["tmp"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    files = json.loads(out.stdout.strip().splitlines()[-1])
    site = str(installed["site"].resolve())
    outside = {m: f for m, f in files.items() if f is None or not str(Path(f).resolve()).startswith(site)}
    assert not outside, f"modules not imported from the installed wheel ({site}): {outside}"


def test_the_installed_command_validates_and_trains_outside_the_checkout(installed):
    work = installed["tmp"] / "user"  # a user's folder with the shipped recipes copied in
    for rel in tracked("recipes"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, work / rel)
    fastsft = str(installed["bin"] / "fastsft")
    assert Path(fastsft).exists(), "the wheel's console script was not installed"
    env = {**installed["env"], "FASTSFT_CACHE": str(installed["tmp"] / "cache")}

    def cli(*args):
        return subprocess.run(
            [fastsft, *args], env=env, cwd=work, capture_output=True, text=True, timeout=600
        )

    v = cli("validate", "recipes/tiny.toml")
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-3000:]
    r = cli(
        "run",
        "recipes/tiny.toml",
        "-o",
        "runs/t",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.logging_steps=1",
        "--set",
        "train.eval_strategy=no",
        "--set",
        "train.save_strategy=no",
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "runs/t/metrics.jsonl").read_text().splitlines()]
    assert len([row for row in rows if "loss" in row]) == 3, rows
    assert (work / "runs/t/adapter").is_dir()
    assert REPO.resolve() not in {p.resolve() for p in work.parents}
