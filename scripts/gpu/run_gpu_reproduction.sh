#!/usr/bin/env bash
# The GPU-scale MNIST reproduction (issue 7) with the H100 zoo benchmark (issue 3), in runs of
# about 10 minutes that resume each other:
#
#   OUT=/some/folder bash scripts/gpu/run_gpu_reproduction.sh   # rerun until "reproduction finished"
#
# (packages the GPU image may lack: see scripts/gpu/gpu_env.sh). Every run continues from what
# the previous ones left in outputs/reproduce/mnist-gpu/ (the zoo, the dataset, SANE checkpoints).
# The first call trains the 1,000-model CNN-s zoo with `bench_zoo.py --preset h100` (so the zoo
# is timed: BENCHMARKS.md's H100 number, benchmarks/results/bench_zoo_h100.json) into
# outputs/reproduce/mnist-gpu/zoo, then `reproduce_mnist.py --scale gpu` builds the dataset and
# pretrains SANE (a checkpoint every 1,500 steps) until BUDGET_S (default 560 s) runs out. Later
# calls resume pretraining, then probe (Table 1) and sample (Table 3). Every call packs the
# results so far into $OUT/reproduce_mnist_gpu.tgz (unpack it in the repository root).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu/gpu_env.sh || exit 1

budget=${BUDGET_S:-560}
work=outputs/reproduce/mnist-gpu
export TQDM_MININTERVAL=30
if [[ ! -e $work/zoo ]]; then
    timeout $((budget - SECONDS)) python -m benchmarks.speed.bench_zoo --preset h100 \
        --baseline-models 1 --zoo-dir "$work/zoo" --output benchmarks/results/bench_zoo_h100.json
fi
left=$((budget - SECONDS))
if ((left > 30)); then
    timeout "$left" python -m benchmarks.reproduce.mnist --scale gpu &&
        echo "reproduction finished"
fi
if [[ -n "${OUT:-}" ]]; then
    files=(benchmarks/results/bench_zoo_h100.json benchmarks/results/reproduce_mnist_gpu*
        "$work"/stage_times.json "$work"/*.json "$work"/sane/*.json "$work"/sane/*.yaml)
    tar czf "$OUT/reproduce_mnist_gpu.tgz" --ignore-failed-read "${files[@]}" 2>/dev/null
fi
