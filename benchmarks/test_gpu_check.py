"""benchmarks/gpu_check.sh cannot rot: its dry run prints the commands a GPU session would run, and
each is checked here on the CPU: the files and folders it names exist, every pytest command selects
tests (collected, not run: its markers and paths are valid), each stays under its time limit."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def dry_run(*steps):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *steps], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t", 1) for line in proc.stdout.splitlines() if line.strip()]
    return [(step, shlex.split(cmd)) for step, cmd in rows]


@pytest.fixture(scope="module")
def commands():
    return dry_run()


def split_env(argv):
    """`env A=1 B=2 cmd ...` -> ({A: 1, B: 2}, [cmd, ...])"""
    env = {}
    if argv[0] == "env":
        argv = argv[1:]
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
            k, v = argv[0].split("=", 1)
            env[k] = v
            argv = argv[1:]
    return env, argv


def pytest_commands(commands):
    out = []
    for step, argv in commands:
        env, cmd = split_env(argv)
        if cmd[0] == "timeout":
            limit, cmd = int(cmd[1]), cmd[2:]
        else:
            limit = None
        if cmd[1:3] == ["-m", "pytest"]:
            out.append((step, env, limit, cmd[3:]))
    return out


def test_three_gpu_commands_each_under_nine_minutes(commands):
    steps = [s for s, _ in commands if s != "setup"]
    assert steps == ["tests", "loss", "e2e"]
    runs = pytest_commands(commands)
    assert [s for s, *_ in runs] == steps
    for step, _env, limit, _args in runs:
        assert limit is not None and limit <= 540, (step, limit)


def test_one_step_at_a_time_and_bad_steps_refused():
    assert [s for s, _ in dry_run("loss")] == ["loss"]
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "nope"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown step" in proc.stderr


def test_the_setup_unpacks_the_archive_build_site_makes(commands):
    setup = [argv for step, argv in commands if step == "setup"]
    assert any(a[0] == "tar" and a[-1] == ".gpu-site.tar.gz" for a in setup), setup
    assert any("pip" in a and "-e" in a for a in setup), setup
    build_site = REPO.parent / "shared" / "gpu" / "build-site.sh"
    if build_site.exists():  # CI clones with shared/ beside the repository
        text = build_site.read_text()
        assert "unsloth==" in text and "trl==1.15" in text


# One child collects every step's command in turn (pytest.main per step, its FASTSFT_BENCH_* variables set
# first): one start of torch and transformers instead of three (~60 s each on a busy 2-core machine).
COLLECT = """
import json, os, sys
import pytest
bench = None
for step, env, args in json.loads(sys.argv[1]):
    os.environ.update(env)
    mine = {k: v for k, v in os.environ.items() if k.startswith("FASTSFT_BENCH")}
    if "_bench" in sys.modules and bench is not None and mine != bench:  # read at import: would be stale
        raise SystemExit(f"{step}: FASTSFT_BENCH_* changed after _bench was imported")
    print(f"=== fastsft step {step}", flush=True)
    rc = pytest.main([*args, "--collect-only"])
    if "_bench" in sys.modules and bench is None:
        bench = mine
    print(f"=== fastsft step {step} exit {int(rc)}", flush=True)
    for k in env:
        os.environ.pop(k)
"""


@pytest.fixture(scope="module")
def collected(commands):
    """step -> (exit status, the output of `pytest <its args> --collect-only`), from one child."""
    runs = pytest_commands(commands)
    child = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("FASTSFT_BENCH")}
    steps = [
        (step, {k: v for k, v in env.items() if k.startswith("FASTSFT_BENCH")}, args)
        for step, env, _, args in runs
    ]
    proc = subprocess.run(
        [sys.executable, "-c", COLLECT, json.dumps(steps)],
        cwd=REPO, env=child, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = {}
    for step, _, _ in steps:
        m = re.search(rf"=== fastsft step {step}\n(.*?)=== fastsft step {step} exit (\d+)", proc.stdout, re.S)
        assert m, proc.stdout[-2000:]
        out[step] = (int(m.group(2)), m.group(1))
    return out


@pytest.mark.parametrize("step", ["tests", "loss", "e2e"])
def test_each_pytest_command_names_real_paths_and_selects_tests(commands, collected, step):
    (_, _, _, args), *_ = [r for r in pytest_commands(commands) if r[0] == step]
    paths = [a for a in args if not a.startswith("-") and "/" in a or a in ("tests", "benchmarks")]
    assert paths, args
    for a in paths:
        assert (REPO / a).exists(), a
    rc, output = collected[step]
    assert rc == 0, output[-2000:]
    m = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", output)
    assert m and int(m.group(1)) > 0, output[-2000:]
