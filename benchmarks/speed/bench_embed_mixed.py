"""Embedding a folder of networks of several architectures with the released universal SANE.

A folder of ``--num-networks`` ``.safetensors`` files is written, cycling through the seven
architectures of the multi-architecture suite (the six pretrained ones and the held-out deeper
MLP; PyTorch-default initialization, as a user's untrained networks are: the cost does not
depend on the values), then ``sane-hf embed MODEL FOLDER --output embeddings.parquet`` runs as
a user runs it, and its wall time is measured (start-up, reading, tokenizing, encoding, writing).
Target: 100 networks in under 30 s on a 2-core CPU.

    python -m benchmarks.speed.bench_embed_mixed --model checkpoints/sane-multi-cpu

Prints JSON and writes ``benchmarks/results/bench_embed_mixed.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from benchmarks.common import machine_info, write_results
from sane_hf import build_model

ARCHITECTURES = [
    ("mlp", {"in_features": 64, "hidden": [32]}),
    ("mlp", {"in_features": 196, "hidden": [24, 24]}),
    ("cnn_s", {}),
    ("cnn_wide", {}),
    ("mlp", {"in_features": 40, "hidden": [64]}),
    ("resnet_small", {}),
    ("mlp", {"in_features": 64, "hidden": [48, 24]}),
]


def write_networks(folder: Path, count: int) -> None:
    for index in range(count):
        name, kwargs = ARCHITECTURES[index % len(ARCHITECTURES)]
        torch.manual_seed(index)
        state_dict = build_model(name, **kwargs).state_dict()
        save_file(
            {k: v.contiguous() for k, v in state_dict.items()},
            folder / f"net_{index:03d}.safetensors",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/sane-multi-cpu")
    parser.add_argument("--num-networks", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, output = Path(tmp) / "networks", Path(tmp) / "embeddings.parquet"
        folder.mkdir()
        write_networks(folder, args.num_networks)
        command = [sys.executable, "-m", "sane_hf", "embed", args.model, str(folder),
                   "--output", str(output)]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=environment)
        seconds = time.perf_counter() - started
        rows = pq.read_table(output).num_rows
    result = {
        "benchmark": "bench_embed_mixed",
        "model": args.model,
        "networks": args.num_networks,
        "architectures": len(ARCHITECTURES),
        "rows_written": rows,
        "cli_wall_seconds": round(seconds, 2),
        "target_seconds": 30,
        "met": seconds < 30 and rows == args.num_networks,
        "machine": machine_info(torch.device("cpu")),
    }
    write_results("bench_embed_mixed", result)


if __name__ == "__main__":
    main()
