"""Progress for every phase that takes a while (the run's setup: the base model's answers, task metric,
retain loss and step-0 evaluation; eval; generate over a file; export; a model's load; data preparation;
GGUF conversion) and the training ETA.

- `bar(console, total, what)`: a context manager that yields an `advance(n=1)` function. On a terminal it
  is a rich progress bar (count, rate, ETA). Off a terminal (a pipe, a log file, nohup, CI) it prints
  plain lines, never cut to the console's width: one at once when the phase starts, then one at least
  every LINE_SECONDS (from a timer thread, so a phase whose single batch is slow is not silent), and one
  when it ends, each with the phase, count, rate and ETA. `total=None` is a phase without a count (a
  model's load): its lines say how long it has run.
- `phase(console, what)`: `bar(console, None, what)`.
- `StepTimer`: the time per step from measured steps only, for an ETA that is right from the first
  logs: the first `skip` steps (start-up, compilation, the first evaluation's warm caches) are left out,
  and the estimate is the median of the recent steps' times, so one slow step (a checkpoint, an
  evaluation) does not swing it.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections import deque

LINE_SECONDS = 30.0  # off a terminal: a progress line at least this often
# (the environment variable FASTSFT_PROGRESS_SECONDS overrides it: the tests' piped commands use 0.2 s)


def line_seconds() -> float:
    try:
        return max(0.05, float(os.environ["FASTSFT_PROGRESS_SECONDS"]))
    except (KeyError, ValueError):
        return LINE_SECONDS


@contextlib.contextmanager
def bar(console, total: int | None, what: str):
    """`with bar(console, 50, "answers") as advance: ... advance(8)`."""
    if console is None:
        from rich import get_console

        console = get_console()
    if not console.is_terminal:
        lines = _Lines(console, total, what, line_seconds())
        try:
            yield lines.advance
        except BaseException:
            lines.close(ok=False)
            raise
        lines.close(ok=True)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(what, total=total, rate="")

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            t = progress.tasks[task]
            if t.elapsed and t.completed:
                progress.update(task, rate=f"{t.completed / t.elapsed:.2f}/s")

        yield advance


def phase(console, what: str):
    """A phase without a count (a model's load, a conversion): `with phase(console, "loading"): ...`."""
    return bar(console, None, what)


class _Lines:
    """The plain lines of a phase off a terminal: at its start, at least every `every` seconds, at its end."""

    def __init__(self, console, total: int | None, what: str, every: float):
        self.console, self.total, self.what, self.every = console, total, what, every
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._print(f"{what}: started" + (f", {total} to do" if total is not None else ""))
        self.thread = threading.Thread(target=self._tick, name="fastsft-progress", daemon=True)
        self.thread.start()

    def advance(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            due = time.monotonic() - self.last >= self.every
        if due:
            self._print(self.describe())

    def _tick(self) -> None:
        while not self.stop.wait(self.every / 4):
            if time.monotonic() - self.last >= self.every:
                self._print(self.describe())

    def describe(self, *, end: str | None = None) -> str:
        with self.lock:
            done = self.done
        elapsed = time.monotonic() - self.t0
        if self.total is None:
            counted = f"{done} done, " if done else ""
            return f"{self.what}: {end or 'running'}, {counted}{_clock(elapsed)} elapsed"
        rate = done / elapsed if elapsed > 0 else 0.0
        pct = f" ({done / self.total:.0%})" if self.total else ""
        eta = _clock((self.total - done) / rate) if rate > 0 else "-"
        if end:
            return f"{self.what}: {end}, {done}/{self.total}{pct} in {_clock(elapsed)}, {rate:.2f}/s"
        return f"{self.what}: {done}/{self.total}{pct}, {rate:.2f}/s, {_clock(elapsed)} elapsed, ETA {eta}"

    def _print(self, line: str) -> None:
        self.last = time.monotonic()
        # soft_wrap: a log file gets the whole line, not the console's 80 columns
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def close(self, *, ok: bool) -> None:
        self.stop.set()
        self.thread.join()
        self._print(self.describe(end="done" if ok else "stopped"))


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StepTimer:
    """Seconds per step from measured steps: `observe(step, now)` at each log, `eta(total)`.

    The interval that ends at the first observation holds the start-up and is never used; after that,
    each interval between two observations gives (seconds / steps) for its steps, and the estimate is the
    median over the last `window` intervals. Before a measured interval exists `eta` is None (shown as
    "-"), not an extrapolation from the start-up."""

    def __init__(self, *, skip: int = 1, window: int = 20):
        self.skip = skip  # observations whose interval is start-up
        self.window = window
        self.per_step: deque[float] = deque(maxlen=window)
        self.last: tuple[int, float] | None = None
        self.seen = 0

    def start(self, step: int, now: float) -> None:
        """Training begins (or resumes) at `step`."""
        self.last = (step, now)

    def observe(self, step: int, now: float) -> None:
        if self.last is not None and step > self.last[0]:
            if self.seen >= self.skip:
                self.per_step.append((now - self.last[1]) / (step - self.last[0]))
            self.seen += 1
        self.last = (step, now)

    def seconds_per_step(self) -> float | None:
        return statistics.median(self.per_step) if self.per_step else None

    def eta(self, total: int) -> float | None:
        sps = self.seconds_per_step()
        if sps is None or self.last is None:
            return None
        return sps * max(0, total - self.last[0])


__all__ = ["LINE_SECONDS", "StepTimer", "bar", "phase"]
