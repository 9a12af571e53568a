"""Sharded training on 2 CPU ranks (gloo), through the same code path as on GPUs: FSDP2 and DeepSpeed
ZeRO-3, LoRA and `method = "full"`. Each engine/method is one 2-rank run that checks everything at once:
losses equal one process with the same global batch (within test_distributed's tolerance), each rank
holds about half the parameters (run.json's `local_parameters`), the saved adapter / model loads back
with the weights one process trains, a resume continues it, and a checkpoint lacking a rank's files is
refused. A two-host run (two network namespaces joined by a veth pair) equals one process too."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest

from fastsft.rundir import RunDir

from _tiny import RECIPES, REPO

DEEPSPEED = REPO / ".cache" / "deepspeed"  # tests/install-test-extras.sh: DS_BUILD_OPS=0, its own folder
SHORT = [
    "--set",
    "train.max_steps=4",
    "--set",
    "train.logging_steps=1",
    "--set",
    "train.eval_strategy=no",
    "--set",
    "train.save_steps=2",
    "--set",
    "train.save_total_limit=2",
    "--set",
    "model.load_in_4bit=false",
]
FULL = ["--set", "train.method=full", "--set", "train.learning_rate=1e-3"]


# A rank of a sharded CPU run dies, rarely, with this C++ std::terminate (SIGABRT): seen 3 times on a busy
# 2-core machine (a ZeRO-3 resume twice, the two-hosts run once), never in 21 reruns beside two busy
# processes; cause unknown. Such a run is made once more, and the first one's stderr (with every thread's
# Python stack: PYTHONFAULTHANDLER) is kept in a warning, so CI's log holds the evidence. Any other
# failure fails at once.
ABORT = "terminate called without an active exception"


def once_more_on_abort(run, what: str, reset=None):
    """`run()` -> (returncode, stderr, ...); run again (after `reset()`) when a rank aborted with ABORT."""
    result = run()
    if result[0] != 0 and ABORT in result[1]:
        warnings.warn(
            f"{what}: a rank aborted ({ABORT}); ran once more. Its stderr:\n{result[1][-6000:]}", stacklevel=2
        )
        if reset is not None:
            reset()
        result = run()
    return result


def fastsft(*args, cwd, env=None, reset=None):
    env = dict(env or os.environ, PYTHONFAULTHANDLER="1")

    def run():
        proc = subprocess.run(
            [sys.executable, "-m", "fastsft.cli", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        return proc.returncode, proc.stderr, proc

    return once_more_on_abort(run, f"fastsft {' '.join(map(str, args[:2]))}", reset)[2]


def with_deepspeed() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DEEPSPEED), env.get("PYTHONPATH")) if p)
    return env


def losses(run_dir) -> dict:
    rows = RunDir(run_dir).read_metrics()
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice: more than one rank wrote"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_losses(one, two):
    assert sorted(two) == list(range(1, 5))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


def weights(run_dir, method) -> dict:
    """The saved weights, loaded back as the user loads them (the run directory through load_for_use)."""
    from fastsft.use.load import load_for_use

    model, _ = load_for_use(run_dir)
    trained = (lambda n: "lora_" in n) if method == "lora" else (lambda n: True)
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if trained(n)}


def assert_same_weights(one: dict, two: dict):
    assert one.keys() == two.keys() and one
    for name, w in one.items():
        assert two[name].shape == w.shape, name  # whole tensors, not one rank's shard
        assert (two[name] - w).abs().max() <= 1e-3 * max(1.0, float(w.abs().max())), name


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with the global batch (8): the reference, LoRA and full."""
    tmp = tmp_path_factory.mktemp("single")
    out = {}
    for method, extra in (("lora", []), ("full", FULL)):
        proc = fastsft(
            "run",
            str(RECIPES / "tiny.toml"),
            *SHORT,
            *extra,
            "--set",
            "train.per_device_train_batch_size=8",
            "-o",
            str(tmp / method),
            cwd=tmp,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[method] = tmp / method
    return out


def sharded_run(tmp_path, strategy, method, env=None):
    extra = FULL if method == "full" else []
    run = tmp_path / "run"
    proc = fastsft(
        "run",
        str(RECIPES / "tiny.toml"),
        *SHORT,
        *extra,
        "--set",
        f"distributed.strategy={strategy}",
        "--set",
        "train.per_device_train_batch_size=4",
        "--launch",
        "2",
        "-o",
        str(run),
        cwd=tmp_path,
        env=env,
        reset=lambda: shutil.rmtree(run, ignore_errors=True),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run, proc


def check_sharded(run, proc, single, method, strategy):
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2
    assert info["distributed"]["fsdp" if strategy == "fsdp" else "deepspeed"] is True
    counts = info["local_parameters"]
    total = sum(p.numel() for p in _base_parameters())
    if method == "lora":
        total += info["result"]["trainable_parameters"]
    assert len(counts) == 2 and all(0.4 * total <= n <= 0.6 * total for n in counts), (counts, total)
    assert_same_losses(losses(single[method]), losses(run))
    assert_same_weights(weights(single[method], method), weights(run, method))
    # the answers after training are not generated over sharded weights: the report says why
    assert "not generated in the run under" in (run / "report.md").read_text()
    assert proc.stdout.count("run directory:") == 1


def _base_parameters():
    from fastsft import recipe as R
    from fastsft.backends import load_model

    r = R.load(RECIPES / "tiny.toml", ["model.load_in_4bit=false", "train.method=full"])
    return list(load_model(r, log=lambda m: None).model.parameters())


def check_resume(run, single, method, tmp_path, env=None):
    """Resumed from the middle, the run continues as one process trains; with a rank's files missing
    from the checkpoint (hosts that do not share the run directory) it is refused."""
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-4")
    lacking = tmp_path / "lacking"
    shutil.copytree(copy, lacking)

    def reset():  # the resumed run again from the same checkpoint
        shutil.rmtree(copy)
        shutil.copytree(lacking, copy)

    resumed = fastsft("run", "--resume", str(copy), cwd=tmp_path, env=env, reset=reset)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-2" in resumed.stdout
    assert_same_losses(losses(single[method]), losses(copy))

    (lacking / "checkpoints" / "checkpoint-2" / "rng_state_1.pth").unlink()
    refused = fastsft("run", "--resume", str(lacking), cwd=tmp_path, env=env)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "lacks the files of rank(s) 1" in refused.stderr and "share" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow  # several ranks
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_shards_on_two_cpu_ranks_and_trains_like_one_process(single, tmp_path, method):
    run, proc = sharded_run(tmp_path, "fsdp", method)
    check_sharded(run, proc, single, method, "fsdp")
    if method == "lora":
        check_resume(run, single, method, tmp_path)


def deepspeed_or_skip():
    if not (DEEPSPEED / "deepspeed").is_dir():
        pytest.skip(f"DeepSpeed is not installed in {DEEPSPEED} (tests/install-test-extras.sh puts it there)")


@pytest.mark.slow  # several ranks
@pytest.mark.parametrize("method", ["lora", "full"])
def test_zero3_shards_on_two_cpu_ranks_and_trains_like_one_process(single, tmp_path, method):
    deepspeed_or_skip()
    env = with_deepspeed()
    run, proc = sharded_run(tmp_path, "deepspeed-zero3", method, env=env)
    check_sharded(run, proc, single, method, "deepspeed-zero3")
    if method == "lora":
        check_resume(run, single, method, tmp_path, env=env)


# ----------------------------------------------------------------------------------------------
# Two hosts: two network namespaces joined by a veth pair, one rank each
# ----------------------------------------------------------------------------------------------

HOSTS = [(f"fsft{os.getpid()}h{i}", f"fsft{os.getpid()}v{i}", f"10.77.0.{i + 1}") for i in range(2)]


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _tear_down_hosts():
    for ns, _, _ in HOSTS:  # deleting a namespace deletes its end of the veth pair, and so the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    """Two "hosts": network namespaces whose only link is a veth pair, addresses 10.77.0.1 and .2 inside
    them (nothing else on any network is touched); torn down after, whatever happens."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("two hosts need root and iproute2's `ip` (tests/install-test-extras.sh installs it)")
    try:
        (ns0, veth0, _), (ns1, veth1, _) = HOSTS
        _ip("netns", "add", ns0)
        _ip("netns", "add", ns1)
        _ip("link", "add", veth0, "netns", ns0, "type", "veth", "peer", "name", veth1, "netns", ns1)
        for ns, veth, addr in HOSTS:
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as e:
        _tear_down_hosts()
        pytest.skip(f"cannot make network namespaces here: {getattr(e, 'stderr', None) or e}")
    try:
        yield HOSTS
    finally:
        _tear_down_hosts()


@pytest.mark.slow  # several ranks
def test_two_hosts_train_like_one_process(single, tmp_path, two_hosts):
    """`fastsft run --nnodes 2 --node-rank N --master-addr ...` on each host, one rank each, gloo over the
    veth pair (GLOO_SOCKET_IFNAME), the run directory in a folder both share: the losses equal one
    process with the same global batch."""
    run = tmp_path / "run"
    master = two_hosts[0][2]
    code, err = once_more_on_abort(
        lambda: _two_hosts_run(tmp_path, run, master, two_hosts),
        "two hosts",
        reset=lambda: shutil.rmtree(run, ignore_errors=True),
    )
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert_same_losses(losses(single["lora"]), losses(run))


def _two_hosts_run(tmp_path, run, master, two_hosts) -> tuple[int, str]:
    """One rank per host; (0, "") when both exit 0, else (1, the stderr of the first that did not)."""
    procs = []
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    for node, (ns, veth, _) in enumerate(two_hosts):
        cmd = [
            "ip",
            "netns",
            "exec",
            ns,
            "env",
            f"GLOO_SOCKET_IFNAME={veth}",
            sys.executable,
            "-m",
            "fastsft.cli",
            "run",
            str(RECIPES / "tiny.toml"),
            *SHORT,
            "--set",
            "train.per_device_train_batch_size=4",
            "--launch",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--master-addr",
            master,
            "--master-port",
            "29577",
            "-o",
            str(run),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            return 1, err[-3000:]
    return 0, ""


def test_several_hosts_need_a_run_directory_they_share(tmp_path):
    proc = fastsft(
        "run", str(RECIPES / "tiny.toml"), "--nnodes", "2", "--master-addr", "10.77.0.1", cwd=tmp_path
    )
    assert proc.returncode == 2 and "folder they all share" in proc.stderr
    assert "Traceback" not in proc.stderr
