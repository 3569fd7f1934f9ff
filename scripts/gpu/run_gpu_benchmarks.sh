#!/usr/bin/env bash
# Every GPU benchmark of sane-hf in one command, within about 10 minutes on an H100:
#
#   OUT=/some/folder bash scripts/gpu/run_gpu_benchmarks.sh   # from anywhere
#   bash scripts/gpu/run_gpu_benchmarks.sh --dry-run           # every step on the CPU, seconds
#
# Benchmarks run in priority order, each in its own process with its own time limit, within
# BUDGET_S (default 540 s); the steps, the dry run and the result files: benchmarks/gpu_run.py.
# Results land in benchmarks/results/*.json, the status of every benchmark in
# benchmarks/results/gpu_run.json, the log in $OUT/benchmarks.log and this run's result files
# in $OUT/gpu_results.tgz (/tmp without $OUT): unpack it in a checkout's repository root.
# Packages the GPU image may lack: scripts/gpu/gpu_env.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
if [[ " $* " == *" --dry-run "* ]]; then
    export PATH="$PWD/scripts/gpu/dry_run:$PATH"  # a stand-in nvidia-smi
fi
source scripts/gpu/gpu_env.sh || exit 1
python3 -m benchmarks.gpu_run benchmarks "$@"
