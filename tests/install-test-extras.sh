#!/usr/bin/env bash
# What the tests need beyond `pip install -e '.[dev]'`, each in its own folder so that it never
# changes the core environment the rest of the suite runs in. Run by the README's test command
# (and so by CI); safe to run again (each step skips what is already there).
set -euo pipefail
cd "$(dirname "$0")/.."

# TRL 1.15, the newest unsloth accepts: test_trl_versions.py runs a child `fastsft run` with it first
# on the path (the core resolves to TRL 1.16).
[ -d .cache/trl-1.15/trl ] || pip install -q --no-deps --target .cache/trl-1.15 trl==1.15.0
