"""Speed of building, saving and reading a zoo dataset on CPU.

Writes a synthetic raw zoo of CNN-s models (random weights drifting per epoch: the cost of
building does not depend on the weights being trained), then times ``build_zoo_dataset`` with
and without alignment, ``save_zoo_dataset``, ``load_zoo_dataset`` (memory-mapped) and reading
rows as torch tensors.

    python -m benchmarks.speed.bench_zoo_dataset [--models 200] [--epochs 5] [--num-proc 2]

``--num-proc N`` also times the aligned build with N worker processes (one thread each) and
checks that it saves the serial build's dataset (same fingerprint).

Prints JSON and writes it to ``benchmarks/results/bench_zoo_dataset.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_synthetic_raw_zoo
from sane_hf import build_zoo_dataset, load_zoo_dataset, save_zoo_dataset

RESULTS = Path(__file__).parents[1] / "results" / "bench_zoo_dataset.json"


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--num-proc", type=int, help="also time a parallel build")
    args = parser.parse_args()
    load_before = os.getloadavg()
    num_checkpoints = args.models * args.epochs

    with tempfile.TemporaryDirectory() as work_dir:
        raw = Path(work_dir) / "raw"
        write_synthetic_raw_zoo(raw, args.models, args.epochs, activation="tanh")
        _, unaligned_seconds = timed(lambda: build_zoo_dataset(raw, align=False, progress=False))
        dataset, aligned_seconds = timed(lambda: build_zoo_dataset(raw, progress=False))
        _, save_seconds = timed(lambda: save_zoo_dataset(dataset, Path(work_dir) / "saved"))
        zoo, load_seconds = timed(lambda: load_zoo_dataset(Path(work_dir) / "saved"))
        parallel = {}
        if args.num_proc:
            built, seconds = timed(
                lambda: build_zoo_dataset(raw, progress=False, num_proc=args.num_proc)
            )
            save_zoo_dataset(built, Path(work_dir) / "parallel")
            fingerprint = load_zoo_dataset(Path(work_dir) / "parallel").metadata.fingerprint
            parallel = {
                "num_proc": args.num_proc,
                "align_seconds": round(seconds, 3),
                "speedup_vs_serial_align": round(aligned_seconds / seconds, 2),
                "same_fingerprint_as_serial": fingerprint == zoo.metadata.fingerprint,
            }
        train = zoo.splits["train"].with_format("torch")
        rows = range(0, len(train), max(1, len(train) // 200))
        _, read_seconds = timed(lambda: [train[i]["tokens"] for i in rows])
        num_tokens = zoo.metadata.layout.num_tokens

    results = {
        "benchmark": "zoo_dataset",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "load_average_before": load_before,
                    "load_average": os.getloadavg()},
        "zoo": {"architecture": "cnn_s", "models": args.models, "epochs": args.epochs,
                "checkpoints": num_checkpoints, "tokens_per_checkpoint": num_tokens,
                "tokensize": 289},
        "build_seconds": {"no_align": round(unaligned_seconds, 3),
                          "align": round(aligned_seconds, 3)},
        "checkpoints_per_second": {"no_align": round(num_checkpoints / unaligned_seconds, 1),
                                   "align": round(num_checkpoints / aligned_seconds, 1)},
        "parallel_build": parallel or None,
        "save_seconds": round(save_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "row_read_ms": round(1000 * read_seconds / len(rows), 3),
    }  # fmt: skip
    text = json.dumps(results, indent=2)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
