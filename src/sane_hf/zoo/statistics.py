"""Statistics of a zoo (`sane-hf zoo info`): models, splits, accuracy per epoch, and its plot."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _describe(values: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def zoo_statistics(
    records: Sequence[Mapping[str, Any]], splits: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """Counts (per split when ``splits`` is given) and train/test accuracy per epoch.

    ``records`` need ``model_id``, ``epoch``, ``train_acc`` and ``test_acc``.
    """
    model_ids = np.array([record["model_id"] for record in records])
    epochs = np.array([record["epoch"] for record in records])
    accuracy = {
        name: np.array([record[name] for record in records], dtype=np.float64)
        for name in ("train_acc", "test_acc")
    }
    statistics: dict[str, Any] = {
        "num_models": len(set(model_ids.tolist())),
        "num_checkpoints": len(records),
        "epochs": sorted(set(epochs.tolist())),
    }
    if splits is not None:
        statistics["splits"] = {
            split: {"models": len(ids), "checkpoints": int(np.isin(model_ids, list(ids)).sum())}
            for split, ids in splits.items()
        }
    statistics["per_epoch"] = [
        {"epoch": epoch, "checkpoints": int((epochs == epoch).sum())}
        | {name: _describe(values[epochs == epoch]) for name, values in accuracy.items()}
        for epoch in statistics["epochs"]
    ]
    return statistics


def describe_zoo(zoo: Mapping[str, Any]) -> str:
    """``cnn_s networks on digits``: a zoo's architecture and task, for titles."""
    return f"{zoo.get('architecture', '?')} networks on {zoo.get('dataset', '?')}"


def format_zoo_statistics(statistics: Mapping[str, Any], zoo: Mapping[str, Any]) -> str:
    """A terminal summary: what the zoo is, split sizes, test accuracy per epoch."""
    kind = f", {zoo['kind']} zoo" if "kind" in zoo else ""
    lines = [
        f"zoo: {zoo.get('architecture', '?')} on {zoo.get('dataset', '?')}{kind}: "
        f"{statistics['num_models']} models, {statistics['num_checkpoints']} checkpoints, "
        f"epochs {statistics['epochs']}"
    ]
    if "splits" in statistics:
        lines.append(
            "splits: "
            + ", ".join(
                f"{split} {counts['models']} models / {counts['checkpoints']} checkpoints"
                for split, counts in statistics["splits"].items()
            )
        )
    lines.append("test accuracy per epoch:")
    lines.append(f"{'epoch':>6} {'checkpoints':>12} {'mean':>7} {'std':>7} {'min':>7} {'max':>7}")
    for row in statistics["per_epoch"]:
        test = row["test_acc"]
        lines.append(
            f"{row['epoch']:>6} {row['checkpoints']:>12} {test['mean']:>7.4f} {test['std']:>7.4f} "
            f"{test['min']:>7.4f} {test['max']:>7.4f}"
        )
    return "\n".join(lines)


def plot_zoo_accuracy(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None
) -> None:
    """Test accuracy vs epoch: one thin line per model, the population mean and min-max band,
    under ``title`` (default: the number of models)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg renders the png
    from matplotlib.ticker import MaxNLocator

    by_model: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        by_model.setdefault(record["model_id"], []).append((record["epoch"], record["test_acc"]))
    statistics = zoo_statistics(records)["per_epoch"]
    epochs = [row["epoch"] for row in statistics]
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    for points in by_model.values():
        points.sort()
        axes.plot(*zip(*points), color="tab:blue", alpha=0.15, linewidth=0.8)
    axes.fill_between(
        epochs,
        [row["test_acc"]["min"] for row in statistics],
        [row["test_acc"]["max"] for row in statistics],
        color="tab:orange",
        alpha=0.2,
        label="min-max",
    )
    axes.plot(
        epochs, [row["test_acc"]["mean"] for row in statistics], color="tab:orange", label="mean"
    )
    axes.set(xlabel="training epoch", ylabel="test accuracy (test split)")
    axes.set_title(title or f"{len(by_model)} models, one line each", fontsize="medium")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
