"""`fastsft run --launch 2`: two CPU processes (DDP over gloo) train like one process with the same
global batch, into one run directory, and resume like a single-process run."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastsft import recipe as R
from fastsft.rundir import RunDir

from _tiny import RECIPES

SHORT = [
    "--set",
    "train.max_steps=6",
    "--set",
    "train.logging_steps=1",
    "--set",
    "train.eval_strategy=no",
    "--set",
    "train.save_steps=3",
    "--set",
    "train.save_total_limit=3",
]


def test_ranks_get_this_command_line_less_launch():
    """The ranks run the command as given, less `--launch N` / `--launch=N`, plus the rank count (for
    the recipe they record) and, for a new run without -o, the one run directory named by the launcher."""
    from fastsft.cli.main import rank_argv

    r = R.load(RECIPES / "tiny.toml")
    argv = ["run", "r.toml", "--launch", "2", "--set", "train.max_steps=6", "--launch=2", "--allow-pickle"]
    given = [
        "run",
        "r.toml",
        "--set",
        "train.max_steps=6",
        "--allow-pickle",
        "--set",
        "distributed.num_processes=2",
    ]
    new = rank_argv(argv, 2, r, None, None)
    assert new[:-2] == given and new[-2] == "-o" and new[-1].startswith("runs/tiny-")
    assert rank_argv([*argv, "-o", "out"], 2, r, "out", None) == [*given[:5], "-o", "out", *given[5:]]
    assert rank_argv(["run", "--resume", "d", "--launch", "3"], 3, r, None, "d") == [
        "run",
        "--resume",
        "d",
        "--set",
        "distributed.num_processes=3",
    ]


def fastsft(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fastsft.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def losses(run_dir):
    rows = RunDir(run_dir).read_metrics()
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice: more than one rank wrote"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    single = fastsft(
        "run",
        str(RECIPES / "tiny.toml"),
        *SHORT,
        "--set",
        "train.per_device_train_batch_size=8",
        "-o",
        str(tmp / "single"),
        cwd=tmp,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_root = tmp / "ddp"
    ddp_root.mkdir()
    ddp = fastsft(
        "run",
        str(RECIPES / "tiny.toml"),
        *SHORT,
        "--set",
        "train.per_device_train_batch_size=4",
        "--launch",
        "2",
        "-o",
        str(ddp_root / "run"),
        cwd=tmp,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return tmp / "single", ddp_root / "run", ddp


@pytest.mark.slow  # several ranks
def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    single, ddp, _ = runs
    one, two = losses(single), losses(ddp)
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2


@pytest.mark.slow  # several ranks
def test_one_run_directory_and_one_set_of_files(runs):
    _, ddp, proc = runs
    assert [p.name for p in ddp.parent.iterdir()] == ["run"]
    assert sorted(p.name for p in (ddp / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    assert (ddp / "adapter" / "adapter_model.safetensors").exists() and (ddp / "report.md").exists()
    assert proc.stdout.count("run directory:") == 1  # only rank 0 prints


@pytest.mark.slow  # several ranks
def test_a_two_process_run_resumes(runs, tmp_path):
    single, ddp, _ = runs
    copy = tmp_path / "run"
    shutil.copytree(ddp, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-6")
    # no --launch: the stored recipe says the run had 2 processes, and the resume starts 2 again
    assert R.load(copy / "recipe.toml").distributed.num_processes == 2
    resumed = fastsft("run", "--resume", str(copy), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-3" in resumed.stdout
    assert json.loads((copy / "run.json").read_text())["world_size"] == 2
    one, again = losses(single), losses(copy)
    for step in one:
        assert again[step] == pytest.approx(one[step], rel=1e-4), step


def test_unsloth_backend_is_refused_under_several_processes(monkeypatch):
    from fastsft import backends
    from fastsft import recipe as R
    from fastsft.errors import BackendError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(backends, "choose_backend", lambda requested: ("unsloth", "the recipe asks for it"))
    recipe = R.validate(
        {"model": {"name": "builtin:tiny-mistral", "backend": "unsloth"}, "data": {"train": "x.jsonl"}}
    )
    with pytest.raises(BackendError, match="single-GPU"):
        backends.load_model(recipe, log=lambda m: None)


def test_zero3_without_deepspeed_is_refused_before_any_rank_starts(tmp_path):
    """(fsdp and deepspeed-zero3 run on CPU ranks too: tests/run/test_sharded.py.)"""
    proc = fastsft(
        "run",
        str(RECIPES / "tiny.toml"),
        "--set",
        "distributed.strategy=deepspeed-zero3",
        "--set",
        "distributed.num_processes=2",
        "-o",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "needs DeepSpeed" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_torchrun_gets_the_multi_host_launch():
    from fastsft.dist import Hosts, launch_command

    assert "--standalone" in launch_command(2, ["run"])
    cmd = launch_command(1, ["run"], Hosts(2, 1, "10.0.0.1", 29500))
    assert "--standalone" not in cmd
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"} <= set(cmd)
    cmd = launch_command(4, ["run"], Hosts(3, rdzv_endpoint="h:29400"))
    assert {"--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=h:29400", "--nproc_per_node=4"} <= set(cmd)


def test_the_shipped_zero3_config_is_the_one_fastsft_uses():
    from fastsft.dist import zero3_config

    shipped = json.loads((RECIPES / "deepspeed" / "zero3_bf16.json").read_text())
    assert shipped == zero3_config("bf16")
    assert shipped["zero_optimization"]["stage"] == 3


LEAVE = """
import atexit, sys
from fastsft import dist
atexit.register(lambda: print("atexit ran", flush=True))
print("work done", end="")
dist.leave()
print("after leave")
"""


@pytest.mark.slow  # several ranks
@pytest.mark.parametrize("world", ["1", "2"])
def test_a_rank_leaves_past_the_exit_time_destructors(world):
    """A rank of a distributed run whose work is done ends in dist.leave (os._exit, after Python's own
    atexit handlers and a flush of its streams): a CPU rank aborted in C++'s exit-time destructors, and
    torchrun then stopped the others. A single process goes on as usual."""
    import os

    env = dict(os.environ, WORLD_SIZE=world)
    proc = subprocess.run([sys.executable, "-c", LEAVE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("work done")  # flushed though it ended with no newline
    assert "atexit ran" in proc.stdout
    assert ("after leave" in proc.stdout) == (world == "1")


def _ranks_of(tag: str) -> dict[int, int]:
    """{rank: pid} of the ranks started with FASTSFT_TEST_TAG=tag (read from /proc)."""

    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(x.split(b"=", 1) for x in (d / "environ").read_bytes().split(b"\0") if b"=" in x)
        except OSError:
            continue
        if env.get(b"FASTSFT_TEST_TAG") == tag.encode() and b"TORCHELASTIC_RUN_ID" in env:
            found[int(env[b"RANK"])] = int(d.name)
    return found


def _signal_a_rank(sig, tmp_path, *extra):
    """`run --launch 2` of a long tiny run; once both ranks have taken a step, `sig` to rank 1. Returns
    (returncode, stdout, stderr, seconds from the signal to the launcher's end). Bounded: 300 s to
    start, 150 s to end."""
    import os
    import time
    import uuid

    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastsft.cli", "run", str(RECIPES / "tiny.toml"), *SHORT, "--set"]
    cmd += ["train.max_steps=2000", "--launch", "2", "-o", str(out), *extra]
    env = dict(os.environ, FASTSFT_TEST_TAG=tag)
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and '"loss"' in metrics.read_text():
                break
            time.sleep(0.5)
        ranks = _ranks_of(tag)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before a rank was stopped:\n{proc.communicate()[1][-3000:]}")
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], sig)
        t = time.time()
        stdout, stderr = proc.communicate(timeout=150)
        return proc.returncode, stdout, stderr, time.time() - t, ranks
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in _ranks_of(tag).values():  # nothing of the run is left behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_one_paragraph(tmp_path):
    """SIGKILL to rank 1 mid-run: the launcher ended in seconds, but with gloo's `Connection reset by
    peer` traceback (rank 0) and torch's ChildFailedError traceback and table. Now: rank 0 says in one
    line that it lost contact, and the launcher one paragraph naming rank 1, its signal, its log and the
    resume command; exit 1, no traceback."""
    code, stdout, stderr, took, ranks = _signal_a_rank(signal.SIGKILL, tmp_path)
    assert code == 1, stderr[-3000:]
    assert took < 60, took
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    assert f"rank 1 (pid {ranks[1]}) was killed by signal SIGKILL" in stderr, stderr[-3000:]
    assert f"fastsft run --resume {tmp_path / 'run'}" in stderr
    log = stderr.split("its log: ")[1].split(". ")[0]
    assert log.endswith("stderr.log") and Path(log).is_file()


@pytest.mark.slow
def test_a_stuck_rank_ends_the_run_after_the_distributed_timeout(tmp_path):
    """SIGSTOP to rank 1 (a stuck rank): rank 0 waited in its collective for torch's 30-minute default
    with no output. With `[distributed] timeout = 30` it gives up after 30 s and the launcher stops the
    stuck rank (SIGTERM, then SIGKILL after torchrun's 30 s) and prints its paragraph; no traceback.
    (10 s was too short on a busy 2-core machine: rank 1 waited longer than that for rank 0's work
    before the first step.)"""
    code, stdout, stderr, took, ranks = _signal_a_rank(
        signal.SIGSTOP, tmp_path, "--set", "distributed.timeout=30"
    )
    assert code == 1, stderr[-3000:]
    assert 30 <= took < 120, took
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "rank 0: lost contact with the other ranks in a collective (Timed out)" in stderr, stderr[-3000:]
    assert f"rank 1 (pid {ranks[1]}) was killed by signal SIGKILL" in stderr
    assert "fastsft run --resume" in stderr


def test_the_distributed_timeout_reaches_the_trainer(monkeypatch):
    """[distributed] timeout (default 10 minutes, not torch's 30) is the Trainer's ddp_timeout under
    every strategy."""
    from fastsft.dist import distributed_kwargs

    monkeypatch.setenv("WORLD_SIZE", "2")
    r = R.load(RECIPES / "tiny.toml")
    assert r.distributed.timeout == 600
    assert distributed_kwargs(r, dtype="fp32")["ddp_timeout"] == 600
    r = R.load(RECIPES / "tiny.toml", ["distributed.timeout=30", "distributed.strategy=fsdp"])
    assert distributed_kwargs(r, dtype="fp32")["ddp_timeout"] == 30
