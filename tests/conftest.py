"""Shared fixtures: tiny offline models, the demo data (the private cache, `_private_cache`, is the
repository's conftest.py, shared with benchmarks/).

TRITON_INTERPRET=1 is set before anything imports triton when there is no GPU, so the Triton
kernels run (slowly, exactly) on the CPU; on a GPU machine the same tests run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(scope="session")
def tiny_model_dir(_private_cache):
    from fastsft.backends import builtin

    return builtin.materialize("builtin:tiny-mistral")


@pytest.fixture()
def tok(tiny_model_dir):
    """A fresh copy of the tiny model's tokenizer (tests change its template and tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
