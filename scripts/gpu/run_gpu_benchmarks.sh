#!/usr/bin/env bash
# Every GPU benchmark of sane-hf in one command, within about 10 minutes on an H100.
#
#   OUT=/some/folder bash scripts/gpu/run_gpu_benchmarks.sh   # from the repository root
#
# (packages the GPU image may lack: see scripts/gpu/gpu_env.sh). To bring the results to another
# checkout, unpack $OUT/gpu_results.tgz in its repository root.
#
# Benchmarks run in priority order, each in its own process with its own time limit; one that
# fails or runs out of time is recorded and the next one runs. BUDGET_S (default 540 s) bounds
# the whole run: a benchmark is skipped when less time is left than it needs. Results land in
# benchmarks/results/*.json, the status of every benchmark in benchmarks/results/gpu_run.json,
# the full log in $OUT/gpu_benchmarks.log (/tmp without $OUT), and a tarball of this run's
# result files in $OUT/gpu_results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."

source scripts/gpu/gpu_env.sh || exit 1

budget=${BUDGET_S:-540}
log=${OUT:-/tmp}/gpu_benchmarks.log
mkdir -p benchmarks/results
: >"$log"
start_marker=$(mktemp)
statuses=()
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"

# bench NAME LIMIT_S NEEDS_S SCRIPT ARGS...: run one benchmark unless less than NEEDS_S is left.
bench() {
    local name=$1 limit=$2 needs=$3 script=$4
    shift 4
    local left=$((budget - SECONDS)) status
    if ((left < needs)); then
        status=skipped
    else
        ((limit > left)) && limit=$left
        echo "=== $name (limit ${limit}s, ${left}s left)" | tee -a "$log"
        local began=$SECONDS
        timeout "$limit" python3 -m "benchmarks.speed.${script%.py}" "$@" >>"$log" 2>&1
        case $? in
            0) status=ok ;;
            124) status=timeout ;;
            *) status=failed ;;
        esac
        status="$status after $((SECONDS - began))s"
    fi
    echo "--- $name: $status" | tee -a "$log"
    statuses+=("\"$name\": \"$status\"")
}

# Train step (targets: cnn <= 20 ms and 5.0 GiB, resnet18 <= 150 ms and 32.8 GiB).
bench step_cnn_eager 60 20 bench_train_step.py --preset cnn --tag eager
bench step_cnn_compile_graph 150 60 bench_train_step.py --preset cnn --compile model \
    --cuda-graph --tag compile_graph
bench step_resnet18_compile 150 60 bench_train_step.py --preset resnet18 --compile model \
    --tag compile
# Sampling 100 ResNet-18 from 10 prompts (target <= 10 s) and embedding 100 ResNet-18.
bench sample_resnet18 150 50 bench_sample.py --preset resnet18 --architecture resnet18 \
    --num-prompts 10 --num-samples 100
bench embed_resnet18 120 45 bench_embed.py --preset resnet18 --architecture resnet18 \
    --num-models 100
# End to end: pretraining epochs vs the pure step (target: within 10%).
bench epoch_cnn 150 60 bench_pretrain_epoch.py --preset cnn --architecture cnn_m \
    --models 240 --checkpoint-epochs 10 --epochs 2 --mixed-precision bf16 --compile
bench step_resnet18_eager 90 30 bench_train_step.py --preset resnet18 --tag eager
bench epoch_resnet18 150 70 bench_pretrain_epoch.py --preset resnet18 \
    --architecture resnet18 --models 7 --checkpoint-epochs 3 --epochs 2 --mixed-precision bf16
# The data pipeline alone, as time allows: zoo on the GPU, and in host memory (pinned copies).
bench data_cnn 60 20 bench_pretraining_data.py --preset cnn
bench data_resnet18_host 90 40 bench_pretraining_data.py --preset resnet18 --data-device cpu \
    --tag host
# Variants, as time allows.
bench step_cnn_compile 120 40 bench_train_step.py --preset cnn --compile model --tag compile
bench sample_resnet18_short_halo 120 40 bench_sample.py --preset resnet18 \
    --architecture resnet18 --num-prompts 10 --num-samples 100 --window 224 --halo 16

summary=benchmarks/results/gpu_run.json
{
    echo "{\"seconds\": $SECONDS, \"budget_s\": $budget,"
    echo " \"device\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\","
    (IFS=,; echo " \"benchmarks\": {${statuses[*]}}}")
} >"$summary"
cat "$summary"
if [[ -n "${OUT:-}" ]]; then
    find benchmarks/results -name '*.json' -newer "$start_marker" -print0 |
        tar czf "$OUT/gpu_results.tgz" --null -T -
fi
