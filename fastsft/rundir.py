"""The run directory: everything a run writes goes through here.

    RUN_DIR/
      recipe.toml       the resolved recipe (overrides applied, defaults filled in)
      run.json          versions, device, seed, backend, loss route, data fingerprint and stats, outcome
      metrics.jsonl     one JSON object per logged step
      checkpoints/      the Trainer's checkpoint-N folders
      adapter/          the PEFT adapter + tokenizer (with its chat template)
      model/            instead of adapter/ for [train] method = "full": the whole model + tokenizer
      report.md         the summary, with loss.png (the loss curve)

The folder is made only once the run's setup (recipe, model, data) has passed, and locked (fcntl,
`.lock` holds the PID) for the life of the run: a second run or resume of it is refused. The run removes
`.lock` when it ends (finished, failed or interrupted); one left by a killed process holds no flock and
is taken over. An existing
folder is replaced only when it is a fastsft run and `overwrite` is given (or it is the leftover of a
run that stopped before its first step); the old one is moved aside, and deleted once the new run has
started. Every write goes through `fastsft.files` (atomic, never through a symlink, umask honoured).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from . import files
from .errors import RunDirError

RECIPE = "recipe.toml"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MODEL = "model"  # a full fine-tune's trained model (no adapter)
REPORT = "report.md"
LOSS_PNG = "loss.png"
LOCK = ".lock"


def default_path(recipe_path: str | Path, root: str | Path = "runs") -> Path:
    """runs/<recipe name>-<YYYYmmdd-HHMMSS>"""
    stem = Path(recipe_path).stem
    return Path(root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self.replaced: Path | None = None  # the old run moved aside by `create`, until `drop_replaced`

    # ------------------------------------------------------------------------------------------
    # Making, opening, locking
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def check_target(path: str | Path, *, overwrite: bool = False) -> str:
        """Refuse now, before anything is loaded, an --output-dir that `create` would refuse; nothing is
        changed. Returns "new" (absent or empty), "replace" (a fastsft run, with `overwrite`) or
        "leftover" (a run that stopped before its first step: replaced without --overwrite)."""
        path = Path(path)
        if path.is_symlink():
            raise RunDirError(
                f"--output-dir {path} is a symbolic link (to {os.readlink(path)}); fastsft never writes or "
                "replaces through a link. Pass the real folder, or another --output-dir."
            )
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--output-dir {path} is a file, not a folder. Choose another --output-dir.")
        if not path.is_dir() or not any(path.iterdir()):
            return "new"
        if not is_run_dir(path):
            raise RunDirError(
                f"{path} already holds files that are not a fastsft run; nothing was changed. --overwrite only "
                "ever replaces a fastsft run directory: choose another --output-dir."
            )
        holder = lock_holder(path)
        if holder is not None:
            raise RunDirError(_in_use(path, holder))
        if _is_leftover(path):
            return "leftover"
        if not overwrite:
            raise RunDirError(
                f"{path} already holds a fastsft run; nothing was changed. Choose another --output-dir, "
                "or pass --overwrite to replace it."
            )
        return "replace"

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> RunDir:
        """Make and lock the run directory. An old run there (see `check_target`) is moved aside to
        `.NAME.old-PID-*`; `drop_replaced` deletes it, `restore_replaced` puts it back."""
        path = Path(path)
        kind = cls.check_target(path, overwrite=overwrite)
        aside = None
        if kind != "new":
            aside = files.temp_dir(path.parent, f".{path.name}.old-")
            try:
                os.replace(path, aside / "run")
            except OSError as e:
                shutil.rmtree(aside, ignore_errors=True)
                raise RunDirError(f"cannot move the old run {path} aside: {e.strerror}") from None
        try:
            files.make_dir(path)
            run = cls(path)
            run.lock()
        except BaseException:
            if aside is not None and not any(path.iterdir() if path.is_dir() else []):
                if path.is_dir():
                    path.rmdir()
                os.replace(aside / "run", path)
                shutil.rmtree(aside, ignore_errors=True)
            raise
        run.replaced = aside
        return run

    def drop_replaced(self) -> None:
        """Delete the old run that `create` moved aside (call once the new run has started)."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def restore_replaced(self) -> None:
        """The new run failed before it started: remove it and put the old run back."""
        if self.replaced is None:
            return
        self.unlock()
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(self.replaced / "run", self.path)
        shutil.rmtree(self.replaced, ignore_errors=True)
        self.replaced = None

    @classmethod
    def open(cls, path: str | Path, *, lock: bool = False) -> RunDir:
        """An existing run directory, to resume (locked when `lock`). A symbolic link in it is refused."""
        path = Path(path)
        missing = [n for n in (RECIPE, RUN_JSON) if not (path / n).is_file()]
        if not path.is_dir() or missing:
            raise RunDirError(
                f"--resume {path}: not a fastsft run directory (missing {', '.join(missing) or 'the folder'}). "
                "Pass the folder that `fastsft run` printed as its run directory."
            )
        run = cls(path)
        if lock:
            run.check_no_symlinks()
            run.lock()
        return run

    def check_no_symlinks(self) -> None:
        """RunDirError naming the first symbolic link inside the run directory (or the folder itself)."""
        if self.path.is_symlink():
            raise RunDirError(
                f"{self.path} is a symbolic link; pass the real run directory ({os.path.realpath(self.path)})."
            )
        for root, dirs, names in os.walk(self.path):
            for name in dirs + names:
                p = Path(root) / name
                if p.is_symlink():
                    raise RunDirError(
                        f"{p} is a symbolic link (to {os.readlink(p)}); fastsft never writes through a link "
                        "in a run directory. Remove it (or replace it with a copy of what it points to) and "
                        "run again."
                    )

    def lock(self) -> None:
        """Hold an exclusive lock on the run directory until `unlock` (or the process ends)."""
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path / LOCK, flags, 0o666)
        except OSError as e:
            raise RunDirError(
                f"cannot lock {self.path}: {files.describe_os_error(e, self.path / LOCK)}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(_in_use(self.path, lock_holder(self.path) or "unknown")) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path / LOCK, follow_symlinks=False).st_ino
        except OSError:
            same = False
        if not same:  # the holder removed the file as it ended, between our open and flock: the file is new
            os.close(fd)
            return self.lock()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock and remove `.lock` (removed while still held, so no other process can have
        taken it; one that opened the file before is sent to the new file by `lock`'s inode check)."""
        if self._lock_fd is not None:
            try:
                if os.fstat(self._lock_fd).st_ino == os.stat(self.path / LOCK, follow_symlinks=False).st_ino:
                    os.unlink(self.path / LOCK)
            except OSError:
                pass  # the folder is gone (restore_replaced) or unwritable: the flock is released below
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first. A checkpoint is complete when
        its trainer_state.json parses; staging folders of an interrupted save never count."""
        out = []
        if not self.checkpoints.is_dir():
            return out
        for d in self.checkpoints.iterdir():
            name = d.name
            if not (d.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit()):
                continue
            try:
                json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            out.append((int(name[len("checkpoint-") :]), d))
        return sorted(out)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows logged after `after_step` (they will be logged again on resume)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        self.write_text(METRICS, "".join(_json_line(r) + "\n" for r in rows))

    # paths
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def model(self) -> Path:
        return self.path / MODEL

    def weights_dir(self, method: str) -> Path:
        """Where the trained weights go: adapter/ for LoRA, model/ for a full fine-tune."""
        return self.model if method == "full" else self.adapter

    # writing: atomic, never through a symlink, umask honoured (fastsft.files)
    def write_text(self, name: str, text: str) -> Path:
        return files.write_text(self.path / name, text)

    def write_bytes(self, name: str, data: bytes) -> Path:
        return files.write_bytes(self.path / name, data)

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(
            name, json.dumps(_nonfinite_as_none(obj), indent=2, default=str, allow_nan=False) + "\n"
        )

    def read_json(self, name: str) -> dict:
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RunDirError(
                f"{self.path / name} cannot be read ({e}); is this a fastsft run directory?"
            ) from None

    def update_json(self, name: str, **fields) -> None:
        obj = self.read_json(name) if (self.path / name).exists() else {}
        obj.update(fields)
        self.write_json(name, obj)

    def append_metrics(self, row: dict) -> None:
        """One JSON line; non-finite numbers are written as null (NaN is not JSON)."""
        files.append_line(self.path / METRICS, _json_line(row))

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.jsonl. A torn last line (the process died, or the disk filled, while
        writing it) is dropped; a bad line before the last is an error naming it."""
        p = self.path / METRICS
        if not p.exists():
            return []
        lines = p.read_text(encoding="utf-8", errors="replace").split("\n")
        rows = []
        numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
        for k, (i, line) in enumerate(numbered):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                if k == len(numbered) - 1:
                    break  # torn last line
                raise RunDirError(
                    f"{p}, line {i}: not a JSON object. Delete that line (or the file, losing the curve) "
                    "and run again."
                ) from None
            rows.append(row)
        return rows


def _nonfinite_as_none(obj):
    """`obj` with NaN / inf floats replaced by None, for JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nonfinite_as_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nonfinite_as_none(v) for v in obj]
    return obj


def _json_line(row: dict) -> str:
    return json.dumps(_nonfinite_as_none(row), default=float, allow_nan=False)


def is_run_dir(path: str | Path) -> bool:
    """A folder `fastsft run` made: it holds recipe.toml and run.json (or, stopped during setup by an
    older fastsft, recipe.toml and nothing but run files)."""
    path = Path(path)
    if (path / RECIPE).is_file() and (path / RUN_JSON).is_file():
        return True
    known = {RECIPE, RUN_JSON, METRICS, CHECKPOINTS, ADAPTER, MODEL, REPORT, LOSS_PNG, LOCK}
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    return RECIPE in names and all(n in known or n.startswith(".") for n in names)


def _is_leftover(path: Path) -> bool:
    """A run that stopped before its first step: no checkpoint, no adapter, no logged train step."""
    run = RunDir(path)
    if run.complete_checkpoints() or (path / ADAPTER).exists() or (path / MODEL).exists():
        return False
    try:
        return not any("loss" in r for r in run.read_metrics())
    except RunDirError:
        return False


def lock_holder(path: str | Path) -> int | str | None:
    """The PID holding `path`'s run lock, or None when it is free."""
    import fcntl

    lock = Path(path) / LOCK
    if not lock.is_file() or lock.is_symlink():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = lock.read_text(encoding="ascii", errors="replace").strip()
            return int(text) if text.isdigit() else "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _in_use(path: Path, pid) -> str:
    return (
        f"{path} is in use by another fastsft process (PID {pid}); nothing was changed. Wait for it to end, "
        f"or stop it first (kill -INT {pid} writes a checkpoint), then run again."
    )
