"""fastsft.progress: the training ETA from measured steps, on a replayed step-time series."""

import pytest
import torch

from fastsft.progress import StepTimer

from _tiny import REPO


def replay(step_times, *, every=1):
    """Feed a StepTimer the clock of a run whose step i takes step_times[i] seconds, logged every
    `every` steps; yield (step, eta, true remaining seconds) at each log."""
    timer = StepTimer()
    clock = 0.0
    timer.start(0, clock)
    total = len(step_times)
    for step in range(1, total + 1):
        clock += step_times[step - 1]
        if step % every == 0:
            timer.observe(step, clock)
            yield step, timer.eta(total), sum(step_times[step:])


def test_eta_leaves_out_the_start_up_and_holds_through_slow_steps():
    # the run: the first step takes 4 minutes (compilation, caches), then ~2.5 s a step under a
    # load that varies, with an evaluation every 100 steps taking 40 s
    times = [240.0] + [2.5 + 0.5 * ((i * 7) % 5 - 2) / 2 for i in range(1, 900)]
    for i in range(100, 900, 100):
        times[i] += 40.0
    seen = list(replay(times))
    step1, eta1, _ = seen[0]
    assert step1 == 1 and eta1 is None  # only the start-up measured: no guess
    for step, eta, truth in seen[1:]:
        # the naive elapsed/steps ETA at step 2 says 2:18:00 (9 times the truth); this one is within 25%
        assert abs(eta - truth) <= 0.25 * truth + 60, (step, eta, truth)
    naive_at_2 = sum(times[:2]) / 2 * (len(times) - 2)
    assert naive_at_2 > 3 * seen[1][2]


def test_eta_with_sparse_logs():
    times = [60.0] + [1.0] * 199
    seen = list(replay(times, every=20))
    assert seen[0][1] is None
    assert all(abs(eta - truth) < 2 for _, eta, truth in seen[1:])


# ----------------------------------------------------------------------------------------------
# Off a terminal: plain lines at the start, at least every LINE_SECONDS, at the end
# ----------------------------------------------------------------------------------------------


def test_off_a_terminal_a_phase_prints_at_once_then_at_least_every_interval(monkeypatch):
    """A log file sees the phase start at once, lines while one slow batch runs (nothing advances: the
    timer thread speaks), and the end, each whole (not cut at 80 columns) with count, rate and ETA."""
    import io
    import time

    from rich.console import Console

    from fastsft import progress

    monkeypatch.setenv("FASTSFT_PROGRESS_SECONDS", "0.1")
    out = io.StringIO()
    console = Console(file=out)  # a file: not a terminal
    what = "base model: task metric on 50 held-out answers, a phase named at more than eighty columns"
    with progress.bar(console, 50, what) as advance:
        assert out.getvalue() == f"{what}: started, 50 to do\n"  # at once
        advance(10)
        time.sleep(0.55)  # one slow batch: no advance
        advance(40)
    lines = out.getvalue().splitlines()
    assert all(line.startswith(f"{what}: ") for line in lines), lines  # one line each, not wrapped
    ticks = [line for line in lines if "/50 (" in line and "ETA" in line]
    assert len(ticks) >= 3, lines  # the slow batch was not silent
    assert "10/50 (20%)" in ticks[0] and "/s" in ticks[0]
    assert lines[-1].startswith(f"{what}: done, 50/50 (100%) in ")


def test_a_phase_without_a_count_says_how_long_it_has_run(monkeypatch):
    import io
    import time

    from rich.console import Console

    from fastsft import progress

    monkeypatch.setenv("FASTSFT_PROGRESS_SECONDS", "0.1")
    out = io.StringIO()
    with progress.phase(Console(file=out), "loading the model"):
        time.sleep(0.35)
    lines = out.getvalue().splitlines()
    assert lines[0] == "loading the model: started"
    assert any(line.startswith("loading the model: running, 0:00 elapsed") for line in lines[1:-1]), lines
    assert lines[-1].startswith("loading the model: done")


def test_the_interval_defaults_to_thirty_seconds(monkeypatch):
    from fastsft import progress

    monkeypatch.delenv("FASTSFT_PROGRESS_SECONDS", raising=False)
    assert progress.line_seconds() == progress.LINE_SECONDS == 30.0


# ----------------------------------------------------------------------------------------------
# Each command, its output piped (a log file, nohup, CI): every long phase prints its lines
# ----------------------------------------------------------------------------------------------


def piped(args: list[str], env: dict) -> str:
    """`fastsft ARGS` with stdout and stderr to a pipe; their text (the command must succeed)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "from fastsft.cli.main import entry; entry()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


def phase_lines(text: str, what: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith(f"{what}: ")]
    assert lines and lines[0].startswith(f"{what}: started"), (what, text)
    assert lines[-1].startswith(f"{what}: done"), (what, text)
    return lines


@pytest.mark.slow
def test_every_command_prints_its_phases_when_piped(tmp_path):
    """run (the base model's answers, task metric, retain loss, step-0 evaluation, the model's load, and
    after training the fine-tuned model's answers, task metric and retain loss), eval,
    generate --data and export, each with its output in a pipe: every phase says it started, how far it
    got (count, rate, ETA) and that it ended; the libraries print no 'Cannot enable progress bars'; the
    finished run leaves no lock file."""
    import os

    from _tiny import DEMO, tiny_recipe, write_recipe

    env = {**os.environ, "FASTSFT_PROGRESS_SECONDS": "0.2", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # a cache of its own: the session's may already hold this base's before-numbers (test_before_cache
    # trains the same recipe), and a reused number prints no phase lines
    env["FASTSFT_CACHE"] = str(tmp_path / "cache")
    rows = DEMO.read_text(encoding="utf-8").splitlines()
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(rows[:6]) + "\n", encoding="utf-8")
    recipe = write_recipe(
        tmp_path / "r.toml",
        tiny_recipe(
            data={"eval": held},
            train={"max_steps": 2, "eval_strategy": "steps", "eval_steps": 2, "seed": None},
        ),
    )
    run = tmp_path / "run"
    out = piped(["run", str(recipe), "-o", str(run)], env)
    phase_lines(out, "loading the model (builtin:tiny-mistral)")
    assert phase_lines(out, "base model: answers to the sample prompts")[0].endswith("3 to do")
    phase_lines(out, "base model: retain loss")
    phase_lines(out, "base model: task metric on 6 held-out answers")
    phase_lines(out, "base model: held-out loss (step 0), batches")
    assert phase_lines(out, "fine-tuned model: answers to the sample prompts")[0].endswith("3 to do")
    phase_lines(out, "fine-tuned model: task metric on 6 held-out answers")
    phase_lines(out, "fine-tuned model: retain loss")
    assert "Cannot enable progress bars" not in out
    assert not (run / ".lock").exists()
    if not torch.cuda.is_available():  # on the CPU: no GPU estimate, and the step lines say rss
        assert "memory estimate" not in out
        steps = [line for line in out.splitlines() if line.startswith("step ")]
        assert steps and all(" rss " in line and " mem " not in line for line in steps), steps

    out = piped(["eval", str(run)], env)
    phase_lines(out, f"loading {run}")
    phase_lines(out, "held-out loss")
    assert any("/6 (" in line and "/s" in line for line in phase_lines(out, "answering")), out

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What colour is a banana?"}\n' * 5, encoding="utf-8")
    out = piped(["generate", str(run), "--data", str(prompts), "-o", str(tmp_path / "a.jsonl")], env)
    assert phase_lines(out, "answering")[-1].startswith("answering: done, 5/5 (100%)")

    out = piped(["export", str(run), "--format", "merged", "--dtype", "fp32"], env)
    assert [line for line in out.splitlines() if line.startswith("merged export: ")], out
    assert "Cannot enable progress bars" not in out


def test_quiet_libraries_leaves_the_libraries_free_to_turn_their_bars_back_on():
    """fastsft turns the hub's and transformers' bars off without HF_HUB_DISABLE_PROGRESS_BARS, whose
    priority made transformers' suppress_progress_bars (and Unsloth's loader) warn 'Cannot enable progress
    bars' each time they put the bars back."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "from fastsft.cli.main import quiet_libraries; quiet_libraries()\n"
        "from transformers.utils import logging\n"
        "assert not logging.is_progress_bar_enabled()  # transformers' loading bars are off\n"
        "from transformers.trainer_utils import suppress_progress_bars\n"
        "with suppress_progress_bars(): pass  # puts the hub's bars back: no warning\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "FASTSFT_VERBOSE")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
