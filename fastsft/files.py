"""Writing files safely: the one place fastsft writes run files, checkpoints' staging, exports and caches.

- Atomic: a file is written under a temporary name beside its target, flushed, then renamed over it,
  so a reader sees the old file or the new one, never half of one.
- No symlinks: a target (or a folder on the way) that is a symbolic link is refused, so a link planted
  in a run directory cannot redirect a write outside it.
- The umask: files get 0666 and folders 0777 minus the process's umask, as `open` and `mkdir` would
  (Python's `mkstemp` / `mkdtemp` make 0600 / 0700 whatever the umask says).
- A write that fails (ENOSPC, EIO...) raises `WriteFailed`, a fastsft error that names the file and
  the cause; the target keeps its previous content.
- A user's output file (`generate -o`, `eval --json-out`): `check_output` refuses it before any work
  when it exists (without --overwrite), is a folder or link, is one of the command's inputs or belongs
  to a folder the command reads (a run directory); `write_output` writes it atomically and, without
  --overwrite, never replaces a file that appeared meanwhile. The same rule as `run -o` and `export --to`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import FastSFTError


class WriteFailed(FastSFTError):
    """A file or folder could not be written (disk full, permission, a symlink in the way)."""


class OutputRefused(FastSFTError):
    """An output file that would replace something: an existing file without --overwrite, or (even with
    it) one of the command's own inputs or a file of a folder it reads."""


def umask() -> int:
    """The process's umask (read without changing it where the kernel tells it, else set and reset)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def refuse_symlink(path: str | Path, what: str = "") -> None:
    """WriteFailed when `path` is a symbolic link (dangling or not)."""
    p = Path(path)
    if p.is_symlink():
        raise WriteFailed(
            f"{p} is a symbolic link (to {os.readlink(p)}); fastsft never writes through a link. "
            f"Remove the link{' ' + what if what else ''} or choose another folder."
        )


def describe_os_error(e: OSError, path: str | Path) -> str:
    if e.errno == errno.ENOSPC:
        cause = "the disk is full"
    elif e.errno in (errno.EACCES, errno.EPERM):
        cause = "permission denied"
    elif e.errno == errno.EDQUOT:
        cause = "the disk quota is exceeded"
    elif e.errno == errno.EROFS:
        cause = "the file system is read-only"
    else:
        cause = e.strerror or type(e).__name__
    return f"cannot write {path}: {cause}"


def is_write_error(e: BaseException) -> bool:
    """An OSError, or a library's wrapping of one (safetensors' SafetensorError "IoError(Os { code: 28 ..."),
    for a disk that is full or a quota that is exceeded."""
    if isinstance(e, WriteFailed):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def make_dir(path: str | Path) -> Path:
    """mkdir -p, refusing symlinks on the way; the new folders honour the umask."""
    p = Path(path)
    refuse_symlink(p)
    try:
        p.mkdir(parents=True, exist_ok=True)  # mode 0o777, less the umask
    except OSError as e:
        raise WriteFailed(describe_os_error(e, p)) from None
    return p


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new folder in `parent` (like mkdtemp), named `prefix` + pid + random, with the umask's mode."""
    parent = Path(parent)
    refuse_symlink(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
        os.chmod(tmp, dir_mode())
    except OSError as e:
        raise WriteFailed(describe_os_error(e, parent)) from None
    return tmp


@contextlib.contextmanager
def new_dir(target: str | Path, *, complete: str | None = None):
    """Make folder `target` all at once: the block fills the temporary folder this yields (beside
    `target`), which is renamed to `target` when the block ends without an error and removed otherwise,
    so a reader never sees half a folder. When another process made `target` first (holding the file
    `complete`, when given), theirs is kept. Used for caches (built-in models, converted GGUFs)."""
    target = Path(target)
    make_dir(target.parent)
    tmp = temp_dir(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        apply_umask(tmp)
        try:
            os.replace(tmp, target)
        except OSError as e:
            if complete is not None and target.is_dir() and not (target / complete).exists():
                _replace_incomplete(tmp, target, complete, e)
            elif not target.is_dir():
                raise WriteFailed(describe_os_error(e, target)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def cache_lock(target: str | Path, *, log=None):
    """Hold an exclusive lock (fcntl) on a cache folder `target` while checking for it and making it: of
    several processes that need it at once (the ranks of a run on a cold cache), one makes it and the
    others wait, then find it made. `log` (when given) says so once when another process holds it.
    Where fcntl is missing (Windows), no lock: `new_dir`'s atomic rename still keeps each folder whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    target = Path(target)
    make_dir(target.parent)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for another process that is making {target}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_incomplete(tmp: Path, target: Path, complete: str, error: OSError) -> None:
    """`target` is a folder without its `complete` file (left by a process that was killed, or written by
    something else): a cache that would fail every later read. Move it aside and put `tmp` in its place."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.incomplete-", dir=target.parent))
    try:
        os.replace(target, aside / target.name)
    except FileNotFoundError:
        pass  # another process moved it first
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / complete).exists():  # another process put a complete one there: keep theirs
            raise WriteFailed(describe_os_error(error, target)) from None
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically replace `path` with `data` (never through a symlink; umask honoured)."""
    path = Path(path)
    refuse_symlink(path)
    refuse_symlink(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise WriteFailed(describe_os_error(e, path)) from None
    except BaseException:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


def check_output(path: str | Path, *, option: str, overwrite: bool = False, inputs=(), folders=()) -> Path:
    """Refuse now, before anything is loaded, an output file given as `option` (e.g. "-o") that would
    lose data; nothing is changed. Refused: a symbolic link or a folder; one of `inputs` (the files the
    command reads) or an existing file inside one of `folders` (the run or model folder it reads), even
    with `overwrite`; any other existing file without `overwrite`. Returns the path."""
    p = Path(path)
    refuse_symlink(p, f"given as {option}")
    if p.is_dir():
        raise OutputRefused(f"{option} {p} is a folder; give a file name, e.g. {p / 'out.jsonl'}.")
    real = p.resolve()
    for given in inputs:
        if given is not None and Path(given).resolve() == real:
            raise OutputRefused(
                f"{option} {p} is the input {given} of this command; nothing was changed, and --overwrite "
                "never replaces an input. Choose another file name for the output."
            )
    if p.exists():
        for folder in folders:
            if folder is not None and _inside(real, Path(folder).resolve()):
                raise OutputRefused(
                    f"{option} {p} is a file of {folder}, which this command reads; nothing was changed, "
                    "and --overwrite never replaces it. Choose a file name outside that folder."
                )
        if not overwrite:
            raise OutputRefused(
                f"{option} {p} already exists; nothing was changed. Pass --overwrite to replace it, or "
                "choose another file name."
            )
    return p


def write_output(path: str | Path, text: str, *, option: str, overwrite: bool = False) -> Path:
    """Write a user's output file atomically (a temporary file beside it, then a rename): a crash midway
    leaves the old file, or none. Without `overwrite` the file is made only if absent (a hard link of the
    temporary file: a file that appeared since `check_output` is never replaced)."""
    path = Path(path)
    if path.parent != Path(""):
        make_dir(path.parent)
    if overwrite:
        return write_text(path, text)
    refuse_symlink(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}.new"
    write_text(tmp, text)
    try:
        os.link(tmp, path)  # fails if `path` exists: no replace
    except FileExistsError:
        raise OutputRefused(
            f"{option} {path} appeared while this command ran; nothing was replaced. Pass --overwrite to "
            "replace it, or choose another file name."
        ) from None
    except OSError:  # a file system without hard links: the checked rename
        if path.exists():
            _unlink_quietly(tmp)
            raise OutputRefused(f"{option} {path} already exists; nothing was replaced.") from None
        os.replace(tmp, path)
    finally:
        _unlink_quietly(tmp)
    return path


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a `\\n` is added) in one write; never through a symlink. When the write fails
    the file is cut back to its previous length, so no torn line is left behind."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)  # less the umask, applied by the kernel
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_symlink(path)
        raise WriteFailed(describe_os_error(e, path)) from None
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise WriteFailed(describe_os_error(e, path)) from None
    finally:
        os.close(fd)


def apply_umask(folder: str | Path) -> None:
    """Give the files and folders under `folder` (written by libraries that make them 0600, such as
    safetensors) the umask's modes; symbolic links are left alone."""
    fmode, dmode = file_mode(), dir_mode()
    for root, dirs, names in os.walk(folder):
        for n in dirs:
            p = os.path.join(root, n)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for n in names:
            p = os.path.join(root, n)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def remove_stale(parent: str | Path, prefix: str, *, max_age_s: float = 24 * 3600) -> list[Path]:
    """Remove folders `prefix<pid>-*` in `parent` left by processes that no longer run (or, without a
    readable pid, older than `max_age_s`). Returns what was removed."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        pid_text = p.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit():
            stale = not pid_alive(int(pid_text))
        else:
            try:
                stale = now - p.stat().st_mtime > max_age_s
            except OSError:
                continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = [
    "WriteFailed",
    "OutputRefused",
    "check_output",
    "write_output",
    "write_bytes",
    "write_text",
    "append_line",
    "make_dir",
    "temp_dir",
    "new_dir",
    "refuse_symlink",
    "remove_stale",
    "pid_alive",
    "umask",
    "apply_umask",
    "is_write_error",
]
