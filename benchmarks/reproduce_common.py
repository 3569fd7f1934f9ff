"""What the ``reproduce_*.py`` scripts share: the ``--scale`` switch, work folders, result files.

Every script runs the stages of `sane_hf.recipes.experiments` (resumable: rerun the same command to
continue) in ``outputs/reproduce/<experiment>-<scale>/`` and writes its numbers to
``benchmarks/results/reproduce_<experiment>_<scale>.json`` and its plots beside it, with the
command, the scale, the machine, the load average and the wall time of every stage (the
development CPU is shared, so its timings carry how busy it was).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sane_hf
from sane_hf.utils.config import load_values

RESULTS_DIR = Path(__file__).parent / "results"
WORK_ROOT = Path(__file__).parent.parent / "outputs" / "reproduce"


# The pretraining recipes are presets (sane_hf/presets/pretraining); the scripts take their
# values as plain dicts (``{**CPU_PRETRAINING, "num_epochs": 150}``) and add run plumbing.
# GPU scale for CNN-s zoos: the `cnn` preset (the reference's recipe, sane-method.md Sec. 3:
# AdamW 1e-4, wd 3e-9, OneCycle, 50 epochs, bf16).
GPU_PRETRAINING: dict[str, Any] = {
    **load_values("cnn", "pretraining"),
    "checkpointing_steps": 2000,
    "checkpoints_total_limit": 1,
    "report_to": "none",
}
# CPU scale for CNN-s zoos: the `cnn-s-cpu` preset (tiny widened to d_model 64 and 4+4 blocks,
# the paper's latent size 128, a 48-token window: a whole CNN-s network).
CPU_PRETRAINING: dict[str, Any] = load_values("cnn-s-cpu", "pretraining")


def parse_args(description: str, scales: Sequence[str] = ("cpu", "gpu")) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--scale",
        choices=scales,
        default="cpu",
        help="cpu: what a 2-core CPU does in minutes; gpu: the issue's full scale (one H100)"
        + (
            "; smoke: every stage at toy size, to check a machine in a minute"
            if "smoke" in scales
            else ""
        ),
    )
    parser.add_argument("--work-dir", help="zoos, datasets and models (default outputs/reproduce/)")
    return parser.parse_args()


def work_dir(args: argparse.Namespace, experiment: str) -> Path:
    path = Path(args.work_dir) if args.work_dir else WORK_ROOT / f"{experiment}-{args.scale}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def result_path(experiment: str, scale: str, suffix: str) -> Path:
    """``benchmarks/results/reproduce_<experiment>_<scale><suffix>``, e.g. ``_probe.png``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    return RESULTS_DIR / f"reproduce_{experiment}_{scale}{suffix}"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine() -> dict[str, Any]:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return {
        "device": name,
        "torch": torch.__version__,
        "sane_hf": sane_hf.__version__,
        "load_average_at_end": os.getloadavg(),
    }


def write_results(experiment: str, scale: str, results: dict[str, Any]) -> Path:
    """Write the results JSON (with command and machine) and print where it went."""
    path = result_path(experiment, scale, ".json")
    command = "python " + shlex.join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    payload = {"experiment": experiment, "scale": scale, "command": command, **results}
    payload["machine"] = machine()
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nresults written to {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Markdown tables of the results (RESULTS.md and the released model card)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def probe_markdown(report: dict[str, Any]) -> str:
    """Properties x feature sets of a `ProbeReport.to_dict()`: R^2, or accuracy for categories."""
    scores: dict[str, dict[str, str]] = {}
    for result in report["results"]:
        metric = "R²" if result["metric"] == "r2" else "accuracy"
        cell = scores.setdefault(f"{result['property']} ({metric})", {})
        cell[result["features"]] = f"{result['score']:.3f}"
    features = list(dict.fromkeys(r["features"] for r in report["results"]))
    rows = [[name, *(cells.get(f, "-") for f in features)] for name, cells in scores.items()]
    return markdown_table(["property", *features], rows)


def sampling_markdown(results: dict[str, Any], epochs: list[int]) -> str:
    """Groups x fine-tuning epochs, accuracy % mean ± std, with n and relative novelty."""
    evaluation = results["evaluation"]
    columns = [evaluation["epochs"].index(epoch) for epoch in epochs]
    rows = []
    for group, accuracy in evaluation["accuracy"].items():
        values = 100 * np.array(accuracy)
        cells = [f"{values[:, c].mean():.1f} ± {values[:, c].std():.1f}" for c in columns]
        novelty = results["novelty"].get(group, {}).get("relative")
        rows.append([group, len(values), *cells, "-" if novelty is None else f"{novelty:.2f}"])
    header = ["method", "n", *(f"epoch {epoch}" for epoch in epochs), "novelty"]
    return markdown_table(header, rows)
