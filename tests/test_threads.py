"""fastsft.threads: the `fastsft` command sets OMP_WAIT_POLICY=PASSIVE before torch loads (OpenMP reads it
once, then), what the user set wins, and the ranks of `run --launch` get it too.

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
    assert seen["OMP_WAIT_POLICY"] == "PASSIVE"
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
    """`run --launch 2`: torchrun and both ranks (the `fastsft` script again) load torch under PASSIVE."""
    seen = _fastsft(
        ["run", str(REPO / "recipes/tiny.toml"), "--launch", "2", "-o", "out"], tmp_path, exit_at="ranks"
    )
    ranks = sorted(s["RANK"] for s in seen if s["RANK"] is not None)
    assert ranks == ["0", "1"], seen
    assert all(s["OMP_WAIT_POLICY"] == "PASSIVE" for s in seen), seen


def test_apply_decides_once_and_leaves_the_users_choice():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.apply(env) == "user" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"KMP_BLOCKTIME": "200"}
    assert threads.apply(env) == "user" and "OMP_WAIT_POLICY" not in env
    env = {"FASTSFT_THREAD_POLICY": "off"}
    assert threads.apply(env) == "off" and "OMP_WAIT_POLICY" not in env
    # a rank of `run --launch` finds its parent's choice and records it as fastsft's
    env = {"OMP_WAIT_POLICY": "PASSIVE", threads.MARK: "1"}
    assert threads.apply(env) == "fastsft" and threads.facts(env)["set_by"] == "fastsft"
    assert threads.facts({"OMP_WAIT_POLICY": "PASSIVE"})["set_by"] == "user"
    assert threads.facts({})["set_by"] == "OpenMP default"
    # torch already loaded (a Python caller of entry()): nothing is set, since OpenMP would not read it
    env = {}
    assert "torch" in sys.modules and threads.apply(env) == "too late" and env == {}
