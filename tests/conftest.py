"""Shared fixtures: tiny offline models, a private cache, the demo data.

TRITON_INTERPRET=1 is set before anything imports triton when there is no GPU, so the Triton
kernels run (slowly, exactly) on the CPU; on a GPU machine the same tests run natively.
"""

import os
import sys
from pathlib import Path

# The repository root must not be on sys.path (`python -m pytest` puts the current directory there):
# its `kernels/` folder (installed as `fastsft.kernels`) would shadow the `kernels` package that
# transformers and bitsandbytes probe for.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
if getattr(sys.modules.get("kernels"), "__file__", "") and str(_ROOT) in sys.modules["kernels"].__file__:
    del sys.modules["kernels"]

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Built-in models and tokenized-data caches go to a folder of this test session."""
    if "FASTSFT_CACHE" not in os.environ:
        os.environ["FASTSFT_CACHE"] = str(tmp_path_factory.mktemp("fastsft-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(_private_cache):
    from fastsft.backends import builtin

    return builtin.materialize("builtin:tiny-mistral")


@pytest.fixture()
def tok(tiny_model_dir):
    """A fresh copy of the tiny model's tokenizer (tests change its template and tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
