"""fastsft.limits: an out-of-memory error turned into the recipe keys worth turning, and the free-space
check a run and an export make before writing."""

import shutil
from collections import namedtuple

import pytest
import torch

from fastsft import limits
from fastsft.errors import ExportError, OutOfMemory, RunDirError


def test_out_of_memory_is_recognised_and_nothing_else():
    assert limits.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert limits.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not limits.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not limits.is_oom(ValueError("out of memory"))  # only torch's RuntimeErrors


def test_the_advice_names_the_phase_and_the_knobs_in_order():
    err = limits.explain_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"), "training")
    assert isinstance(err, OutOfMemory)
    text = str(err)
    assert text.startswith("out of memory during training (peak ")
    assert "Tried to allocate 2.00 GiB" in text and "more" not in text  # the first line of torch's message
    at = [text.index(k) for k in limits.OOM_KNOBS]
    assert at == sorted(at) and "1. train.per_device_train_batch_size" in text


Usage = namedtuple("Usage", "total used free")


def test_check_disk_refuses_too_little_space_with_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: Usage(10 * limits.GiB, 9 * limits.GiB, limits.GiB // 2)
    )
    limits.check_disk(tmp_path, limits.GiB // 4, "the checkpoint")  # fits: no error
    with pytest.raises(RunDirError) as e:
        limits.check_disk(tmp_path / "not" / "made" / "yet", 2 * limits.GiB, "the checkpoint")
    assert "the checkpoint needs about 2.00 GiB" in str(e.value) and "only 0.50 GiB is free" in str(e.value)
    assert "--output-dir" in str(e.value)
    with pytest.raises(ExportError, match="choose another --to"):
        limits.check_disk(tmp_path, 2 * limits.GiB, "the export", flag="--to", error=ExportError)
