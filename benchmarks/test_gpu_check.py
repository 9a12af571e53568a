"""benchmarks/gpu_check.sh cannot rot: its plans fit one 8-minute device call, and the script itself runs
here with FASTSFT_GPU_STANDIN=1 (no GPU): it unpacks an archive, installs fastsft (into a throwaway
prefix), runs each GPU part's own pytest command with --collect-only, and leaves its files in a given
$OUT, with a part that fails or runs out of budget recorded and the next one run anyway."""

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
QUICK_PARTS = ["setup", "kernels", "loss", "e2e", "fit", "unsloth"]
CALL_LIMIT = 480  # one device call of at most 8 minutes (the tool's timeout_s: 500, leaving a margin)


def dry_run(plan="quick"):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", plan], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t", 2) for line in proc.stdout.splitlines() if line.strip()]
    return [(part, int(limit), shlex.split(cmd)) for part, limit, cmd in rows]


@pytest.mark.parametrize("plan", ["quick", "rest"])
def test_each_plan_fits_one_eight_minute_call_in_order_of_value(plan):
    parts = dry_run(plan)
    names = [p for p, _, _ in parts]
    assert names == (QUICK_PARTS if plan == "quick" else ["setup", "tests", "loss", "e2e"])
    assert sum(limit for _, limit, _ in parts) <= CALL_LIMIT - 10
    text = SCRIPT.read_text()
    budget = int(re.search(r"BUDGET=\$\{FASTSFT_GPU_BUDGET:-(\d+)\}", text).group(1))
    assert budget <= CALL_LIMIT - 10  # and each part's timeout is capped by what is left of it
    for name, _, argv in parts[1:]:
        paths = [a for a in argv if re.match(r"(tests|benchmarks)/\S+\.py$", a)]
        assert paths and all((REPO / a).exists() for a in paths), (name, argv)
    assert parts[0][2][-1].count(".gpu-site.tar.gz") == 1  # build-site.sh's archive, unpacked first
    if plan == "quick":  # fit's plan against the real peak: at most 90 s, on the benchmark's own test file
        fit = next(p for p in parts if p[0] == "fit")
        assert fit[1] <= 90 and "benchmarks/test_fit_gpu.py" in fit[2]


@pytest.mark.parametrize("plan", ["quick", "rest"])
def test_the_loss_part_times_trls_fused_head_beside_fastsft(plan):
    """TRL's fused LM head (SFTTrainer's default loss since TRL 1.15) is the peer: the loss part's -k selects
    its row at every size where it selects fastsft-linear's (the GPU's test ids, matched as pytest does)."""
    from _pytest.mark.expression import Expression

    (argv,) = [argv for name, _, argv in dry_run(plan) if name == "loss"]
    expr = Expression.compile(argv[argv.index("-k") + 1])
    sizes = [(n, v) for v in (32768, 128256, 151936, 262144) for n in (4096, 16384)]

    def selected(impl, n, v):
        test_id = f"test_loss[{impl}-V{v}-N{n}]"
        return expr.evaluate(lambda s, **_: s in test_id)

    linear = [(n, v) for n, v in sizes if selected("fastsft-linear", n, v)]
    assert linear and all(selected("trl", n, v) for n, v in linear), (plan, linear)


def test_unknown_plan_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "nope"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown plan" in proc.stderr


def stand_in(tmp_path, archive, **env):
    out, work, site = tmp_path / "out", tmp_path / "work", tmp_path / "site"
    child = {k: v for k, v in os.environ.items() if not k.startswith(("FASTSFT_BENCH", "OUT"))}
    child.update(
        OUT=str(out),
        FASTSFT_GPU_STANDIN="1",
        FASTSFT_GPU_SITE=str(site),
        FASTSFT_GPU_WORK=str(work),
        FASTSFT_GPU_ARCHIVE=str(archive),
        FASTSFT_GPU_PYTHON=sys.executable,
        **env,
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=child, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, work, site, proc.stdout


def make_archive(tmp_path) -> Path:
    """A stand-in for build-site.sh's archive: one package, imported by the run if it was unpacked."""
    pkg = tmp_path / "pkg" / "standin_site_marker"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("MARK = 1\n")
    archive = tmp_path / "site.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(pkg, arcname="standin_site_marker")
    return archive


def test_stand_in_run_unpacks_installs_and_copies_out(tmp_path):
    out, work, site, stdout = stand_in(tmp_path, make_archive(tmp_path))
    assert (site / "standin_site_marker" / "__init__.py").exists()  # the archive was unpacked
    # fastsft was installed (a throwaway prefix here; `pip install -e .` on the GPU), kernels included
    assert list((work / "prefix").glob("lib/python*/site-packages/fastsft/kernels/cross_entropy.py"))
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "summary.json", "summary.md"], files
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())  # the device tool's limits
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["parts"]) == QUICK_PARTS
    assert all(p["status"] == "ok" for p in summary["parts"].values()), summary["parts"]
    assert summary["parts"]["setup"]["versions"]["fastsft"]
    log = (out / "gpu_check.log").read_text()
    for part in QUICK_PARTS[1:]:  # every GPU part's pytest command selected tests
        section = log.split(f"== {part} (limit", 1)[1].split("\n== ", 1)[0]
        m = re.search(r"(\d+)(?:/\d+)? tests? collected", section)
        assert m and int(m.group(1)) > 0, (part, section[-800:])
    assert "| unsloth | ok |" in (out / "summary.md").read_text()


def test_a_failed_part_does_not_stop_the_next_and_the_budget_holds(tmp_path):
    """No archive: setup fails, the parts after it still run; a 20 s budget: the parts left when it is
    spent are recorded as not started, and the script ends inside it."""
    out, _, _, stdout = stand_in(tmp_path, tmp_path / "missing.tar.gz", FASTSFT_GPU_BUDGET="20")
    parts = json.loads((out / "summary.json").read_text())["parts"]
    assert list(parts) == QUICK_PARTS
    assert parts["setup"]["status"] != "ok"
    assert parts["kernels"]["status"] == "ok"
    assert "not started" in parts["unsloth"].get("note", "")
    done = re.search(r"done in (\d+) s", stdout)
    # the budget, plus the bookkeeping after each part (a busy CI machine: a few seconds)
    assert done and int(done.group(1)) <= 20 + 15, stdout[-1000:]


KILL_AFTER_FIRST = """
import os, pytest
@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid, location):
    os._exit(3)  # as a timeout would: no terminal summary
"""


def test_a_benchmark_stopped_midway_keeps_its_rows(tmp_path):
    """With FASTSFT_BENCH_OUT the benchmarks write their figures after every test (conftest.py), so
    gpu_check.sh's per-part timeout keeps the rows measured before it."""
    (tmp_path / "killer.py").write_text(KILL_AFTER_FIRST)
    bench_out = tmp_path / "bench"
    env = {
        **os.environ,
        "FASTSFT_BENCH_OUT": str(bench_out),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "killer",
            "benchmarks/test_loss_bench.py",
            "-k",
            "test_loss and fastsft-V",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((bench_out / "summary.json").read_text())["loss"]
    assert rows and rows[0]["impl"] == "fastsft", rows
