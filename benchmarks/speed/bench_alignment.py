"""Speed of permutation alignment on CPU: spec derivation, augmentation, weight matching.

Building an aligned zoo runs ``align`` once per checkpoint, and pretraining draws a random
permutation per sample, so both must be cheap. Measured on a CIFAR ResNet-18 (10 classes,
11.2M parameters, the largest zoo architecture) and, for batched augmentation, on CNN-s.

    python -m benchmarks.speed.bench_alignment [--repeats 5] [--align-repeats 3] [--threads N]

Prints JSON and writes it to ``benchmarks/results/bench_alignment.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sane_hf import PermutationSpec, align, build_model
from sane_hf.weights.alignment import apply_permutation, invert_permutation, random_permutation

RESULTS = Path(__file__).parents[1] / "results" / "bench_alignment.json"


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def perturbed_permuted_copy(reference, spec, generator, noise=0.01):
    """The reference with random hidden-unit order and 1% (of each tensor's std) weight noise."""
    perms = random_permutation(spec, generator)
    state = apply_permutation(reference.state_dict(), spec, perms)
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.numel() > 1 and key not in spec.buffers:
            state[key] = tensor + noise * tensor.std() * torch.randn(
                tensor.shape, generator=generator
            )
    return state, perms


def time_alignment(model, reference, spec, repeats: int) -> tuple[dict, object]:
    """Median and best wall time of ``align`` (the CPU is shared, so the minimum is reported too)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = align(model, reference, spec=spec)
        times.append(time.perf_counter() - start)
    return {
        "seconds_median": round(statistics.median(times), 3),
        "seconds_min": round(min(times), 3),
        "sweeps": result.num_sweeps,
        "converged": result.converged,
        "distance_before": round(result.distance_before, 4),
        "distance_after": round(result.distance_after, 4),
    }, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of the fast measurements")
    parser.add_argument("--align-repeats", type=int, default=3, help="runs of each alignment")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    torch.manual_seed(0)
    reference = build_model("resnet18", num_classes=10).eval()
    spec = PermutationSpec.from_model(reference)
    state = reference.state_dict()

    cnn = build_model("cnn_s", in_channels=1)
    cnn_spec = PermutationSpec.from_model(cnn)
    cnn_state = cnn.state_dict()

    perturbed, perms = perturbed_permuted_copy(reference, spec, generator)
    perturbed_stats, result = time_alignment(perturbed, reference, spec, args.align_repeats)
    inverse = invert_permutation(perms)
    perturbed_stats["groups_recovered"] = sum(
        torch.equal(result.permutations[g], inverse[g]) for g in spec.groups
    )
    torch.manual_seed(1)
    independent = build_model("resnet18", num_classes=10)
    independent_stats, _ = time_alignment(independent, reference, spec, args.align_repeats)

    report = {
        "benchmark": "alignment",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs sharing the CPU
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "resnet18": {
            "parameters": sum(t.numel() for t in state.values() if t.is_floating_point()),
            "groups": len(spec.groups),
            "spec_derivation_seconds": round(
                median_seconds(lambda: PermutationSpec.from_model(reference), args.repeats), 4
            ),
            "random_permutation_and_apply_seconds": round(
                median_seconds(
                    lambda: apply_permutation(state, spec, random_permutation(spec, generator)),
                    args.repeats,
                ),
                4,
            ),
            "align_perturbed_permuted_copy": perturbed_stats,
            "align_independent_init": independent_stats,
        },
        "cnn_s": {
            "batched_random_permutation_and_apply_32_seconds": round(
                median_seconds(
                    lambda: apply_permutation(
                        cnn_state, cnn_spec, random_permutation(cnn_spec, generator, num=32)
                    ),
                    args.repeats,
                ),
                5,
            ),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
