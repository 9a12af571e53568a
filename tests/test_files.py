"""fastsft.files: the one way fastsft writes (atomic, never through a symlink, the umask honoured)."""

import errno
import os

import pytest

from fastsft import files


@pytest.fixture()
def umask():
    """Set the process umask for a test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def test_a_write_never_goes_through_a_symlink(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    inside = tmp_path / "run"
    inside.mkdir()
    (inside / "loss.png").symlink_to(outside)
    with pytest.raises(files.WriteFailed, match="symbolic link"):
        files.write_bytes(inside / "loss.png", b"PNG")
    with pytest.raises(files.WriteFailed, match="symbolic link"):
        files.append_line(inside / "loss.png", "{}")
    assert outside.read_text() == "precious"
    (inside / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(files.WriteFailed, match="symbolic link"):
        files.write_text(inside / "dangling", "x")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_files_and_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    f = files.write_text(tmp_path / "a.json", "{}")
    files.append_line(tmp_path / "m.jsonl", "{}")
    d = files.temp_dir(tmp_path, ".x.tmp-")
    made = files.make_dir(tmp_path / "b" / "c")
    lib = d / "weights.safetensors"  # as safetensors writes it
    lib.write_bytes(b"w")
    os.chmod(lib, 0o600)
    files.apply_umask(d)
    assert f.stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "m.jsonl").stat().st_mode & 0o777 == 0o666 & ~mask
    assert d.stat().st_mode & 0o777 == 0o777 & ~mask
    assert made.stat().st_mode & 0o777 == 0o777 & ~mask
    assert lib.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_append_leaves_no_torn_line(tmp_path, monkeypatch):
    p = tmp_path / "metrics.jsonl"
    files.append_line(p, '{"step": 1}')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "write", half_then_full)
    with pytest.raises(files.WriteFailed, match="the disk is full"):
        files.append_line(p, '{"step": 2, "loss": 1.5}')
    monkeypatch.undo()
    assert p.read_text() == '{"step": 1}\n'


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = files.write_text(tmp_path / "run.json", '{"status": "running"}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(files.WriteFailed, match="the disk is full"):
        files.write_text(p, '{"status": "finished"}')
    monkeypatch.undo()
    assert p.read_text() == '{"status": "running"}'
    assert [q.name for q in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{dead_pid}-abc"
    live = tmp_path / f".out.tmp-{os.getpid()}-def"
    other = tmp_path / f".other.tmp-{dead_pid}-ghi"
    for d in (stale, live, other):
        d.mkdir()
    removed = files.remove_stale(tmp_path, ".out.tmp-")
    assert removed == [stale] and live.exists() and other.exists()


def test_a_cache_folder_without_its_complete_file_is_replaced(tmp_path):
    """A built-in model's folder that holds only tokenizer files (seen once after two ranks made it at the
    same time on a fresh machine) failed every later run with "Unrecognized model"; it is now replaced by
    the complete one, and a complete folder made by another process is kept."""
    target = tmp_path / "tiny-mistral-v3"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    with files.new_dir(target, complete="config.json") as tmp:
        (tmp / "config.json").write_text('{"model_type": "mistral"}')
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-mistral-v3"]  # nothing left aside
    with files.new_dir(target, complete="config.json") as tmp:  # theirs is complete: kept
        (tmp / "config.json").write_text('{"model_type": "other"}')
    assert "mistral" in (target / "config.json").read_text()


BUILD_ONE = """
import sys
from fastsft.backends import builtin
made = []
train = builtin._train_tokenizer
builtin._train_tokenizer = lambda: made.append(1) or train()
folder = builtin.materialize("builtin:tiny-mistral")
assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
print("made" if made else "found", flush=True)
"""


@pytest.mark.slow  # three processes build a model
def test_ranks_on_a_cold_cache_make_a_builtin_model_once(tmp_path):
    """Three processes (the ranks of a run) ask for the same built-in model on an empty cache at once: one
    makes it, the others wait for it and find it whole (each made its own before, and one rank was seen
    reading the folder while it was absent)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTSFT_CACHE=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD_ONE], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    said = sorted(p.communicate(timeout=300)[0].strip() for p in procs)
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert said == ["found", "found", "made"]
    assert not list((tmp_path / "cache" / "builtin").glob(".*tmp-*"))  # no temporary folder left


def test_an_output_file_appearing_meanwhile_is_never_replaced(tmp_path):
    """write_output without overwrite makes the file only if it is still absent (the check before the work
    and the write after it are minutes apart); the temporary file is gone either way."""
    out = tmp_path / "answers.jsonl"
    files.check_output(out, option="-o")  # absent: fine
    out.write_text("written meanwhile")
    with pytest.raises(files.OutputRefused, match="appeared while this command ran"):
        files.write_output(out, "answers\n", option="-o")
    assert out.read_text() == "written meanwhile" and [p.name for p in tmp_path.iterdir()] == [out.name]
    files.write_output(out, "answers\n", option="-o", overwrite=True)
    assert out.read_text() == "answers\n"


def test_an_output_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    out.write_text("old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(files.WriteFailed, match="the disk is full"):
        files.write_output(out, "new" * 1000, option="--json-out", overwrite=True)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [out.name]
