"""fastsft.progress: the training ETA from measured steps, on a replayed step-time series."""

from fastsft.progress import StepTimer


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
