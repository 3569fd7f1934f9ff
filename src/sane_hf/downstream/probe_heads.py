"""Fitted probe heads that ship with a SANE checkpoint: property predictions without a zoo.

A linear probe fitted on the zoo's embeddings (`probe_zoo`: standardized features, ridge or
logistic regression, regularization picked on validation) is a few hundred numbers. Saved
beside the model (``probe_heads.safetensors`` for the arrays, ``probe_heads.json`` for names,
units, kinds, classes and test scores), it lets a user get "predicted test accuracy 0.87" for
their own checkpoint from the model folder alone::

    heads = ProbeHeads.from_pretrained("checkpoints/sane-cnn-mnist")
    heads.predict(embed(model, networks, processor=processor).mean)  # {"test_acc": [...], ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from transformers.utils import cached_file

from sane_hf.downstream.probing import LogisticProbe, ProbeReport, probe_zoo
from sane_hf.zoo.formats import (
    PROBE_HEADS_CONFIG_FILE,
    PROBE_HEADS_FILE,
    atomic_save_safetensors,
    atomic_write_text,
    read_safetensors,
)

PROBE_HEADS_FORMAT = "sane_hf.ProbeHeads"
PROBE_HEADS_VERSION = 1
FEATURES = "SANE"  # the mean token latent: `Embeddings.mean`
# Units of the properties a sane-hf zoo records; other properties get "" unless given.
DEFAULT_UNITS = {
    "test_acc": "fraction correct",
    "train_acc": "fraction correct",
    "val_acc": "fraction correct",
    "ggap": "fraction correct (train - test)",
    "test_loss": "cross-entropy (nats)",
    "train_loss": "cross-entropy (nats)",
    "val_loss": "cross-entropy (nats)",
    "epoch": "epochs",
}
DEFAULT_PROPERTIES = ("test_acc", "epoch", "ggap")

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class PropertyHead:
    """One fitted linear probe on standardized mean embeddings.

    Attributes:
        name, unit: the property and its unit.
        kind: ``"ridge"`` (numeric) or ``"logistic"`` (categorical, ``classes`` holds the labels).
        feature_mean, feature_std: ``[D]`` training-split standardization of the embeddings.
        coef: ``[D]`` (ridge) or ``[C, D]`` (logistic; ``[1, D]`` for two classes).
        intercept: ``[1]`` (ridge) or ``[C]`` / ``[1]`` (logistic).
        metric, test_score: test R^2 (ridge) or accuracy (logistic) of the fitted probe.
        regularization: the ridge alpha or logistic C picked on the validation split.
    """

    name: str
    unit: str
    kind: str
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor
    metric: str
    test_score: float
    regularization: float
    classes: list[str] = field(default_factory=list)

    def predict(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """Predictions for mean embeddings ``[M, D]``: values in ``unit``, or class labels."""
        if isinstance(embeddings, torch.Tensor):  # bfloat16 models give bfloat16 embeddings
            x = embeddings.detach().cpu().double()
        else:
            x = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))
        if x.dim() != 2 or x.shape[1] != self.feature_mean.numel():
            raise ValueError(
                f"probe head {self.name!r} reads embeddings [M, {self.feature_mean.numel()}], "
                f"got {tuple(x.shape)}: is it from another SANE model?"
            )
        x = (x - self.feature_mean) / self.feature_std
        if self.kind == "ridge":
            return (x @ self.coef + self.intercept).numpy()
        scores = x @ self.coef.T + self.intercept
        # two classes: sklearn keeps one row of coefficients, for classes[1]
        binary = scores.shape[1] == 1
        index = (scores[:, 0] > 0).long() if binary else scores.argmax(dim=1)
        return np.array(self.classes)[index.numpy()]


@dataclass
class ProbeHeads:
    """The probe heads of one SANE model, with where they were fitted."""

    heads: list[PropertyHead]
    zoo_dataset: str | None = None

    @property
    def names(self) -> list[str]:
        return [head.name for head in self.heads]

    def predict(self, embeddings: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """``{property: [M] predictions}`` for mean embeddings ``[M, D]`` (``Embeddings.mean``)."""
        return {head.name: head.predict(embeddings) for head in self.heads}

    def test_scores(self) -> dict[str, float]:
        """Model-card metrics: ``"R^2 test_acc (shipped probe head, test split)" -> score``."""
        # here: the Hub module imports `datasets` (zoo pushes), which predicting does not need
        from sane_hf.hub import probe_metric_name

        return {probe_metric_name(head.metric, head.name): head.test_score for head in self.heads}

    # -- saving and loading ----------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``probe_heads.safetensors`` (arrays) and ``probe_heads.json`` (the rest)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for head in self.heads:
            for part in ("feature_mean", "feature_std", "coef", "intercept"):
                tensors[f"{head.name}.{part}"] = getattr(head, part).double().contiguous()
        atomic_save_safetensors(tensors, folder / PROBE_HEADS_FILE)
        description = {
            "format": PROBE_HEADS_FORMAT,
            "version": PROBE_HEADS_VERSION,
            "features": FEATURES,
            "zoo_dataset": self.zoo_dataset,
            "heads": [
                {
                    "name": head.name,
                    "unit": head.unit,
                    "kind": head.kind,
                    "metric": head.metric,
                    "test_score": head.test_score,
                    "regularization": head.regularization,
                    "classes": head.classes,
                }
                for head in self.heads
            ],
        }
        atomic_write_text(
            folder / PROBE_HEADS_CONFIG_FILE, json.dumps(description, indent=1) + "\n"
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any
    ) -> ProbeHeads:
        """Load from a model folder, a Hub repo or the cache (``cached_file`` keyword arguments)."""
        source = str(pretrained_model_name_or_path)
        try:
            config_path = cached_file(source, PROBE_HEADS_CONFIG_FILE, **hub_kwargs)
            tensors_path = cached_file(source, PROBE_HEADS_FILE, **hub_kwargs)
        except OSError:
            raise FileNotFoundError(
                f"{source} has no probe heads ({PROBE_HEADS_CONFIG_FILE} and {PROBE_HEADS_FILE}): "
                "fit them with fit_probe_heads on the model's zoo and save them beside the model"
            ) from None
        description = _read_description(Path(config_path))
        # Copies: safetensors hands out views at 8-byte offsets in its buffer, and BLAS rounds the
        # last bit differently for unaligned inputs; aligned copies predict exactly as fitted.
        tensors = {key: value.clone() for key, value in read_safetensors(tensors_path).items()}
        heads = [
            _load_head(entry, tensors, config_path, tensors_path) for entry in description["heads"]
        ]
        return cls(heads, description.get("zoo_dataset"))

    @classmethod
    def from_report(
        cls,
        report: ProbeReport,
        units: Mapping[str, str] | None = None,
        zoo_dataset: str | None = None,
    ) -> ProbeHeads:
        """The heads of a `probe_zoo` report's SANE probes (baseline probes are not shipped)."""
        units = {**DEFAULT_UNITS, **(units or {})}
        heads = [
            _head(result.probe, result.property, units.get(result.property, ""), result.score)
            for result in report.results
            if result.features == FEATURES and result.probe is not None
        ]
        if not heads:
            raise ValueError(
                f"the report has no fitted {FEATURES} probe (skipped: {report.skipped})"
            )
        return cls(heads, zoo_dataset)


HEAD_ENTRY_TYPES = {
    "name": str,
    "unit": str,
    "kind": str,
    "metric": str,
    "test_score": (int, float),
    "regularization": (int, float),
    "classes": list,
}
HEAD_ARRAYS = ("feature_mean", "feature_std", "coef", "intercept")


def _read_description(path: Path) -> dict[str, Any]:
    """``probe_heads.json``, its head entries checked; ``ValueError`` naming the file and the
    field when it is not this format's JSON."""
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if (
        not isinstance(description, dict)
        or description.get("format") != PROBE_HEADS_FORMAT
        or description.get("version") != PROBE_HEADS_VERSION
    ):
        raise ValueError(f"{path}: not a {PROBE_HEADS_FORMAT} version {PROBE_HEADS_VERSION} file")
    entries = description.get("heads")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: `heads` must be a non-empty list")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: heads[{index}] is not an object")
        for name, kind in HEAD_ENTRY_TYPES.items():
            value = entry.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{path}: heads[{index}].{name} is {value!r}")
        if entry["kind"] not in ("ridge", "logistic"):
            raise ValueError(f"{path}: heads[{index}].kind must be ridge or logistic")
    return description


def _load_head(
    entry: dict[str, Any], tensors: dict[str, torch.Tensor], config_path: str, tensors_path: str
) -> PropertyHead:
    """One head from its JSON entry and its arrays, checked like ``sane_zoo.json``'s statistics:
    float arrays, finite, ``feature_std > 0``, and shapes that fit one embedding size (a broken
    head would otherwise predict NaN, or fail with an indexing error, at prediction time)."""
    name = entry["name"]
    missing = [f"{name}.{part}" for part in HEAD_ARRAYS if f"{name}.{part}" not in tensors]
    if missing:
        raise ValueError(f"{tensors_path} lacks the arrays {missing}")
    arrays = {part: tensors[f"{name}.{part}"] for part in HEAD_ARRAYS}
    for part, value in arrays.items():
        where = f"{tensors_path}: {name}.{part}"
        if not value.is_floating_point():
            raise ValueError(f"{where} has dtype {value.dtype}, expected float")
        if not torch.isfinite(value).all():
            raise ValueError(f"{where} holds non-finite values (NaN/Inf)")
    if not (arrays["feature_std"] > 0).all():
        raise ValueError(f"{tensors_path}: {name}.feature_std must be > 0 everywhere")
    dim = arrays["feature_mean"].numel()
    classes = len(entry["classes"])
    rows = 1 if entry["kind"] == "ridge" or classes == 2 else classes
    expected = {
        "feature_mean": (dim,),
        "feature_std": (dim,),
        "coef": (dim,) if entry["kind"] == "ridge" else (rows, dim),
        "intercept": (rows,),
    }
    for part, shape in expected.items():
        if tuple(arrays[part].shape) != shape:
            raise ValueError(
                f"{tensors_path}: {name}.{part} has shape {list(arrays[part].shape)}, expected "
                f"{list(shape)} ({entry['kind']} head, {classes} classes in {config_path})"
            )
    if entry["kind"] == "logistic" and classes < 2:
        raise ValueError(f"{config_path}: logistic head {name!r} needs at least two classes")
    try:
        return PropertyHead(**entry, **arrays)
    except TypeError as error:  # a field this version does not know
        raise ValueError(f"{config_path}: head {name!r}: {error}") from None


def _head(probe: Any, name: str, unit: str, score: float) -> PropertyHead:
    standardizer = probe.standardizer
    common = {
        "name": name,
        "unit": unit,
        "metric": probe.metric,
        "test_score": float(score),
        "regularization": float(probe.regularization),
        "feature_mean": torch.as_tensor(standardizer.mean, dtype=torch.float64),
        "feature_std": torch.as_tensor(standardizer.std, dtype=torch.float64),
    }
    if isinstance(probe, LogisticProbe):
        classifier = probe.classifier
        return PropertyHead(
            kind="logistic",
            coef=torch.as_tensor(classifier.coef_, dtype=torch.float64),
            intercept=torch.as_tensor(classifier.intercept_, dtype=torch.float64),
            classes=[str(c) for c in classifier.classes_],
            **common,
        )
    return PropertyHead(
        kind="ridge",
        coef=torch.as_tensor(probe.coef, dtype=torch.float64),
        intercept=torch.tensor([probe.intercept], dtype=torch.float64),
        **common,
    )


def fit_probe_heads(
    model: nn.Module,
    dataset: Mapping[str, Dataset],
    *,
    properties: Sequence[str] = DEFAULT_PROPERTIES,
    units: Mapping[str, str] | None = None,
    zoo_dataset: str | None = None,
    progress: bool = False,
) -> ProbeHeads:
    """Fit linear probe heads on a zoo's SANE embeddings (train; alpha/C on validation; test R^2).

    Properties a zoo cannot be probed for (constant, missing) are left out, as in `probe_zoo`;
    none left is an error.
    """
    present = set(dataset["train"].column_names)
    hyperparameters = dataset["train"].features.get("hyperparameters")
    if isinstance(hyperparameters, dict):
        present |= set(hyperparameters)
    unknown = [name for name in properties if name not in present]
    if unknown:
        raise ValueError(f"properties {unknown} are not columns of the zoo")
    report = probe_zoo(model, dataset, properties=list(properties), baselines=(), progress=progress)
    return ProbeHeads.from_report(report, units, zoo_dataset)


__all__ = ["ProbeHeads", "PropertyHead", "fit_probe_heads"]
