"""How a zoo's networks were made, in words that travel with the model (processor and card).

A SANE model and its probe heads know one kind of network: the zoo's. A user's network of the
same architecture but made another way (PyTorch's default init with non-zero biases, inputs in
0..1 instead of standardized) gets embeddings and predictions outside what the zoo taught, so
the processor config and the model card state the zoo's recipe: architecture, initialization
(biases included), data and input standardization, optimizer, epochs trained and the epochs SANE
saw; ``sane-hf predict`` says what its "test accuracy" refers to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# `sane_hf.zoo.architectures.initialize`: every scheme but "default" sets biases to zero.
BIASES_BY_INIT = {"default": "PyTorch's default (non-zero)"}
ZERO_BIASES = "zero"


def zoo_provenance(zoo: Mapping[str, Any], epochs_seen: Sequence[int] | None) -> dict[str, Any]:
    """A JSON description of how the zoo's networks were made, from its ``zoo.json`` (the
    ``zoo`` entry of ``sane_zoo.json``) and the epochs of the checkpoints SANE was trained on."""
    config = zoo.get("config", {}) or {}
    hyperparameters = dict(config.get("hyperparameters", {}) or {})
    grid = config.get("grid") if zoo.get("kind") == "hyperparameter" else None
    dataset = zoo.get("dataset_info", {}) or {}
    init = hyperparameters.get("init", "default")
    epochs = zoo.get("epochs") or []
    return {
        "architecture": zoo.get("architecture"),
        "architecture_kwargs": dict(zoo.get("architecture_kwargs", {}) or {}),
        "activation": hyperparameters.get("activation"),
        "init": init,
        "biases_at_init": BIASES_BY_INIT.get(init, ZERO_BIASES),
        "hyperparameter_grid": grid,
        "dataset": zoo.get("dataset"),
        "split_sizes": dataset.get("split_sizes"),
        "input_standardization": dataset.get("standardization"),
        "optimizer": {
            name: hyperparameters.get(name)
            for name in ("optimizer", "lr", "weight_decay", "dropout")
            if name in hyperparameters
        }
        | ({"batch_size": config["batch_size"]} if "batch_size" in config else {}),
        "epochs_trained": max(epochs) if epochs else config.get("epochs"),
        "epochs_seen_by_sane": sorted(int(e) for e in epochs_seen) if epochs_seen else None,
        "num_models": zoo.get("num_models"),
    }


def provenance_lines(provenance: Mapping[str, Any]) -> list[str]:
    """The description as short lines (model card, ``sane-hf predict``)."""
    standardization = provenance.get("input_standardization") or {}
    inputs = "inputs as given"
    if standardization:
        inputs = (
            f"inputs standardized per channel with the training split's mean "
            f"{_numbers(standardization.get('mean'))} and std {_numbers(standardization.get('std'))}"
        )
    seen = provenance.get("epochs_seen_by_sane")
    optimizer = provenance.get("optimizer") or {}
    grid = provenance.get("hyperparameter_grid")
    lines = [
        f"architecture: {provenance.get('architecture')} {provenance.get('architecture_kwargs') or ''}".rstrip(),
        f"init: {provenance.get('init')} weights, {provenance.get('biases_at_init')} biases; "
        f"activation {provenance.get('activation')}",
        f"data: {provenance.get('dataset')} (split sizes {provenance.get('split_sizes')}), {inputs}",
        f"optimizer: {optimizer.get('optimizer')}"
        + "".join(f", {k} {v}" for k, v in optimizer.items() if k != "optimizer"),
        f"epochs trained: {provenance.get('epochs_trained')}; epochs SANE saw: "
        + (f"{seen[0]}..{seen[-1]}" if seen else "unknown"),
    ]
    if grid:
        lines.append(f"hyperparameters varied over: {grid}")
    return lines


def test_accuracy_meaning(provenance: Mapping[str, Any] | None) -> str:
    """What a predicted ``test_acc`` is: the accuracy on the zoo's task and test split."""
    if not provenance:
        return "accuracy on the test split of the zoo's task (the processor records no provenance)"
    sizes = provenance.get("split_sizes") or {}
    size = f" of {sizes['test']} examples" if "test" in sizes else ""
    return (
        f"fraction correct on the {provenance.get('dataset')} test split{size} the zoo's networks "
        "were evaluated on, with the zoo's input standardization"
    )


def _numbers(values: Any) -> str:
    if isinstance(values, list | tuple):
        return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
    return str(values)


__all__ = ["provenance_lines", "test_accuracy_meaning", "zoo_provenance"]
