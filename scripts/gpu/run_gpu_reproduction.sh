#!/usr/bin/env bash
# The GPU-scale MNIST reproduction with the H100 zoo benchmark, in runs of about 10 minutes
# that resume each other:
#
#   OUT=/some/folder bash scripts/gpu/run_gpu_reproduction.sh  # rerun until "reproduction finished"
#   bash scripts/gpu/run_gpu_reproduction.sh --dry-run          # every step on the CPU, toy size
#
# Every run continues from what the previous ones left in outputs/reproduce/mnist-gpu/ (the zoo,
# the dataset, SANE checkpoints). The first call trains the 1,000-model CNN-s zoo with
# `bench_zoo.py --preset h100` (so the zoo is timed: benchmarks/results/bench_zoo_h100.json),
# then `benchmarks.reproduce.mnist --scale gpu` builds the dataset and pretrains SANE until
# BUDGET_S (default 560 s) runs out; later calls resume pretraining, then probe (Table 1) and
# sample (Table 3). Every call packs the results so far into $OUT/reproduce_mnist_gpu.tgz
# (unpack it in the repository root). The steps: benchmarks/gpu_run.py. Packages the GPU image
# may lack: scripts/gpu/gpu_env.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
if [[ " $* " == *" --dry-run "* ]]; then
    export PATH="$PWD/scripts/gpu/dry_run:$PATH"  # a stand-in nvidia-smi
fi
source scripts/gpu/gpu_env.sh || exit 1
python3 -m benchmarks.gpu_run reproduction "$@"
