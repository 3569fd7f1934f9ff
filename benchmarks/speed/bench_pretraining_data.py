"""Speed of the SANE pretraining data pipeline: one batch of windows in two augmented views.

A batch is what ``WindowSampler.train_batch`` builds every step: ``batch`` random windows of the
zoo's token sequences, each in two views with its own random function-preserving permutation
(a token-level gather), multiplicative noise (sigma 0.1) and, with ``--erase``, random erasing.
It is a few dozen batched tensor ops where the zoo lives. The zoo is synthetic: random tokens
with the real layout and permutation spec of the architecture (values do not affect speed).

Presets (the shapes of the reference configs, docs/sane-method.md section 7) and the reference
train step on an H100, which the pipeline must stay well below to never starve the GPU:

- ``tiny``: CNN-s (48 tokens of 289), window 16, batch 32: the CPU demo.
- ``cnn``: CNN-m (93 tokens of 289), window 64, batch 32; reference step 61.2 ms.
- ``resnet18``: ResNet-18 with BatchNorm (53,704 tokens of 288), window 256, batch 32;
  reference step 210 ms.

``--data-device cpu`` keeps the zoo in host memory and copies the windows through pinned memory
(the path for zoos larger than a quarter of the GPU). On CUDA, batches are timed with events
and no host synchronization between them, as in the training loop.

    python -m benchmarks.speed.bench_pretraining_data --preset resnet18
    python -m benchmarks.speed.bench_pretraining_data --preset resnet18 --data-device cpu

Prints JSON and writes ``benchmarks/results/bench_pretraining_data_<preset>[_<tag>].json``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    default_device,
    machine_info,
    summarize_ms,
    time_repeats,
    write_results,
)
from sane_hf import PermutationSpec, WeightTokenizer, build_model
from sane_hf.pretraining.augmentation import TokenPermutation, WindowSampler

PRESETS = {
    # architecture, its kwargs, token size, window
    "tiny": ("cnn_s", {"in_channels": 1}, 289, 16),
    "cnn": ("cnn_m", {}, 289, 64),
    "resnet18": ("resnet18", {"num_classes": 100}, 288, 256),
}
REFERENCE_STEP_MS = {"cnn": 61.2, "resnet18": 210.0}


def synthetic_zoo(preset: str, num_checkpoints: int, device: torch.device):
    """Random tokens ``[M, N, T]`` with the architecture's layout, and its token permutation."""
    architecture, kwargs, tokensize, _ = PRESETS[preset]
    model = build_model(architecture, **kwargs)
    layout = WeightTokenizer(tokensize).layout(model)
    permutation = TokenPermutation.from_spec(PermutationSpec.from_model(model), layout)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(num_checkpoints, *layout.mask().shape, generator=generator)
    tokens = tokens.masked_fill(~layout.mask(), 0.0).to(device)
    return tokens, layout, permutation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per batch")
    parser.add_argument("--checkpoints", type=int, default=16, help="checkpoints in the zoo")
    parser.add_argument("--erase", type=float, default=0.0, help="random erasing probability")
    parser.add_argument("--device", default=str(default_device()), help="where the model runs")
    parser.add_argument("--data-device", help="where the zoo lives (default: --device)")
    parser.add_argument("--batches", type=int, default=50, help="timed batches")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--tag", help="suffix of the result file name, to keep variants apart")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data_device = torch.device(args.data_device or args.device)
    tokens, layout, permutation = synthetic_zoo(args.preset, args.checkpoints, data_device)
    window = PRESETS[args.preset][3]
    sampler = WindowSampler(
        tokens,
        layout.row_counts(),
        layout.positions(),
        window_size=window,
        batch_size=args.batch_size,
        device=device,
        permutation=permutation,
        noise_sigma=0.1,
        erase_probability=args.erase,
    )
    batches = iter(range(10**9))
    for _ in range(3):  # warm up allocators and kernels
        sampler.train_batch(epoch=0, index=next(batches))
    batch_ms = time_repeats(
        lambda: sampler.train_batch(epoch=0, index=next(batches)), args.batches, device
    )

    median_s = summarize_ms(batch_ms)["median_ms"] / 1e3
    tokens_per_batch = 2 * args.batch_size * window
    table_bytes = (
        sum(
            t.numel() * t.element_size()
            for t in (permutation.base, permutation.slots, permutation.multipliers)
        )
        + permutation.entry_of_element.numel() * permutation.entry_of_element.element_size()
    )
    reference = REFERENCE_STEP_MS.get(args.preset)
    results = {
        "benchmark": "SANE pretraining batch (windows, 2 views: permutation + noise + erasing)",
        "preset": args.preset,
        "num_tokens": layout.num_tokens,
        "tokensize": layout.tokensize,
        "window": window,
        "batch_size": args.batch_size,
        "tokens_per_batch": tokens_per_batch,
        "checkpoints": args.checkpoints,
        "erase_probability": args.erase,
        "data_device": str(data_device),
        "permutation_groups": permutation.num_groups,
        "permutation_tables_mib": round(table_bytes / 2**20, 1),
        **{f"batch_{key}": value for key, value in summarize_ms(batch_ms).items()},
        "tokens_per_s": round(tokens_per_batch / median_s),
        "reference_step_ms": reference,
        "fraction_of_reference_step": round(median_s * 1e3 / reference, 4) if reference else None,
        **machine_info(device),
    }
    name = f"bench_pretraining_data_{args.preset}" + (f"_{args.tag}" if args.tag else "")
    write_results(name, results)


if __name__ == "__main__":
    main()
