"""fastsft.threads: the `fastsft` command sets a short OpenMP spin (GOMP_SPINCOUNT) before torch loads
(OpenMP reads it once, then), what the user set wins, the ranks of `run --launch` get it too, and the
loops (training steps, generated tokens) follow the cores other processes leave free.

The child processes carry a sitecustomize.py that notes the environment at the moment `torch` is
first imported (a meta-path finder: the import itself is what OpenMP's settings are read at), then ends
the process there, so each command costs its start-up only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastsft import threads

REPO = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = """
import json, os, sys

class _SeeTorch:
    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        keys = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "RANK")
        seen = {k: os.environ.get(k) for k in keys}
        seen["argv"] = sys.argv
        with open(os.path.join(os.environ["SEEN_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump(seen, f)
        if os.environ.get("EXIT_AT_TORCH") == "all" or os.environ.get("RANK") is not None:
            os._exit(0)
        return None

sys.meta_path.insert(0, _SeeTorch())
"""


def _fastsft(args, tmp_path, *, exit_at="all", **env_changes) -> list[dict]:
    """Run `fastsft ARGS` (the console script's entry) with the torch-import probe; returns what each
    process of it saw as torch loaded."""
    site, seen = tmp_path / "site", tmp_path / "seen"
    site.mkdir(exist_ok=True)
    seen.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_KEYS and not k.startswith("FASTSFT_")}
    env.pop("OMP_NUM_THREADS", None)
    env.update(env_changes)
    env["FASTSFT_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    env.update(SEEN_DIR=str(seen), EXIT_AT_TORCH=exit_at)
    code = "import sys; from fastsft.cli import entry; sys.argv[0] = 'fastsft'; entry()"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = [json.loads(p.read_text()) for p in sorted(seen.glob("*.json"))]
    assert found, f"torch was never imported by `fastsft {' '.join(args)}`:\n{proc.stdout}\n{proc.stderr}"
    return found


COMMANDS = {
    "run": ["run", str(REPO / "recipes/tiny.toml"), "-o", "out"],
    "plan": ["plan", str(REPO / "recipes/tiny.toml")],
    "data preview": ["data", "preview", str(REPO / "recipes/tiny.toml"), "-n", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_wait_policy_is_set_before_torch_loads(command, tmp_path):
    (seen,) = _fastsft(COMMANDS[command], tmp_path)
    assert seen["GOMP_SPINCOUNT"] == threads.SPIN and seen["OMP_WAIT_POLICY"] is None
    assert seen["OMP_NUM_THREADS"] is None  # no thread count is guessed


@pytest.mark.parametrize(
    "user",
    [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "100000"}, {"FASTSFT_THREAD_POLICY": "off"}],
    ids=["OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "off"],
)
def test_what_the_user_set_wins(user, tmp_path):
    (seen,) = _fastsft(COMMANDS["plan"], tmp_path, **user)
    assert seen["OMP_WAIT_POLICY"] == user.get("OMP_WAIT_POLICY")  # ACTIVE kept; otherwise left unset
    assert seen["GOMP_SPINCOUNT"] == user.get("GOMP_SPINCOUNT")


@pytest.mark.slow
def test_the_ranks_of_a_launch_get_the_policy(tmp_path):
    """`run --launch 2`: torchrun and both ranks (the `fastsft` script again) load torch under the policy."""
    seen = _fastsft(
        ["run", str(REPO / "recipes/tiny.toml"), "--launch", "2", "-o", "out"], tmp_path, exit_at="ranks"
    )
    ranks = sorted(s["RANK"] for s in seen if s["RANK"] is not None)
    assert ranks == ["0", "1"], seen
    assert all(s["GOMP_SPINCOUNT"] == threads.SPIN and s["OMP_WAIT_POLICY"] is None for s in seen), seen


def test_apply_decides_once_and_leaves_the_users_choice():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.apply(env) == "user" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"KMP_BLOCKTIME": "200"}
    assert threads.apply(env) == "user" and env == {"KMP_BLOCKTIME": "200"}
    env = {"FASTSFT_THREAD_POLICY": "off"}
    assert threads.apply(env) == "off" and "GOMP_SPINCOUNT" not in env
    # a rank of `run --launch` finds its parent's choice and records it as fastsft's
    env = {"GOMP_SPINCOUNT": threads.SPIN, threads.MARK: "1"}
    assert threads.apply(env) == "fastsft" and threads.facts(env)["set_by"] == "fastsft"
    assert threads.facts(env)["follows_free_cores"] and threads.following(env)
    assert threads.facts({"GOMP_SPINCOUNT": threads.SPIN})["set_by"] == "user"
    assert not threads.following({"GOMP_SPINCOUNT": threads.SPIN})
    assert not threads.following(
        {"GOMP_SPINCOUNT": threads.SPIN, threads.MARK: "1", "OMP_WAIT_POLICY": "PASSIVE"}
    )
    assert threads.facts({})["set_by"] == "OpenMP default"
    # torch already loaded (a Python caller of entry()): nothing is set, since OpenMP would not read it
    env = {}
    assert "torch" in sys.modules and threads.apply(env) == "too late" and env == {}


def test_a_loop_drops_threads_only_when_the_cores_stay_taken(monkeypatch):
    """The follower keeps the last WINDOW samples of the free cores and runs on the most of them: a single
    sample that saw a core taken (a passing process on an idle machine) does not put a step on fewer
    threads; samples that all saw it taken do, and one free sample brings the threads back."""
    import torch

    from fastsft.kernels import online_tiles

    monkeypatch.setenv(threads.MARK, "1")
    monkeypatch.setenv("GOMP_SPINCOUNT", threads.SPIN)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    samples = iter([2, 1, 2, 2, 1, 1, 1, 2, 1])
    monkeypatch.setattr(online_tiles, "free_cpu_threads", lambda threads: next(samples))
    before = torch.get_num_threads()
    try:
        follow = threads.Follower(2, window=3)
        chosen = []
        for _ in range(9):
            follow()
            chosen.append(torch.get_num_threads())
        assert chosen == [2, 2, 2, 2, 2, 2, 1, 2, 2], chosen
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # beside busy processes
def test_the_loops_follow_the_cores_other_processes_leave_free(monkeypatch, tiny_model_dir):
    """Under fastsft's policy a training step (the trainer's callback) and each generated token run on the
    cores no other process holds: beside a busy process per core, one thread; the count the work began
    with comes back after it. Without the policy (a user's own OMP settings) the count is left alone."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

    from fastsft.chat.generation import generate_ids
    from fastsft.kernels.online_tiles import free_cpu_threads
    from fastsft.run.callbacks import FollowFreeCores

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores < 2:
        pytest.skip("one core: nothing to follow")
    monkeypatch.setenv(threads.MARK, "1")
    monkeypatch.setenv("GOMP_SPINCOUNT", threads.SPIN)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    seen = []

    class Spy(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            seen.append(torch.get_num_threads())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        deadline = time.monotonic() + 10
        while free_cpu_threads(cores) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # (the busy processes need a moment to start)
        callback = FollowFreeCores()
        callback.on_step_begin(None, None, None)
        assert torch.get_num_threads() == 1
        callback.on_train_end(None, None, None)
        assert torch.get_num_threads() == cores
        generate_ids(model, tokenizer, [1, 2, 3], eot=[], max_new_tokens=4, stopping_criteria=[Spy()])
        assert seen and seen[-1] == 1, seen  # the follower runs first, the spy after it
        assert torch.get_num_threads() == cores
        monkeypatch.delenv(threads.MARK)  # not fastsft's policy: nothing follows
        seen.clear()
        generate_ids(model, tokenizer, [1, 2, 3], eot=[], max_new_tokens=4, stopping_criteria=[Spy()])
        assert seen and set(seen) == {cores}, seen
    finally:
        for p in busy:
            p.kill()
            p.wait()
        torch.set_num_threads(before)
