"""Peak memory of ``sane-hf embed`` on a large folder of small networks, chunked vs all at once.

A folder of ``N`` CNN-s checkpoints (the released model's architecture, random weights: the
memory does not depend on their values) is embedded with ``checkpoints/sane-cnn-mnist`` in a
fresh process per run, and the peak resident memory of that process is read from the OS
(the child's own ``ru_maxrss`` when it ends). ``chunked`` is what ``sane-hf embed`` does (256 networks
read, prepared and encoded at a time); ``all_at_once`` passes one chunk as large as the folder,
which is how every network used to be held in memory together.

    python -m benchmarks.speed.bench_embed_memory --num-networks 5000 50000
    python -m benchmarks.speed.bench_embed_memory --num-networks 5000 --all-at-once-up-to 5000

Prints JSON and writes ``benchmarks/results/bench_embed_memory.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.common import machine_info, write_results
from sane_hf import build_model

RELEASED = Path(__file__).parents[2] / "checkpoints" / "sane-cnn-mnist"
# One fresh process per run, so that each peak is that run's alone.
RUN = """
import resource, sys
from sane_hf.downstream.pretrained import embed_networks
embeddings = embed_networks(sys.argv[1], [sys.argv[2]], output=sys.argv[3], chunk_size=int(sys.argv[4]))
print(len(embeddings.ids), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_networks(folder: Path, count: int) -> None:
    """``count`` CNN-s checkpoints (a few distinct ones, written again under other names)."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = []
    for seed in range(8):
        torch.manual_seed(seed)
        distinct.append(build_model("cnn_s", in_channels=1, num_classes=10).state_dict())
    for index in range(count):
        save_file(distinct[index % len(distinct)], folder / f"net_{index:06d}.safetensors")


def peak_rss_of_run(folder: Path, output: Path, chunk_size: int) -> dict[str, float]:
    """Peak RSS (MiB) and wall time of one embedding run in a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", RUN, str(RELEASED), str(folder), str(output), str(chunk_size)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    networks, peak_kib = result.stdout.split()[-2:]
    return {
        "peak_rss_mib": round(int(peak_kib) / 1024, 1),
        "seconds": round(seconds, 1),
        "networks": int(networks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-networks", type=int, nargs="+", default=[5000])
    parser.add_argument(
        "--all-at-once-up-to",
        type=int,
        default=5000,
        help="also measure all networks in one chunk for folders up to this size",
    )
    args = parser.parse_args()
    results = {"machine": machine_info(torch.device("cpu")), "runs": []}
    with tempfile.TemporaryDirectory() as work:
        for count in sorted(args.num_networks):
            folder = Path(work) / f"nets_{count}"
            write_networks(folder, count)
            run = peak_rss_of_run(folder, Path(work) / "e.parquet", 256)
            results["runs"].append({"num_networks": count, "mode": "chunked", **run})
        for count in sorted(n for n in args.num_networks if n <= args.all_at_once_up_to):
            folder = Path(work) / f"nets_{count}"
            run = peak_rss_of_run(folder, Path(work) / "e.parquet", count)
            results["runs"].append({"num_networks": count, "mode": "all_at_once", **run})
    write_results("bench_embed_memory", results)


if __name__ == "__main__":
    main()
