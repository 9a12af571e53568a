#!/usr/bin/env bash
# A lent GPU's checks as ONE prepared command that fits one device call of at most 8 minutes on a bare
# H100 / H200 (Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, triton 3.6, no network):
#
#   benchmarks/gpu_check.sh            # (= quick) setup, kernels, loss, e2e, unsloth; 470 s in all
#   benchmarks/gpu_check.sh rest       # optional second command: the rest of the grid, also <= 470 s
#   benchmarks/gpu_check.sh --dry-run [quick|rest]   # print "PART<TAB>LIMIT<TAB>command", run nothing
#
# The device tool's call (README, benchmarks/README.md): command "benchmarks/gpu_check.sh",
# carry [".gpu-site.tar.gz"] (git-ignored, so it travels only when named), timeout_s 500.
# .gpu-site.tar.gz is packed here first by ../shared/gpu/build-site.sh .gpu-site.tar.gz.
#
# Parts, in order of value; each under its own `timeout`, capped by what is left of the budget; one that
# fails or times out does not stop the next; after each, benchmarks/_gpu_check.py rewrites
# $OUT/summary.json and $OUT/summary.md with every part so far (and copies the plots), so a stop keeps
# what finished. $OUT is the device tool's folder that comes back (default here:
# benchmarks/results/gpu-check-<date>); the full log is $OUT/gpu_check.log.
#   setup    unpack the archive into $FASTSFT_GPU_SITE (/tmp/site), pip install -e . (no deps, no index),
#            record the versions and the GPU
#   kernels  tests/kernels natively against float64, every dtype (the CUDA cases; -k "not cpu")
#   loss     the loss benchmark at V = 128256, N = 16384, H = 4096, bf16: fastsft (logits in and hidden in)
#            against the stock loss, torch's F.linear_cross_entropy, Liger, CCE and TRL's fused LM head
#            (its chunked log-prob kernel, what SFTTrainer's default nll loss runs since TRL 1.15)
#   e2e      Llama-3.2-1B's shape (random bf16 weights, built in seconds), QLoRA, 2048 tokens:
#            fastsft-transformers against stock transformers + TRL (tokens/s, peak memory)
#   fit      the Llama-3.2-1B shape QLoRA at three lengths on a GPU held to 24 GiB, fit = "auto": what fit
#            changed, the planned reserved peak beside torch.cuda.max_memory_reserved() (the table)
#   unsloth  the Unsloth seam natively with a 4-bit base (tests/test_unsloth_cpu.py's child, natively)
#
# FASTSFT_GPU_STANDIN=1 (CI, benchmarks/test_gpu_check.py): the same script without a GPU: setup for real
# (unpack, install into a throwaway prefix), each GPU part replaced by its own pytest command with
# --collect-only (its paths, markers and -k valid), the copy-out to $OUT for real.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PLAN=${1:-quick}
case $PLAN in quick | rest) ;; *)
  echo "gpu_check.sh: unknown plan '$PLAN' (quick, rest)" >&2
  exit 2
  ;;
esac
STANDIN=${FASTSFT_GPU_STANDIN:-0}
OUT=${OUT:-benchmarks/results/gpu-check-$(date +%Y-%m-%d)}
SITE=${FASTSFT_GPU_SITE:-/tmp/site}
ARCHIVE=${FASTSFT_GPU_ARCHIVE:-.gpu-site.tar.gz}
WORK=${FASTSFT_GPU_WORK:-/tmp/fastsft-gpu-check}
BUDGET=${FASTSFT_GPU_BUDGET:-470} # seconds for the whole command: one call of at most 8 minutes
PY=${FASTSFT_GPU_PYTHON:-python3}
LOG=$OUT/gpu_check.log
T0=$SECONDS
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)

# part NAME LIMIT CMD...: run CMD under `timeout` (LIMIT, or what is left of BUDGET), then collect
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  ((limit > left)) && limit=$left
  if [ "$DRY" = 1 ]; then
    printf '%s\t%s\t' "$name" "$limit"
    printf '%q ' "$@"
    echo
    return 0
  fi
  local rc=0 t=$SECONDS note=""
  rm -f "$WORK/$name.jsonl"
  if ((limit < 15)); then
    rc=124 note="not started: the budget ($BUDGET s) was spent"
  else
    echo "== $name (limit $limit s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  "$PY" benchmarks/_gpu_check.py collect --out "$OUT" --work "$WORK" --part "$name" --rc "$rc" \
    --seconds $((SECONDS - t)) --limit "$limit" --note "$note" 2>&1 | tee -a "$LOG"
  return 0 # the next part runs anyway: one failure must not cost the session's other figures
}

# gpu_part NAME LIMIT ENV... -- PYTEST_ARGS...: a pytest on the GPU, or its --collect-only (stand-in)
gpu_part() {
  local name=$1 limit=$2
  shift 2
  local envs=()
  while [ "$1" != "--" ]; do
    envs+=("$1")
    shift
  done
  shift
  local extra=(-p _gpu_report)
  [ "$STANDIN" = 1 ] && extra+=(--collect-only)
  part "$name" "$limit" env "${envs[@]}" "FASTSFT_GPU_REPORT=$WORK/$name.jsonl" "${PYTEST[@]}" "$@" "${extra[@]}"
}

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT" "$WORK/plugin"
  cp benchmarks/_gpu_report.py "$WORK/plugin/"
  echo "gpu_check.sh $PLAN: $(date -u +%FT%TZ), budget $BUDGET s, OUT=$OUT, stand-in=$STANDIN" | tee -a "$LOG"
fi
# The checkout after the archive: fastsft imports from it even if the editable install failed (an image
# setuptools older than pyproject's build requirement, say). _gpu_report.py (the per-test report plugin)
# from a folder of its own: benchmarks/ on the path would put its conftest and helpers beside the tests'
export PYTHONPATH=$SITE:$PWD:$WORK/plugin${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BENCH=(FASTSFT_BENCH_QUICK=1 "FASTSFT_BENCH_CACHE=$WORK/models")

if [ "$STANDIN" = 1 ]; then
  INSTALL=(--prefix "$WORK/prefix" .) # a throwaway prefix: this machine's environment stays as it is
else
  INSTALL=(-e .)
fi
part setup 50 bash -c "mkdir -p '$SITE' && tar -C '$SITE' -xzf '$ARCHIVE' && \
  $PY -m pip install -q --no-deps --no-build-isolation --no-index ${INSTALL[*]} && \
  $PY benchmarks/_gpu_check.py probe --work '$WORK' $([ "$STANDIN" = 1 ] && echo --stand-in)"

if [ "$PLAN" = quick ]; then
  gpu_part kernels 75 -- \
    tests/kernels/test_cross_entropy.py tests/kernels/test_linear_cross_entropy.py -k "not cpu"
  gpu_part loss 75 "${BENCH[@]}" "FASTSFT_BENCH_OUT=$WORK/loss" -- benchmarks/test_loss_bench.py -m loss \
    -k "fastsft-V or torch-V or fastsft-linear-V or torch-stock-linear or torch-linear-V or liger-linear or cce or trl-V"
  gpu_part e2e 130 "${BENCH[@]}" "FASTSFT_BENCH_OUT=$WORK/e2e" FASTSFT_BENCH_MODELS=llama-3.2-1b \
    FASTSFT_BENCH_SEQ=2048 FASTSFT_BENCH_ROWS=fastsft-transformers,transformers -- \
    benchmarks/test_training_bench.py -m "e2e and not slow"
  gpu_part fit 85 "${BENCH[@]}" "FASTSFT_BENCH_OUT=$WORK/fit" -- benchmarks/test_fit_gpu.py -m fit
  gpu_part unsloth 55 "FASTSFT_UNSLOTH_SITE=$SITE" -- tests/backends/test_unsloth_cpu.py
else
  gpu_part tests 100 -- tests/loss/test_route.py tests/run/test_mixed_precision.py
  gpu_part loss 120 "FASTSFT_BENCH_OUT=$WORK/loss" -- benchmarks/test_loss_bench.py -m loss \
    -k "N16384 and not V128256 and (fastsft or torch-V or torch-stock-linear or torch-linear-V or liger or cce or trl-V)"
  gpu_part e2e 200 "${BENCH[@]}" "FASTSFT_BENCH_OUT=$WORK/e2e" FASTSFT_BENCH_MODELS=llama-3.2-1b \
    FASTSFT_BENCH_SEQ=2048 FASTSFT_BENCH_ROWS=fastsft,unsloth,transformers -- \
    benchmarks/test_training_bench.py -m "e2e and not slow"
fi
if [ "$DRY" = 0 ]; then
  cat "$OUT/summary.md" # the tables, last: the device tool's reply carries the end of the output
  echo "gpu_check.sh $PLAN: done in $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
fi
