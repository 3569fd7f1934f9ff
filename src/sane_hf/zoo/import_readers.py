"""Reading the files of zoos made elsewhere, for `sane_hf.zoo.importing`.

Ray Tune trial folders (``params.json``, ``result.json``, ``checkpoint_<epoch>/checkpoints``) and
plain safetensors checkpoints; trainers' metric and hyperparameter names mapped to those of the
raw zoo format. Every reader raises `CheckpointProblem` with the reason when a file cannot be
used; the importer turns that into a skipped item (or an error with ``strict=True``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sane_hf.zoo.formats import read_json_lines

# Metric names used by common trainers, mapped to the names of the raw zoo format.
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    "train_loss": ("train_loss", "loss_train"),
    "train_acc": ("train_acc", "acc_train", "train_accuracy", "accuracy_train"),
    "val_loss": ("val_loss", "loss_val", "validation_loss", "loss_validation"),
    "val_acc": ("val_acc", "acc_val", "val_accuracy", "validation_acc", "acc_validation"),
    "test_loss": ("test_loss", "loss_test"),
    "test_acc": ("test_acc", "acc_test", "test_accuracy", "accuracy_test"),
    "ggap": ("ggap",),
}
# Every checkpoint needs these; zoos without a validation split leave val_loss/val_acc empty.
REQUIRED_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
ACCURACY_METRICS = ("train_acc", "val_acc", "test_acc")
# Keys that number the epoch of a result line, in order of preference.
EPOCH_KEYS = ("epoch", "training_iteration")
# Hyperparameter names of trial configs (last part of a "group::name" key) mapped to ours.
HYPERPARAMETER_ALIASES: dict[str, tuple[str, ...]] = {
    "activation": ("activation", "nlin", "act"),
    "dropout": ("dropout",),
    "init": ("init", "init_type", "initialization"),
    "optimizer": ("optimizer",),
    "lr": ("lr", "learning_rate"),
    "weight_decay": ("weight_decay", "wd"),
    "batch_size": ("batch_size", "batchsize"),
}


class CheckpointProblem(Exception):
    """Internal signal: the current checkpoint or model cannot be imported (message = reason)."""


def load_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state_dict safely (``weights_only=True``): the Ray-trial layout forces it."""
    if not path.is_file():
        raise CheckpointProblem("checkpoint file not found")
    try:
        state_dict = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # any unreadable or truncated pickle/zip: report and go on
        raise CheckpointProblem(
            f"unreadable checkpoint ({type(error).__name__}: {error})"
        ) from None
    return as_state_dict(state_dict)


def load_safetensors_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointProblem("checkpoint file not found")
    try:
        return load_file(path)
    except Exception as error:  # truncated or corrupt safetensors header/data
        raise CheckpointProblem(
            f"unreadable checkpoint ({type(error).__name__}: {error})"
        ) from None


def as_state_dict(loaded: Any) -> dict[str, torch.Tensor]:
    if not isinstance(loaded, dict) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise CheckpointProblem(
            f"expected a state_dict (a dict of tensors), got {type(loaded).__name__}"
        )
    return loaded


def properties_from_metrics(metrics: dict[str, Any], where: str) -> dict[str, Any]:
    """Map a metrics dict to the raw zoo properties; raise `CheckpointProblem` if one is missing.

    Returns our named metrics (train/val/test loss and acc, ggap) plus, if there are any,
    ``metrics``: the other entries of the line under their own names (all but a nested trial
    ``config``, which repeats ``params.json``).
    """
    properties: dict[str, Any] = {}
    used = set()
    for name, aliases in METRIC_ALIASES.items():
        alias = next((alias for alias in aliases if metrics.get(alias) is not None), None)
        properties[name] = None if alias is None else metrics[alias]
        used.add(alias)
    missing = [name for name in REQUIRED_METRICS if properties[name] is None]
    if missing:
        raise CheckpointProblem(f"missing metric(s) {missing} in {where}")
    for name, value in properties.items():
        if value is None:
            continue
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise CheckpointProblem(f"metric {name} in {where} is not a finite number: {value!r}")
        if name in ACCURACY_METRICS and not 0.0 <= value <= 1.0:
            raise CheckpointProblem(
                f"metric {name} in {where} is {value}, expected a fraction in [0, 1]"
            )
    if properties["ggap"] is None:
        properties["ggap"] = properties["train_acc"] - properties["test_acc"]
    aliases = {alias for names in METRIC_ALIASES.values() for alias in names}
    extra = {
        key: value
        for key, value in metrics.items()
        if key not in used
        and key not in EPOCH_KEYS
        and key != "config"
        and not (key in aliases and value is None)  # an empty val_acc is no extra metric
    }
    return properties | ({"metrics": extra} if extra else {})


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested config dicts into ``group::name`` keys (the Ray Tune convention)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten_config(value, prefix=f"{name}::")
        else:
            flat[name] = value
    return flat


def hyperparameters_from_config(config: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Split a trial config into ``(seed, hyperparameters)`` with our names for the common ones.

    Keys are matched on their last ``::`` part (``optim::lr`` is ``lr``); keys we have no name for
    are kept under their full flattened name.
    """
    flat = flatten_config(config)
    by_short_name = {key.split("::")[-1]: key for key in flat}
    if "seed" not in by_short_name:
        raise CheckpointProblem("params.json has no seed")
    seed = flat[by_short_name["seed"]]
    if not isinstance(seed, int):
        raise CheckpointProblem(f"params.json: seed must be an integer, got {seed!r}")
    hyperparameters = {}
    used = {by_short_name["seed"]}
    for name, aliases in HYPERPARAMETER_ALIASES.items():
        key = next((by_short_name[alias] for alias in aliases if alias in by_short_name), None)
        if key is not None:
            hyperparameters[name] = flat[key]
            used.add(key)
    hyperparameters |= {key: value for key, value in flat.items() if key not in used}
    return seed, hyperparameters


def read_result_lines(trial_dir: Path) -> dict[int, dict[str, Any]]:
    """``{epoch: metrics}`` from a trial's ``result.json`` (lines without an epoch are ignored
    because they cannot be matched to a checkpoint; Ray writes none of those)."""
    path = trial_dir / "result.json"
    if not path.is_file():
        raise CheckpointProblem("result.json not found")
    try:
        lines = read_json_lines(path)
    except (OSError, ValueError) as error:
        raise CheckpointProblem(f"unreadable result.json ({error})") from None
    results = {}
    for line in lines:
        key = next((key for key in EPOCH_KEYS if isinstance(line.get(key), int)), None)
        if key is not None:
            results[line[key]] = line
    return results


def trial_checkpoints(trial_dir: Path) -> Iterator[tuple[int | None, Path]]:
    """``(epoch, checkpoint_dir)`` of ``checkpoint_<epoch>`` folders (epoch None: unparsable)."""
    for checkpoint_dir in sorted(trial_dir.glob("checkpoint_*")):
        suffix = checkpoint_dir.name.removeprefix("checkpoint_")
        yield (int(suffix) if suffix.isdigit() else None), checkpoint_dir
