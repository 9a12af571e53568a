"""What every pytest run of this repository shares, tests/ and benchmarks/ alike (pytest reads this file
before the conftest.py of either folder):

- OMP_WAIT_POLICY=PASSIVE (OpenMP's waiting threads sleep instead of spinning), set before torch loads:
  on a busy machine (CI beside other work) spinning threads made the tiny runs several times slower. Not
  the `fastsft` command's own policy (fastsft.threads: a short spin, and its loops follow the cores
  free), which covers the loops of a run and generation but not a test's own forward passes and kernel
  calls; PASSIVE covers every operation the suite runs, at some cost on an idle machine. A user's
  OMP_WAIT_POLICY wins; the thread tests and the busy-CPU benchmark build their children's environment
  themselves.
- TRITON_INTERPRET=1 when there is no GPU, set before anything imports triton, so the Triton kernels run
  (slowly, exactly) on the CPU; on a GPU machine the same code runs natively.
- `_private_cache`: built-in models and tokenized-data caches go to a folder of this session (unless
  FASTSFT_CACHE is set), never to the user's ~/.cache.
- Under pytest-xdist (the README's `pytest -n 2 --dist loadscope tests`), the modules holding a `slow` test
  are sent out first (`pytest_collection_modifyitems`).
"""

import os

if not any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported (OpenMP reads it once, at load)

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Built-in models and tokenized-data caches go to a folder of this test session."""
    if "FASTSFT_CACHE" not in os.environ:
        os.environ["FASTSFT_CACHE"] = str(tmp_path_factory.mktemp("fastsft-cache"))
    yield


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's workers, the modules that hold a `slow` test first, the rest after, each group in
    collection order: with `--dist loadscope` a module runs whole on one worker, and a long one handed out
    last (Unsloth's interpreter child: minutes) would run alone while the other worker sits idle."""
    if not hasattr(config, "workerinput"):
        return
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)
