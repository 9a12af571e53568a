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
