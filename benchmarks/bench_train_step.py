"""Speed of one SANE pretraining step: two views through encoder, decoder and projection head,
the combined loss (NT-Xent + masked MSE), backward and an AdamW update.

Synthetic tokens of the preset's shapes (the values do not affect speed). Reference on an H100,
its own code with fp16 autocast (docs/sane-method.md, section 7): CNN preset (T=289, window 64,
batch 32, 4,096 tokens/step) 61.2 ms, 67k tokens/s, 5.0 GiB; ResNet-18 preset (T=288, window
256, batch 32, 16,384 tokens/step) 210 ms, 78k tokens/s, 32.8 GiB.

Counting: a step processes `2 * batch * window` tokens (both views; the reference counts the
same way). Model FLOPs = 6 * N * tokens with N the parameters outside the position tables
(lookups are not matmuls); attention-score matmuls are not counted. `--dtype bf16|fp16` runs
the forward pass under autocast with float32 weights and optimizer states, like the reference.
Peak memory is `torch.cuda.max_memory_allocated` on GPU and the process' peak RSS on CPU.

    python benchmarks/bench_train_step.py --preset tiny
    python benchmarks/bench_train_step.py --preset cnn --dtype bf16 [--compile]
    python benchmarks/bench_train_step.py --preset resnet18 --dtype bf16

Prints JSON and writes `benchmarks/results/bench_train_step_<preset>.json`.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers

from sane_hf import SaneConfig, SaneModel

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_BATCH_SIZE = {"tiny": 4, "cnn": 32, "resnet18": 32}
# Length of the synthetic token sequence windows are cut from: CNN-m and ResNet-18 (BN kept).
SEQUENCE_LENGTH = {"tiny": 93, "cnn": 93, "resnet18": 53_704}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synthetic_views(
    config: SaneConfig, batch_size: int, window: int, sequence_length: int, device: torch.device
) -> dict:
    """Two noisy views of `batch_size` random windows, with targets and padding of last chunks."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(batch_size, window, config.tokensize, generator=generator)
    value_mask = torch.ones_like(clean, dtype=torch.bool)
    value_mask[:, 1::2, config.tokensize // 2 :] = False  # every second token a padded last chunk
    clean = clean.masked_fill(~value_mask, 0.0)
    start = torch.randint(0, sequence_length - window + 1, (batch_size, 1), generator=generator)
    global_index = start + torch.arange(window)
    layer_index = (global_index * config.max_positions[1] // sequence_length).clamp_max(
        config.max_positions[1] - 1
    )
    row_index = global_index % min(64, config.max_positions[2])
    positions = torch.stack([global_index, layer_index, row_index], dim=-1)
    views = clean.repeat(2, 1, 1)
    noisy = views * (1 + 0.1 * torch.randn(views.shape, generator=generator))
    batch = {
        "tokens": noisy,
        "positions": positions.repeat(2, 1, 1),
        "target_tokens": views,
        "value_mask": value_mask.repeat(2, 1, 1),
    }
    return {name: tensor.to(device) for name, tensor in batch.items()} | {"num_views": 2}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(DEFAULT_BATCH_SIZE), default="tiny")
    parser.add_argument("--batch-size", type=int, help="windows per view (default: 32, tiny: 4)")
    parser.add_argument("--window", type=int, help="tokens per window (default: the preset's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--attn", default="sdpa", help="eager, sdpa or flash_attention_2")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = SaneConfig.from_preset(args.preset)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE[args.preset]
    window = args.window or config.windowsize
    torch.manual_seed(0)
    model = SaneModel(config).to(device).train()
    model.set_attn_implementation(args.attn)
    if args.activation_checkpointing:
        # transformers >= 5.23 name; older versions only have gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    num_parameters = model.num_parameters()
    matmul_parameters = num_parameters - sum(
        p.numel() for name, p in model.named_parameters() if ".position_embeddings." in name
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=3e-9, fused=device.type == "cuda"
    )
    step_model = torch.compile(model) if args.compile else model
    batch = synthetic_views(config, batch_size, window, SEQUENCE_LENGTH[args.preset], device)
    autocast = (
        torch.autocast(device.type, dtype=DTYPES[args.dtype])
        if args.dtype != "fp32"
        else nullcontext()
    )

    def train_step() -> float:
        with autocast:
            loss = step_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_ms, losses = [], []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        losses.append(train_step())
        synchronize(device)
        step_ms.append((time.perf_counter() - start) * 1e3)

    tokens_per_step = 2 * batch_size * window
    median_s = statistics.median(step_ms) / 1e3
    results = {
        "benchmark": "SANE train step (2 views, forward + loss + backward + AdamW)",
        "preset": args.preset,
        "device": device_name(device),
        "dtype": args.dtype if args.dtype == "fp32" else f"{args.dtype} autocast, fp32 weights",
        "attn_implementation": model.config._attn_implementation,
        "compile": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "fused_adamw": device.type == "cuda",
        "batch_size": batch_size,
        "window": window,
        "tokensize": config.tokensize,
        "tokens_per_step": tokens_per_step,
        "num_parameters": num_parameters,
        "matmul_parameters": matmul_parameters,
        "steps": args.steps,
        "step_ms_median": round(statistics.median(step_ms), 2),
        "step_ms_min": round(min(step_ms), 2),
        "step_ms_max": round(max(step_ms), 2),
        "tokens_per_s": round(tokens_per_step / median_s),
        "model_tflops_per_s": round(6 * matmul_parameters * tokens_per_step / median_s / 1e12, 4),
        "flops_counting": "6 * matmul_parameters * tokens_per_step per step (no attention scores)",
        "peak_memory_gib": round(peak_memory_gib(device), 3),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        # other processes competing for the CPU make CPU timings noisy: record how many there were
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(results, indent=2))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"bench_train_step_{args.preset}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
