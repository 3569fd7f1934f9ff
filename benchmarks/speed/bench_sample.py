"""Speed of sampling new networks end to end with ``SaneSampler.sample`` (paper Alg. 3).

``E`` prompt networks (randomly initialized: the cost does not depend on the weights) are
tokenized and normalized, encoded with halo windows, ``k`` latent sequences are drawn from the
KDE over the prompts' latents, decoded with halo windows, de-normalized, and loaded into ``k``
networks of the target architecture. Normalization statistics are those of the prompts. Target
(GPU): 100 ResNet-18 from 10 prompts with the ``resnet18`` preset in <= 10 s.

The stages are then timed one by one (prompt tokens, encode, draw, decode, build) to show where
the time goes. With ``--halo`` and ``--window`` the decoding windows can be set (default: the
model's training window, half content and a quarter of context on each side).

    python -m benchmarks.speed.bench_sample                                       # CPU: tiny, ResNet-18
    python -m benchmarks.speed.bench_sample --preset resnet18 --num-samples 100   # GPU

Prints JSON and writes ``benchmarks/results/bench_sample.json``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    DTYPES,
    default_device,
    machine_info,
    peak_memory,
    reset_peak_memory,
    timed_seconds,
    write_results,
)
from benchmarks.speed.bench_embed import ARCHITECTURES, sane_model
from sane_hf import SaneSampler, WeightTokenizer, build_model
from sane_hf.downstream.embedding import default_window_and_halo, halo_windows
from sane_hf.downstream.sampling import draw_latents
from sane_hf.weights.normalization import NormalizationStats


def prompt_networks(architecture: str, num_prompts: int) -> list[torch.nn.Module]:
    kwargs, _ = ARCHITECTURES[architecture]
    networks = []
    for seed in range(num_prompts):
        torch.manual_seed(seed)
        networks.append(build_model(architecture, **kwargs).eval())
    return networks


def stage_seconds(
    sampler: SaneSampler, prompts: list, num_samples: int, mode: str, device: torch.device
) -> dict[str, float]:
    """Seconds of each stage of ``sample``, run one after the other."""
    tokens, prompt_seconds = timed_seconds(lambda: sampler.prompt_tokens(prompts), device)
    latents, encode_seconds = timed_seconds(lambda: sampler.encode(tokens), device)
    generator = torch.Generator(device).manual_seed(1)
    draw, draw_seconds = timed_seconds(
        lambda: draw_latents(latents, num_samples, mode, generator=generator), device
    )
    decoded, decode_seconds = timed_seconds(lambda: sampler.decode(draw.latents), device)
    _, build_seconds = timed_seconds(lambda: sampler.build(decoded), device)
    return {
        "prompt_tokens": round(prompt_seconds, 3),
        "encode": round(encode_seconds, 3),
        "draw": round(draw_seconds, 3),
        "decode": round(decode_seconds, 3),
        "build": round(build_seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="SaneConfig preset (tiny, cnn, resnet18)")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="resnet18")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--mode", choices=("token", "joint", "shared"), default="shared")
    parser.add_argument("--window", type=int, help="content tokens per decoding window")
    parser.add_argument("--halo", type=int, help="context tokens on each side of a window")
    parser.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="model weights (default: bf16 on CUDA, else fp32)"
    )
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--tag", help="suffix of the result file name, to keep variants apart")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    _, tokensize = ARCHITECTURES[args.architecture]
    prompts = prompt_networks(args.architecture, args.num_prompts)
    tokenizer = WeightTokenizer(tokensize)
    target = tokenizer(prompts[0])
    keys = [spec.key for layer in target.layout.layers for spec in layer.parameters]
    normalization = NormalizationStats.from_state_dicts(
        (prompt.state_dict() for prompt in prompts), keys
    )
    model = sane_model(args.preset, tokensize, target.positions).to(device, DTYPES[dtype_name])
    default_window, default_halo = default_window_and_halo(model.config.windowsize)
    window, halo = args.window or default_window, args.halo or default_halo
    sampler = SaneSampler(
        model,
        prompts[0],
        normalization,
        tokenizer=tokenizer,
        window=window,
        halo=halo,
        batch_size=args.batch_size,
    )

    def sample():
        generator = torch.Generator(device).manual_seed(0)
        return sampler.sample(prompts, args.num_samples, mode=args.mode, generator=generator)

    # Warm up on a small draw (kernels, allocator), then time the whole pipeline and its stages.
    sampler.sample(prompts[:2], 2, mode=args.mode, generator=torch.Generator(device))
    reset_peak_memory(device)
    samples, seconds = timed_seconds(sample, device)
    if len(samples) != args.num_samples or not torch.isfinite(samples.tokens).all():
        raise RuntimeError("sampling did not give finite networks")
    stages = stage_seconds(sampler, prompts, args.num_samples, args.mode, device)

    num_tokens = target.layout.num_tokens
    decode_windows = len(halo_windows(num_tokens, window, halo)[0])
    results = {
        "benchmark": "SaneSampler.sample end to end (tokenize, encode, KDE, decode, build)",
        "preset": args.preset,
        "architecture": args.architecture,
        "tokens_per_model": num_tokens,
        "tokensize": tokensize,
        "num_prompts": args.num_prompts,
        "num_samples": args.num_samples,
        "mode": args.mode,
        "window": window,
        "halo": halo,
        "windows_per_model": decode_windows,
        "batch_size_windows": args.batch_size,
        "dtype": f"{dtype_name} weights",
        "seconds": round(seconds, 3),
        "models_per_s": round(args.num_samples / seconds, 2),
        "stage_seconds": stages,
        "target_seconds": 10.0 if args.architecture == "resnet18" else None,
        **peak_memory(device),
        **machine_info(device),
    }
    write_results("bench_sample" + (f"_{args.tag}" if args.tag else ""), results)


if __name__ == "__main__":
    main()
