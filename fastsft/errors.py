"""The errors a user can cause. The CLI prints them as one paragraph, without a traceback, and exits 2.

Each says what is wrong, where (file, line or key), the value and the fix. Anything else that escapes
is a bug of ours and keeps its traceback.
"""

from __future__ import annotations


class FastSFTError(Exception):
    """Base of the errors that are the user's to fix."""

    exit_code = 2
    is_error = True  # printed as "error: ..."; False for a stop the user asked for


class RecipeError(FastSFTError):
    """A recipe that cannot be read or validated. Holds every problem found, not only the first."""

    def __init__(self, problems: list[str] | str, *, path: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.path = path
        where = f"{path}: " if path else ""
        if len(self.problems) == 1:
            msg = f"{where}{self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"{where}{len(self.problems)} problems in the recipe:\n{lines}"
        super().__init__(msg)


class DataError(FastSFTError):
    """A data file or row that cannot be used: names the file and the line (1-based) or index."""


class BackendError(FastSFTError):
    """A model that cannot be loaded the way the recipe asks (missing GPU, unsloth, weights...)."""


class RunDirError(FastSFTError):
    """An output folder that would be overwritten, or a run folder that cannot be resumed."""


class ExportError(FastSFTError):
    """An export that cannot be written or that failed its parity check."""


class TrainingStopped(FastSFTError):
    """Training stopped before its end (interrupted, non-finite loss, out of memory): the message says
    why, what was kept and how to go on."""


class Interrupted(TrainingStopped):
    """SIGINT / SIGTERM: a checkpoint was written and the resume command printed. Exits as a shell
    reports a process ended by that signal: 130 (SIGINT), 143 (SIGTERM). A stop the user asked for,
    not an error."""

    exit_code = 130
    is_error = False

    def __init__(self, message: str, *, signal_name: str = "SIGINT"):
        import signal

        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGINT))


class OutOfMemory(TrainingStopped):
    exit_code = 3
