"""Progress for the commands that take a while (eval, generate over a file, export, data preparation) and
the training ETA.

- `bar(console, total, what)`: a rich progress bar (count, rate, ETA) as a context manager that yields an
  `advance(n=1)` function; on a console that is not a terminal it prints nothing until the end, then a
  single line.
- `StepTimer`: the time per step from measured steps only, for an ETA that is right from the first
  logs: the first `skip` steps (start-up, compilation, the first evaluation's warm caches) are left out,
  and the estimate is the median of the recent steps' times, so one slow step (a checkpoint, an
  evaluation) does not swing it.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import deque


@contextlib.contextmanager
def bar(console, total: int | None, what: str):
    """`with bar(console, 50, "answers") as advance: ... advance(8)`."""
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


__all__ = ["StepTimer", "bar"]
