"""Speed of embedding whole networks with halo windows, windows batched across models.

``N`` checkpoints of one architecture are tokenized (randomly initialized networks: the cost does
not depend on the weights), moved to the device and encoded the way ``sane_hf.embed`` encodes a
zoo split: every halo window of every model is cut with one gather, windows of all models are
encoded ``--batch-size`` at a time, content latents are scattered back and pooled per model
(mean and per-layer means). Target (GPU): 100 ResNet-18 checkpoints (53,704 tokens each) with
the ``resnet18`` preset, the GPU kept busy.

Reported: models/s (encoding and pooling, tokens already on the device, and including the
host-to-device copy of the tokens), tokens encoded per second (halo context included), the
encoder's model TFLOP/s (2 * matmul parameters * tokens encoded) and peak memory; beside it the
**encoder-only FLOP floor**: the encoder's FLOPs per network (its matmuls and the attention
scores over the halo windows) at this device's matmul rate measured in the same run (the
encoder's widest product, ``[batch * window, d_model] x [d_model, 4 d_model]``, in the
benchmark's dtype), as networks/s: what embedding would reach if it did nothing but matmuls.
``--preset`` also takes a model folder (its ``config.json``: e.g. ``checkpoints/sane-cnn-mnist``;
weights random, the speed does not depend on them).

    python -m benchmarks.speed.bench_embed                                   # CPU: tiny, 4 ResNet-18
    python -m benchmarks.speed.bench_embed --preset checkpoints/sane-cnn-mnist --architecture cnn_s \
        --num-models 256 --threads 1 --tag cnn_s
    python -m benchmarks.speed.bench_embed --preset resnet18 --num-models 100  # GPU

Prints JSON and writes ``benchmarks/results/bench_embed.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    DTYPES,
    default_device,
    machine_info,
    peak_memory,
    reset_peak_memory,
    synchronize,
    timed_seconds,
    write_results,
)
from sane_hf import SaneConfig, SaneModel, WeightTokenizer, build_model
from sane_hf.downstream.embedding import (
    default_window_and_halo,
    encode_tokens,
    halo_windows,
    pool_latents,
)

# Architectures and their token size; ResNet-18 as in the paper's zoos (100 classes, BN kept).
ARCHITECTURES = {
    "cnn_s": ({"in_channels": 1}, 289),
    "cnn_m": ({}, 289),
    "resnet18": ({"num_classes": 100}, 288),
}


def network_tokens(
    architecture: str, num_models: int, distinct: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[num_models, N, T]`` of randomly initialized networks (``distinct`` different
    ones, repeated) scaled to unit variance, and their positions ``[N, 3]``."""
    kwargs, tokensize = ARCHITECTURES[architecture]
    tokenizer = WeightTokenizer(tokensize)
    encoded = []
    for seed in range(min(distinct, num_models)):
        torch.manual_seed(seed)
        encoded.append(tokenizer(build_model(architecture, **kwargs)))
    tokens = torch.stack([encoded[i % len(encoded)].tokens for i in range(num_models)])
    return tokens / tokens.std(), encoded[0].positions


def sane_model(preset: str, tokensize: int, positions: torch.Tensor) -> SaneModel:
    """A SANE model of ``preset`` for this token size, with position tables large enough."""
    folder = Path(preset).is_dir()
    defaults = SaneConfig.from_pretrained(preset) if folder else SaneConfig.from_preset(preset)
    needed = (positions.amax(dim=0) + 1).tolist()
    max_positions = [max(a, b) for a, b in zip(defaults.max_positions, needed)]
    torch.manual_seed(0)
    if folder:
        defaults.tokensize, defaults.max_positions = tokensize, tuple(max_positions)
        return SaneModel(defaults).eval()
    return SaneModel(
        SaneConfig.from_preset(preset, tokensize=tokensize, max_positions=max_positions)
    ).eval()


def matmul_rate(rows: int, width: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the encoder's widest product ``[rows, width] x [width, 4 width]`` (best of 10)."""
    a = torch.randn(rows, width, dtype=dtype, device=device)
    b = torch.randn(width, 4 * width, dtype=dtype, device=device)
    times = []
    for _ in range(12):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * rows * width * 4 * width / min(times[2:])


def embed_models(
    model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-layer embeddings of every model (what ``embed`` does per zoo chunk)."""
    latents = encode_tokens(model, tokens, positions, batch_size=batch_size)
    return pool_latents(latents, positions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="SaneConfig preset (tiny, cnn, resnet18)")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="resnet18")
    parser.add_argument("--num-models", type=int, default=4)
    parser.add_argument("--distinct", type=int, default=8, help="different networks tokenized")
    parser.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="model weights (default: bf16 on CUDA, else fp32)"
    )
    parser.add_argument("--compile", action="store_true", help="compile the encoder blocks")
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--tag", help="suffix of the result file name, to keep variants apart")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    host_tokens, positions = network_tokens(args.architecture, args.num_models, args.distinct)
    num_tokens, tokensize = host_tokens.shape[1:]
    if device.type == "cuda":
        host_tokens = host_tokens.pin_memory()
    model = sane_model(args.preset, tokensize, positions).to(device, DTYPES[dtype_name])
    if args.compile:
        for layer in model.encoder.layers:
            layer.compile()

    window, halo = default_window_and_halo(model.config.windowsize)
    windows_per_model = len(halo_windows(num_tokens, window, halo)[0])
    window_length = min(num_tokens, window + 2 * halo)
    tokens_encoded = args.num_models * windows_per_model * window_length

    # Warm up (kernels, autotuning, compilation) on two models, then time all of them.
    embed_models(model, host_tokens[:2].to(device), positions, args.batch_size)
    reset_peak_memory(device)
    tokens, copy_seconds = timed_seconds(lambda: host_tokens.to(device, non_blocking=True), device)
    (means, _), seconds = timed_seconds(
        lambda: embed_models(model, tokens, positions, args.batch_size), device
    )
    if not torch.isfinite(means).all():
        raise RuntimeError("embeddings are not finite")

    # the encoder owns no position tables (lookups are not matmuls): all its weights count
    encoder_matmul_parameters = sum(p.numel() for p in model.encoder.parameters())
    config = model.config
    # attention scores: Q @ K.T and P @ V, 2 * window_length * d_model FLOPs per token each
    attention_flops = 4 * window_length * config.d_model * config.n_layers * tokens_encoded
    encoder_flops = 2 * encoder_matmul_parameters * tokens_encoded + attention_flops
    rate = matmul_rate(
        min(args.batch_size, 64) * window_length, config.d_model, DTYPES[dtype_name], device
    )
    floor_seconds = encoder_flops / rate
    results = {
        "benchmark": "embedding whole networks with halo windows, batched across models",
        "preset": args.preset,
        "architecture": args.architecture,
        "num_models": args.num_models,
        "tokens_per_model": num_tokens,
        "tokensize": tokensize,
        "window": window,
        "halo": halo,
        "windows_per_model": windows_per_model,
        "halo_overhead": round(tokens_encoded / (args.num_models * num_tokens), 3),
        "batch_size_windows": args.batch_size,
        "dtype": f"{dtype_name} weights",
        "compile": args.compile,
        "encode_seconds": round(seconds, 3),
        "copy_to_device_seconds": round(copy_seconds, 3),
        "models_per_s": round(args.num_models / seconds, 2),
        "models_per_s_with_copy": round(args.num_models / (seconds + copy_seconds), 2),
        "tokens_encoded_per_s": round(tokens_encoded / seconds),
        "encoder_model_tflops_per_s": round(
            2 * encoder_matmul_parameters * tokens_encoded / seconds / 1e12, 4
        ),
        "flops_counting": "2 * encoder matmul parameters * tokens encoded (halo included)",
        "encoder_gflop_per_model": round(encoder_flops / args.num_models / 1e9, 3),
        "matmul_gflop_per_s": round(rate / 1e9, 1),
        "floor_models_per_s": round(args.num_models / floor_seconds, 2),
        "fraction_of_floor": round(floor_seconds / seconds, 3),
        "floor_counting": "encoder matmuls + attention scores at the measured rate of "
        "[64 windows x window length, d_model] x [d_model, 4 d_model] in the model's dtype",
        "forward_passes": math.ceil(args.num_models * windows_per_model / args.batch_size),
        **peak_memory(device),
        **machine_info(device),
    }
    write_results("bench_embed" + (f"_{args.tag}" if args.tag else ""), results)


if __name__ == "__main__":
    main()
