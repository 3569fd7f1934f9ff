"""Speed of WeightTokenizer on one ResNet-18 checkpoint (100 classes, BatchNorm kept, T=288).

That is the reference's largest case: 53,704 tokens of 288 values. Reference on a 2-core CPU:
tokenize 257 ms, decode 19 ms. Targets: tokenize <= 25 ms, decode <= 10 ms.

Each case is warmed up, then timed ``--repeats`` times; the median is reported, with the load
average around the run (the CPU is shared: on 2 cores with other jobs running, every parallel
region of torch waits for its second thread to be scheduled). "tokenize" includes the mask and
positions. Prints JSON and writes it to ``benchmarks/results/bench_tokenizer.json``.

    python benchmarks/bench_tokenizer.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sane_hf import WeightTokenizer
from sane_hf.architectures import build_model

RESULTS = Path(__file__).parent / "results" / "bench_tokenizer.json"


def median_ms(function, repeats: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": round(statistics.median(times), 2),
        "min_ms": round(min(times), 2),
        "max_ms": round(max(times), 2),
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

    load_before = os.getloadavg()[0]
    results = {
        "benchmark": "WeightTokenizer, ResNet-18 (100 classes, BN kept), T=288",
        "num_tokens": len(encoded),
        "tokensize": encoded.layout.tokensize,
        "num_parameters": sum(v.numel() for v in state_dict.values() if v.is_floating_point()),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "tokenize_module": median_ms(lambda: tokenizer(model), args.repeats),
        "tokenize_state_dict": median_ms(lambda: tokenizer(state_dict), args.repeats),
        "decode": median_ms(lambda: tokenizer.decode(encoded.tokens, encoded.layout), args.repeats),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "reference_ms": {"tokenize": 257, "decode": 19},
        "target_ms": {"tokenize": 25, "decode": 10},
    }
    print(json.dumps(results, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
