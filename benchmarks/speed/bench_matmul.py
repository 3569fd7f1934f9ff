"""This CPU's matmul rate at the shapes of a SANE training step, and the step's matmul floor.

Why: "how far is the step from the hardware" needs the rate this machine reaches on the step's
own products, not a datasheet peak. Every ``nn.Linear`` of the model is found with a forward
hook (rows, in and out features), and each gives three products per step: the forward
``X @ W.T``, and the backward ``dY @ W`` (where its input needs a gradient) and ``dY.T @ X``. The attention scores add two batched
products forward (``Q @ K.T``, ``P @ V``) and four backward, per block. Each product is timed
alone (CPU time of the fastest repeat, one thread), in fp32 and bf16 (attention: in float32 in both,
as `SaneAttention` runs it under CPU autocast), and summed: the **matmul floor** of one step,
what the step would take if it did nothing but its matmuls at this CPU's rates.

    OMP_NUM_THREADS=1 python -m benchmarks.speed.bench_matmul                 # benchmark shape
    OMP_NUM_THREADS=1 python -m benchmarks.speed.bench_matmul --preset cpu    # pretraining preset

Prints JSON (GFLOP/s per product and dtype, the floor per dtype) and writes
``benchmarks/results/bench_matmul[_<preset>].json``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch import nn

from benchmarks.common import machine_info, write_results
from benchmarks.speed.bench_train_step import DEFAULT_BATCH_SIZE, bench_config
from sane_hf import SaneConfig, SaneModel
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.utils.config import load_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_shape(preset: str | None) -> tuple[SaneConfig, int]:
    """The SANE config and windows per view of ``preset`` (a pretraining preset), or of the
    fixed benchmark shape when None."""
    if preset is None:
        return bench_config("cpu"), DEFAULT_BATCH_SIZE["cpu"]
    pretraining = load_config(PretrainingConfig, preset)
    return pretraining.model_config(), pretraining.batch_size


def step_products(config: SaneConfig, batch_size: int) -> Counter:
    """``{(kind, batch, m, k, n): count}`` of every matmul of one training step (two views)."""
    model = SaneModel(config)
    shapes: Counter = Counter()

    def record(module: nn.Linear, inputs: tuple[torch.Tensor, ...], _output) -> None:
        rows = inputs[0].numel() // module.in_features
        m, k, n = rows, module.in_features, module.out_features
        shapes[("linear", 1, m, k, n)] += 1  # X @ W.T
        if inputs[0].requires_grad:  # the encoder's input tokens need no gradient
            shapes[("linear", 1, m, n, k)] += 1  # dX = dY @ W
        shapes[("linear", 1, n, m, k)] += 1  # dW = dY.T @ X

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    windows, window = 2 * batch_size, config.windowsize
    tokens = torch.randn(windows, window, config.tokensize)
    positions = torch.zeros(windows, window, 3, dtype=torch.long)
    model(tokens, positions)
    for hook in hooks:
        hook.remove()
    heads, head_dim = config.n_heads, config.d_model // config.n_heads
    blocks = 2 * config.n_layers
    batch = windows * heads
    # forward: Q @ K.T [W, hd] x [hd, W], P @ V [W, W] x [W, hd]; backward: two of each form
    shapes[("attention", batch, window, head_dim, window)] += 3 * blocks
    shapes[("attention", batch, window, window, head_dim)] += 3 * blocks
    return shapes


def product_seconds(kind: str, batch: int, m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """Seconds of one ``[batch, m, k] @ [batch, k, n]`` product (2-D when batch is 1)."""
    lead = () if batch == 1 else (batch,)
    a, b = torch.randn(*lead, m, k, dtype=dtype), torch.randn(*lead, k, n, dtype=dtype)
    flops = 2 * batch * m * k * n
    repeats = max(5, min(200, int(2e9 / flops)))
    for _ in range(2):
        torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        torch.matmul(a, b)
        times.append(time.thread_time() - start)
    # the thread's CPU time of the fastest repeat: the rate this CPU reaches (on a shared
    # machine wall time also counts the time other jobs hold the core, mostly in large products)
    return min(times)


def matmul_floor(config: SaneConfig, batch_size: int) -> dict:
    """Per dtype: the step's matmul FLOPs, the time of all its products at the measured rates,
    and the rate of every product."""
    products = step_products(config, batch_size)
    result = {}
    for name, dtype in DTYPES.items():
        total_seconds = total_flops = 0.0
        rates = []
        for (kind, batch, m, k, n), count in sorted(products.items()):
            # attention runs in float32 under CPU autocast (SaneAttention)
            seconds = product_seconds(
                kind, batch, m, k, n, torch.float32 if kind == "attention" else dtype
            )
            flops = 2 * batch * m * k * n
            total_seconds += count * seconds
            total_flops += count * flops
            rates.append(
                {
                    "product": f"{kind} {'' if batch == 1 else f'{batch}x'}[{m},{k}]x[{k},{n}]",
                    "count": count,
                    "gflop_per_s": round(flops / seconds / 1e9, 1),
                }
            )
        result[name] = {
            "matmul_gflop_per_step": round(total_flops / 1e9, 2),
            "matmul_floor_ms": round(total_seconds * 1e3, 1),
            "mean_gflop_per_s": round(total_flops / total_seconds / 1e9, 1),
            "products": rates,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="a pretraining preset's shape (default: benchmark shape)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # thread CPU time is the product's time only with one thread
    config, batch_size = step_shape(args.preset)
    results = {
        "benchmark": "matmul rate at the shapes of one SANE training step, and its matmul floor",
        "preset": args.preset or "benchmark shape",
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "window": config.windowsize,
        "batch_size": batch_size,
        **matmul_floor(config, batch_size),
        **machine_info(torch.device("cpu")),
    }
    write_results("bench_matmul" + (f"_{args.preset}" if args.preset else ""), results)


if __name__ == "__main__":
    main()
