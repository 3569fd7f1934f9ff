"""Does ``sane-hf predict`` flag networks unlike its zoo, and leave the zoo's own kind alone?

    python -m benchmarks.reproduce.in_distribution            # checkpoints/sane-cnn-mnist

Networks of the released model's architecture (CNN-s on the MNIST subset), made three ways:

1. **plain PyTorch**: ``build_model("cnn_s")`` with PyTorch's default init (non-zero biases),
   trained by a plain Adam loop (lr 3e-4, batch 10) on the images scaled to 0..1 (not the zoo's
   standardization), checkpoints after 0 (untrained), 1, 2, 4 and 8 epochs; their true test
   accuracy is measured on the inputs they were trained on;
2. **untrained** networks of the zoo's own init (`sane-hf zoo train`, epoch 0);
3. **zoo-made**: `sane-hf zoo train` with the zoo's recipe and seeds the zoo never used, epochs
   1..6 (the epochs SANE saw): these should *not* be flagged (the false-alarm rate).

Every network goes through `predict_networks` (the Python side of ``sane-hf predict``); the
result file ``benchmarks/results/in_distribution_sane_cnn_mnist.json`` holds per network its
kind, epoch, true and predicted test accuracy, percentiles and flag, and the flag rate per kind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import RESULTS_DIR, WORK_ROOT, machine_info
from sane_hf import build_model
from sane_hf.downstream.pretrained import PretrainedSane, predict_networks
from sane_hf.zoo.storage import load_zoo_records
from sane_hf.zoo.tasks import load_dataset_by_name

ROOT = Path(__file__).parent.parent.parent
RELEASED = ROOT / "checkpoints" / "sane-cnn-mnist"
PLAIN_EPOCHS = (0, 1, 2, 4, 8)
ZOO_SEED = 10_000  # the released zoo used seeds 0..99


def unit_range(images: torch.Tensor, mean, std) -> torch.Tensor:
    """The zoo task's standardized images back in 0..1 (what a plain loop feeds a network)."""
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    return images * std + mean


@torch.no_grad()
def test_accuracy(network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    network.eval()
    return float((network(inputs).argmax(1) == labels).float().mean())


def plain_pytorch_networks(seeds: int) -> list[dict[str, Any]]:
    """Networks of PyTorch's default init trained by a plain loop on 0..1 inputs."""
    task = load_dataset_by_name("mnist")
    train_x, train_y = task.train
    test_x, test_y = task.test
    train_x, test_x = (unit_range(x, task.mean, task.std) for x in (train_x, test_x))
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        network = build_model("cnn_s")
        optimizer = torch.optim.Adam(network.parameters(), lr=3e-4)
        generator = torch.Generator().manual_seed(seed)
        for epoch in range(max(PLAIN_EPOCHS) + 1):
            if epoch in PLAIN_EPOCHS:
                rows.append(
                    {
                        "kind": "plain PyTorch (default init, inputs 0..1)",
                        "epoch": epoch,
                        "network": {k: v.clone() for k, v in network.state_dict().items()},
                        "true_test_acc": test_accuracy(network, test_x, test_y),
                    }
                )
            network.train()
            for batch in torch.randperm(len(train_x), generator=generator).split(10):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(network(train_x[batch]), train_y[batch])
                loss.backward()
                optimizer.step()
    return rows


def zoo_made_networks(work: Path, models: int) -> list[dict[str, Any]]:
    """`sane-hf zoo train` with the released zoo's recipe and unused seeds, epochs 0..6."""
    zoo_dir = work / "zoo_made"
    command = [
        sys.executable, "-m", "sane_hf", "zoo", "train", "--output", str(zoo_dir),
        "--architecture", "cnn_s", "--dataset", "mnist", "--num-models", str(models),
        "--seed", str(ZOO_SEED), "--epochs", "6", "--no-progress",
        "--set", "hyperparameters.activation=tanh", "--set", "hyperparameters.init=uniform",
        "--set", "hyperparameters.lr=3e-4",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    _, records, _ = load_zoo_records(zoo_dir)
    return [
        {
            "kind": "zoo-made, epoch 0 (untrained, zoo init)"
            if record["epoch"] == 0
            else "zoo-made, epochs 1..6 (SANE saw these epochs)",
            "epoch": record["epoch"],
            "network": str(zoo_dir / record["file"]),
            "true_test_acc": record["test_acc"],
        }
        for record in records
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(RELEASED))
    parser.add_argument("--plain-seeds", type=int, default=3)
    parser.add_argument("--zoo-models", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    work = WORK_ROOT / "in_distribution"
    work.mkdir(parents=True, exist_ok=True)
    rows = plain_pytorch_networks(args.plain_seeds) + zoo_made_networks(work, args.zoo_models)
    sane = PretrainedSane.from_pretrained(args.model, heads=True)
    if sane.in_distribution is None:
        raise SystemExit(
            f"{args.model} ships no in-distribution reference: attach one first "
            "(python scripts/release_sane_cnn_mnist.py --scale cpu --attach-only)"
        )
    predictions = predict_networks(sane, [row["network"] for row in rows])
    print(predictions.table())
    outside = predictions.in_distribution.outside
    for index, row in enumerate(rows):
        row.pop("network")
        row["predicted"] = {k: float(v[index]) for k, v in predictions.values.items()}
        row["percentiles"] = {
            k: float(v[index]) for k, v in predictions.in_distribution.percentiles.items()
        }
        row["flagged"] = bool(outside[index])
    rates = {}
    for kind in dict.fromkeys(row["kind"] for row in rows):
        flags = [row["flagged"] for row in rows if row["kind"] == kind]
        rates[kind] = {"flagged": int(sum(flags)), "networks": len(flags)}
    errors = {}
    for kind in dict.fromkeys(row["kind"] for row in rows):
        if "test_acc" not in predictions.values:
            break
        gaps = [r["predicted"]["test_acc"] - r["true_test_acc"] for r in rows if r["kind"] == kind]
        errors[kind] = {"mean": float(np.mean(gaps)), "max_abs": float(np.max(np.abs(gaps)))}
    result = {
        "model": args.model,
        "flag_rates": rates,
        "test_acc_prediction_error (predicted - true)": errors,
        "heads": predictions.heads,
        "left_out": predictions.left_out,
        "networks": rows,
        "command": "python -m benchmarks.reproduce.in_distribution",
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": machine_info(torch.device("cpu")),
    }
    path = RESULTS_DIR / "in_distribution_sane_cnn_mnist.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"flag_rates": rates, "errors": errors}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
