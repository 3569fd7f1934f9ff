"""Speed of WeightTokenizer on one ResNet-18 checkpoint (100 classes, BatchNorm kept, T=288).

That is the reference's largest case: 53,704 tokens of 288 values. Reference on a 2-core CPU:
tokenize 257 ms, decode 19 ms. Targets: tokenize <= 25 ms, decode <= 10 ms. "tokenize" includes
the mask and positions.

The cases run interleaved, ``--repeats`` rounds after a warm-up, and the median is reported with
the load average around the run: the 2 cores are shared, and when other jobs keep them busy every
parallel region of torch waits for its second thread to be scheduled. So everything is measured
twice, with torch's default threads and with ``torch.set_num_threads(1)``, next to a plain
concatenate-and-pad tokenizer (``concat_and_pad``, the usual way to write it) timed in the same
rounds, which calibrates the numbers against the load. Prints JSON and writes it to
``benchmarks/results/bench_tokenizer.json``.

    python -m benchmarks.speed.bench_tokenizer [--repeats 30]
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
import torch.nn.functional as F

from sane_hf import WeightTokenizer
from sane_hf.weights.layout import WeightLayout
from sane_hf.zoo.architectures import build_model

RESULTS = Path(__file__).parents[1] / "results" / "bench_tokenizer.json"


def concat_and_pad(state_dict: dict[str, torch.Tensor], layout: WeightLayout) -> tuple:
    """Baseline: per layer, concatenate the rows, pad them to whole tokens, then concatenate all
    layers; the mask the same way. Same tokens as WeightTokenizer (ResNet-18 has only "rows"
    transforms), built with temporary tensors instead of slice copies into one buffer."""
    tokens, masks = [], []
    for layer in layout.layers:
        rows = torch.cat([state_dict[p.key].reshape(layer.rows, -1) for p in layer.parameters], 1)
        padding = layer.tokens_per_row * layout.tokensize - layer.row_length
        tokens.append(F.pad(rows, (0, padding)).reshape(-1, layout.tokensize))
        masks.append(F.pad(torch.ones_like(rows, dtype=torch.bool), (0, padding)))
    tokens = torch.cat(tokens)
    if not torch.isfinite(tokens).all():
        raise ValueError("NaN or Inf in the weights")
    return tokens, torch.cat([m.reshape(-1, layout.tokensize) for m in masks]), layout.positions()


def time_interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Wall-clock median/min/max milliseconds per case, and the median CPU time of the calling
    thread (all the work when torch runs one thread: what the case costs on an idle core).
    Rounds alternate the cases so that load hits all of them alike."""
    for function in cases.values():
        for _ in range(warmup):
            function()
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, function in cases.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            function()
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.thread_time() - start_cpu) * 1e3)
    return {
        name: {
            "median_ms": round(statistics.median(wall[name]), 2),
            "min_ms": round(min(wall[name]), 2),
            "max_ms": round(max(wall[name]), 2),
            "thread_cpu_median_ms": round(statistics.median(cpu[name]), 2),
        }
        for name in cases
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=100).eval()
    state_dict = model.state_dict()
    tokenizer = WeightTokenizer(tokensize=288)
    encoded = tokenizer(model)
    assert len(encoded) == 53_704, len(encoded)
    baseline_tokens, baseline_mask, _ = concat_and_pad(state_dict, encoded.layout)
    assert torch.equal(baseline_tokens, encoded.tokens) and torch.equal(baseline_mask, encoded.mask)
    cases = {
        "concat_and_pad_baseline": lambda: concat_and_pad(state_dict, encoded.layout),
        "tokenize_module": lambda: tokenizer(model),
        "tokenize_state_dict": lambda: tokenizer(state_dict),
        "decode": lambda: tokenizer.decode(encoded.tokens, encoded.layout),
    }

    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    with_default_threads = time_interleaved(cases, args.repeats)
    torch.set_num_threads(1)
    with_one_thread = time_interleaved(cases, args.repeats)
    torch.set_num_threads(default_threads)

    results = {
        "benchmark": "WeightTokenizer, ResNet-18 (100 classes, BN kept), T=288",
        "num_tokens": len(encoded),
        "tokensize": encoded.layout.tokensize,
        "num_parameters": sum(v.numel() for v in state_dict.values() if v.is_floating_point()),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "default_threads": default_threads,
        **with_default_threads,
        "one_thread": with_one_thread,
        "reference_ms": {"tokenize": 257, "decode": 19},
        "target_ms": {"tokenize": 25, "decode": 10},
    }
    print(json.dumps(results, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
