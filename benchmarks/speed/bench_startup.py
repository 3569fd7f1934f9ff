"""Start-up time of the `sane-hf` command: help texts, and a prediction on 8 small networks
against the import of transformers' ``PreTrainedModel`` alone.

Why: a new user's first commands are ``sane-hf --help`` and ``sane-hf predict <model>
<networks>``; both used to spend seconds importing what they did not need (torch for the help
text; datasets, sklearn and pyarrow for a prediction). Targets: every help text under 0.5 s, and
the prediction within 0.6 s of ``python -c "from transformers import PreTrainedModel"`` (which
any transformers model pays, and ours builds on).

Each command runs as a fresh ``python`` process (``sys.executable -m sane_hf``, what the
``sane-hf`` script runs, without the shims a Python version manager may put in front of it),
``OMP_NUM_THREADS=1``. The commands take turns within each round, so that a change of the shared
machine's speed reaches all alike; the prediction's overhead over the import is taken round by
round (``predict_minus_import_s``; also in the processes' CPU time, ``..._cpu_s``, which
other jobs on a shared machine move least). A bare ``python -c pass`` gives the interpreter's own
start. The 8 networks are randomly initialized CNN-s (the zoo architecture of
``checkpoints/sane-cnn-mnist``) written as ``.safetensors`` into a temporary folder.

    python -m benchmarks.speed.bench_startup --rounds 5

Prints JSON and writes ``benchmarks/results/bench_startup.json``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.common import machine_info, write_results
from sane_hf import build_model

MODEL = Path(__file__).parents[2] / "checkpoints" / "sane-cnn-mnist"
HELP_COMMANDS = ["zoo", "pretrain", "probe", "embed", "predict", "sample", "demo", "push"]


def write_networks(folder: Path, count: int) -> None:
    """``count`` randomly initialized CNN-s (MNIST shape) as ``net<i>.safetensors``."""
    for index in range(count):
        torch.manual_seed(index)
        network = build_model("cnn_s", in_channels=1, num_classes=10)
        save_file(network.state_dict(), folder / f"net{index}.safetensors")


def run_seconds(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one run of ``command``; a failing command is an
    error, not a time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="turns of every command")
    parser.add_argument("--networks", type=int, default=8, help="networks to predict")
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    python, sane_hf = [sys.executable], [sys.executable, "-m", "sane_hf"]
    with tempfile.TemporaryDirectory() as tmp:
        networks = Path(tmp)
        write_networks(networks, args.networks)
        commands = {
            "python -c pass": [*python, "-c", "pass"],
            "import PreTrainedModel": [*python, "-c", "from transformers import PreTrainedModel"],
            "predict": [*sane_hf, "predict", str(MODEL), str(networks)],
            "--help": [*sane_hf, "--help"],
            **{f"{name} --help": [*sane_hf, name, "--help"] for name in HELP_COMMANDS},
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu_times: dict[str, list[float]] = {name: [] for name in commands}
        names = list(commands)
        run_seconds(commands["predict"], env)  # warm the file cache once, untimed
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                wall, cpu = run_seconds(commands[name], env)
                times[name].append(wall)
                cpu_times[name].append(cpu)

    overheads = [p - i for p, i in zip(times["predict"], times["import PreTrainedModel"])]
    cpu_overheads = [
        p - i for p, i in zip(cpu_times["predict"], cpu_times["import PreTrainedModel"])
    ]
    help_names = ["--help", *(f"{name} --help" for name in HELP_COMMANDS)]
    results = {
        "benchmark": "sane-hf start-up: help texts, and predict on 8 CNN-s against importing "
        "transformers' PreTrainedModel, round by round in fresh processes",
        "rounds": args.rounds,
        "networks": args.networks,
        "median_s": {name: round(statistics.median(t), 3) for name, t in times.items()},
        "min_s": {name: round(min(t), 3) for name, t in times.items()},
        "slowest_help_median_s": max(round(statistics.median(times[n]), 3) for n in help_names),
        "predict_minus_import_s": [round(x, 3) for x in overheads],
        "predict_minus_import_median_s": round(statistics.median(overheads), 3),
        # CPU time of the processes: what other jobs on a shared machine move least
        "cpu_median_s": {name: round(statistics.median(t), 3) for name, t in cpu_times.items()},
        "predict_minus_import_cpu_s": [round(x, 3) for x in cpu_overheads],
        "predict_minus_import_cpu_median_s": round(statistics.median(cpu_overheads), 3),
        "targets": {"help_s": 0.5, "predict_minus_import_s": 0.6},
        **machine_info(torch.device("cpu")),
    }
    write_results("bench_startup", results)


if __name__ == "__main__":
    main()
