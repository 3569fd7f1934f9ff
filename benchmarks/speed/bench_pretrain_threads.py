"""Pretraining steps/s on one core against two: `sane-hf pretrain` with 1 and 2 OpenMP threads,
and with OpenMP's two wait policies.

Why: a CPU user runs ``sane-hf pretrain`` and wants the machine's cores used where that is
faster. Each setting runs the real command (``python -m sane_hf pretrain --config <preset>``) on
one synthetic CNN-s zoo (randomly initialized networks drifting per epoch: the speed does not
depend on the weights) for ``--steps`` steps (``--stop-at-step``: no final save, no probe
heads), and its steps/s is the median of the loop's own logging intervals after the first
(warm-up excluded). The settings take turns round by round, so that a change of the shared
machine's speed reaches all alike. The loss after the last step is reported beside it: the same
run with 1 or 2 threads differs only in the rounding of parallel reductions.

Settings: ``OMP_NUM_THREADS`` 1 or 2 with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep; what
the CLI sets unless the user chose), and 2 threads with OpenMP's default policy (libgomp, torch's OpenMP: an idle thread
spins 300,000 times before it sleeps, which makes small parallel regions cheap while nothing
else wants the core; set as ``ACTIVE`` with ``GOMP_SPINCOUNT=300000``, since the CLI turns an
unset policy into ``PASSIVE``).

    python -m benchmarks.speed.bench_pretrain_threads --presets tiny cpu --steps 120 --rounds 2

Prints JSON and writes ``benchmarks/results/bench_pretrain_threads.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import machine_info, write_results, write_synthetic_raw_zoo
from sane_hf import build_zoo_dataset, save_zoo_dataset
from sane_hf.pretraining.loop import read_metrics

SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    "2 threads": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    # libgomp's (torch's OpenMP) default without OMP_WAIT_POLICY, which the CLI would set
    "2 threads, default wait policy": {
        "OMP_NUM_THREADS": "2",
        "OMP_WAIT_POLICY": "ACTIVE",
        "GOMP_SPINCOUNT": "300000",
    },
}


def synthetic_zoo(work_dir: Path, models: int) -> Path:
    """A CNN-s zoo dataset (MNIST shape, 5 checkpoints per model, T=289) in ``work_dir``."""
    write_synthetic_raw_zoo(work_dir / "raw", models, 5, "cnn_s", {"in_channels": 1})
    dataset = build_zoo_dataset(work_dir / "raw", tokensize=289, align=False, progress=False)
    save_zoo_dataset(dataset, work_dir / "zoo")
    return work_dir / "zoo"


def run_pretraining(preset: str, zoo: Path, output: Path, steps: int, env: dict) -> dict:
    """Steps/s (median of the logging intervals after the first) and the last logged loss."""
    command = [sys.executable, "-m", "sane_hf", "pretrain", "--config", preset]
    command += ["--dataset", str(zoo), "--output-dir", str(output)]
    command += ["--max-steps", str(2 * steps), "--stop-at-step", str(steps)]
    command += ["--logging-steps", "10", "--report-to", "none", "--checkpointing-steps", "null"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    intervals = [line for line in read_metrics(output) if "steps_per_second" in line]
    if len(intervals) < 2:
        raise ValueError(f"{preset}: fewer than two logging intervals in {steps} steps")
    return {
        "steps_per_second": statistics.median(line["steps_per_second"] for line in intervals[1:]),
        "last_loss": intervals[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "cpu"])
    parser.add_argument("--steps", type=int, default=120, help="steps per run (10 per interval)")
    parser.add_argument("--rounds", type=int, default=2, help="turns of every setting")
    parser.add_argument("--models", type=int, default=20, help="models of the synthetic zoo")
    args = parser.parse_args()

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        zoo = synthetic_zoo(Path(tmp), args.models)
        for preset in args.presets:
            runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
            names = list(SETTINGS)
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    env = {**os.environ, **SETTINGS[name]}
                    output = Path(tmp) / f"{preset}-{round_index}-{name.replace(' ', '_')}"
                    runs[name].append(run_pretraining(preset, zoo, output, args.steps, env))
            one = statistics.median(r["steps_per_second"] for r in runs["1 thread"])
            results[preset] = {
                name: {
                    "steps_per_second": round(statistics.median(speeds), 2),
                    "per_round": [round(s, 2) for s in speeds],
                    "vs_1_thread": round(statistics.median(speeds) / one, 3),
                    "last_loss": [round(r["last_loss"], 5) for r in runs[name]],
                }
                for name in SETTINGS
                for speeds in [[r["steps_per_second"] for r in runs[name]]]
            }
    write_results(
        "bench_pretrain_threads",
        {
            "benchmark": "sane-hf pretrain steps/s with 1 and 2 OpenMP threads (synthetic CNN-s "
            "zoo), settings in turns round by round",
            "steps": args.steps,
            "rounds": args.rounds,
            "presets": results,
            **machine_info(torch.device("cpu")),
        },
    )


if __name__ == "__main__":
    main()
