#!/usr/bin/env bash
# The first lent GPU session's checks, in three commands of under 9 minutes each (each pytest is run
# under `timeout 530`; what finished is kept):
#
#   benchmarks/gpu_check.sh tests            # unpack ../shared/gpu/build-site.sh's archive
#                                            # ($FASTSFT_GPU_ARCHIVE, default .gpu-site.tar.gz) into
#                                            # /tmp/site ($FASTSFT_GPU_SITE), install fastsft, then the
#                                            # GPU tests: the kernels natively against float64, the loss
#                                            # routes, the Unsloth seam natively (4 architectures, every
#                                            # loss kernel, launch counts, fp16, checkpointing, 4-bit)
#   benchmarks/gpu_check.sh loss             # the quick loss benchmark (V = 128256, N = 16384)
#   benchmarks/gpu_check.sh e2e              # the quick end-to-end rows (Mistral-7B QLoRA, 2048 tokens)
#   benchmarks/gpu_check.sh --dry-run [STEP...]   # print the commands, run nothing (CI checks them:
#                                                 # benchmarks/test_gpu_check.py)
#
# Logs go to benchmarks/results/gpu-check-<date>/<step>.log; the benchmarks write their tables, JSON and
# plots to benchmarks/results/<date>-<device>/ themselves. Commit both.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests loss e2e)
SITE=${FASTSFT_GPU_SITE:-/tmp/site}
archive=${FASTSFT_GPU_ARCHIVE:-.gpu-site.tar.gz}
LOGS=benchmarks/results/gpu-check-$(date +%Y-%m-%d)
LIMIT=530  # seconds per pytest: each command stays under 9 minutes with start-up and set-up

# run STEP CMD...: print it (dry run: "STEP<TAB>shell-quoted command"), or run it with its output in the log
run() {
  local step=$1
  shift
  if [ "$DRY" = 1 ]; then
    printf '%s\t' "$step"
    printf '%q ' "$@"
    echo
    return 0
  fi
  mkdir -p "$LOGS"
  echo "== $step: $*" | tee -a "$LOGS/$step.log"
  local rc=0
  "$@" 2>&1 | tee -a "$LOGS/$step.log" || rc=${PIPESTATUS[0]}
  echo "== $step: exit $rc" | tee -a "$LOGS/$step.log"
  return 0  # the next command runs anyway: one failure must not cost the session's other figures
}

for step in "${steps[@]}"; do
  case $step in
    tests)
      run setup mkdir -p "$SITE"
      run setup tar -C "$SITE" -xzf "$archive"
      run setup env PYTHONPATH="$SITE" python3 -m pip install -q --no-deps --no-build-isolation -e .
      run setup env PYTHONPATH="$SITE" python3 -c "import torch, triton, unsloth, fastsft.kernels; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0), 'triton', triton.__version__, 'unsloth', unsloth.__version__)"
      run tests env PYTHONPATH="$SITE" FASTSFT_UNSLOTH_SITE="$SITE" timeout "$LIMIT" \
        python3 -m pytest -q -rs -p no:cacheprovider tests/kernels tests/run/test_loss.py tests/run/test_mixed_precision.py tests/backends/test_unsloth_cpu.py
      ;;
    loss)
      run loss env PYTHONPATH="$SITE" FASTSFT_BENCH_QUICK=1 timeout "$LIMIT" \
        python3 -m pytest -q -rs -p no:cacheprovider benchmarks -m loss
      ;;
    e2e)
      run e2e env PYTHONPATH="$SITE" FASTSFT_BENCH_QUICK=1 timeout "$LIMIT" \
        python3 -m pytest -q -rs -p no:cacheprovider benchmarks -m "e2e and not slow"
      ;;
    *)
      echo "gpu_check.sh: unknown step '$step' (steps: tests, loss, e2e)" >&2
      exit 2
      ;;
  esac
done
