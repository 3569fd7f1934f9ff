"""Fitted probe heads that ship with a SANE checkpoint: property predictions without a zoo.

A linear probe fitted on the zoo's embeddings (`probe_zoo`: standardized features, ridge or
logistic regression, regularization picked on validation) is a few hundred numbers. Saved
beside the model (``probe_heads.safetensors`` for the arrays, ``probe_heads.json`` for names,
units, kinds, classes and test scores), it lets a user get "predicted test accuracy 0.87" for
their own checkpoint from the model folder alone::

    heads = ProbeHeads.from_pretrained("checkpoints/sane-cnn-mnist")
    heads.predict(head_inputs(model, processor(networks), heads))  # {"test_acc": [...], ...}

Each head reads the feature set that predicted its property best on the zoo's *validation*
split (`sane_hf.downstream.features`: the mean latent, per-layer means, s(Z), or SANE next to
s(W)), and records its validation and test scores; `informative` leaves out the heads that are
no better than predicting the zoo's mean.
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
from transformers import BatchFeature
from transformers.utils import cached_file

from sane_hf.downstream.embedding import embed
from sane_hf.downstream.features import (
    HEAD_FEATURE_SETS,
    SANE,
    SANE_AND_WEIGHT_STATISTICS,
    feature_matrices,
    latent_statistics,
    needs_token_latents,
    split_tokens,
    weight_statistics,
)
from sane_hf.downstream.probing import LogisticProbe, ProbeReport, probe_zoo
from sane_hf.zoo.formats import (
    PROBE_HEADS_CONFIG_FILE,
    PROBE_HEADS_FILE,
    atomic_save_safetensors,
    atomic_write_text,
    read_safetensors,
)

PROBE_HEADS_FORMAT = "sane_hf.ProbeHeads"
PROBE_HEADS_VERSION = 2  # version 1: every head reads the mean latent, no validation score
READABLE_VERSIONS = (1, 2)
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
    """One fitted linear probe on one standardized feature set.

    Attributes:
        name, unit: the property and its unit.
        kind: ``"ridge"`` (numeric) or ``"logistic"`` (categorical, ``classes`` holds the labels).
        features: the feature set it reads (``HEAD_FEATURE_SETS``), chosen on validation.
        feature_mean, feature_std: ``[D]`` training-split standardization of the features.
        coef: ``[D]`` (ridge) or ``[C, D]`` (logistic; ``[1, D]`` for two classes).
        intercept: ``[1]`` (ridge) or ``[C]`` / ``[1]`` (logistic).
        metric, test_score: test R^2 (ridge) or accuracy (logistic) of the fitted probe.
        regularization: the ridge alpha or logistic C picked on the validation split.
        validation_score: the same metric on the validation split (None in version-1 files).
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
    features: str = SANE
    validation_score: float | None = None

    @property
    def informative(self) -> bool:
        """Better than predicting the zoo's mean (R^2 > 0) on both validation and test; for
        classification heads always True."""
        if self.metric != "r2":
            return True
        scores = [self.test_score, self.validation_score]
        return all(score > 0 for score in scores if score is not None)

    def predict(self, features: torch.Tensor | np.ndarray | Mapping[str, Any]) -> np.ndarray:
        """Predictions for features ``[M, D]`` of this head's feature set (or a mapping of feature
        set name to features, as `head_inputs` returns): values in ``unit``, or class labels."""
        if isinstance(features, Mapping):
            if self.features not in features:
                raise ValueError(f"probe head {self.name!r} reads {self.features!r} features")
            features = features[self.features]
        if isinstance(features, torch.Tensor):  # bfloat16 models give bfloat16 embeddings
            x = features.detach().cpu().double()
        else:
            x = torch.as_tensor(np.asarray(features, dtype=np.float64))
        if x.dim() != 2 or x.shape[1] != self.feature_mean.numel():
            raise ValueError(
                f"probe head {self.name!r} reads {self.features} features "
                f"[M, {self.feature_mean.numel()}], got {tuple(x.shape)}: is it from another "
                "SANE model?"
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

    @property
    def feature_sets(self) -> list[str]:
        """The feature sets the heads read."""
        return list(dict.fromkeys(head.features for head in self.heads))

    def predict(
        self, features: torch.Tensor | np.ndarray | Mapping[str, Any]
    ) -> dict[str, np.ndarray]:
        """``{property: [M] predictions}`` for `head_inputs` (or, when every head reads the
        mean latent, for mean embeddings ``[M, D]``)."""
        return {head.name: head.predict(features) for head in self.heads}

    def informative(self) -> ProbeHeads:
        """The heads better than predicting the zoo's mean (`PropertyHead.informative`)."""
        return ProbeHeads([head for head in self.heads if head.informative], self.zoo_dataset)

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
            "zoo_dataset": self.zoo_dataset,
            "heads": [
                {
                    "name": head.name,
                    "unit": head.unit,
                    "kind": head.kind,
                    "features": head.features,
                    "metric": head.metric,
                    "test_score": head.test_score,
                    "validation_score": head.validation_score,
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
        """One head per property of a `probe_zoo` report: the fitted probe of the feature set
        (among ``HEAD_FEATURE_SETS``) with the best validation score; baselines are not shipped."""
        units = {**DEFAULT_UNITS, **(units or {})}
        heads = []
        for name in report.properties:
            fitted = [
                r for r in report.results if r.features in HEAD_FEATURE_SETS and r.probe is not None
            ]
            if any(r.property == name for r in fitted):
                best = report.best(name, [r.features for r in fitted])
                heads.append(_head(best, units.get(name, "")))
        if not heads:
            raise ValueError(f"the report has no fitted SANE probe (skipped: {report.skipped})")
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
OPTIONAL_ENTRY_TYPES = {"features": str, "validation_score": (int, float, type(None))}
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
        or description.get("version") not in READABLE_VERSIONS
    ):
        raise ValueError(f"{path}: not a {PROBE_HEADS_FORMAT} file of version {READABLE_VERSIONS}")
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
        for name, kind in OPTIONAL_ENTRY_TYPES.items():  # version 2 fields
            value = entry.get(name)
            if name in entry and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ValueError(f"{path}: heads[{index}].{name} is {value!r}")
        if entry.get("features", HEAD_FEATURE_SETS[0]) not in HEAD_FEATURE_SETS:
            raise ValueError(
                f"{path}: heads[{index}].features must be one of {list(HEAD_FEATURE_SETS)}"
            )
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


def _head(result: Any, unit: str) -> PropertyHead:
    probe = result.probe
    standardizer = probe.standardizer
    common = {
        "name": result.property,
        "unit": unit,
        "features": result.features,
        "metric": probe.metric,
        "test_score": float(result.score),
        "validation_score": float(result.validation_score),
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
    feature_sets: Sequence[str] = HEAD_FEATURE_SETS,
    progress: bool = False,
) -> ProbeHeads:
    """Fit linear probe heads on a zoo's SANE features (train; alpha/C and the feature set on
    validation; test R^2 recorded).

    Properties a zoo cannot be probed for (constant, missing) are left out, as in `probe_zoo`;
    none left is an error. On a mixed zoo (networks of several architectures, padded) the heads
    read the mean latent only: the other feature sets need one layout shared by every network.
    """
    present = set(dataset["train"].column_names)
    if "scales" in present:  # a mixed zoo (`sane_hf.zoo.mixed`)
        feature_sets = [SANE]
    hyperparameters = dataset["train"].features.get("hyperparameters")
    if isinstance(hyperparameters, dict):
        present |= set(hyperparameters)
    unknown = [name for name in properties if name not in present]
    if unknown:
        raise ValueError(f"properties {unknown} are not columns of the zoo")
    report = probe_zoo(
        model,
        dataset,
        properties=list(properties),
        baselines=(),
        feature_sets=feature_sets,
        progress=progress,
    )
    return ProbeHeads.from_report(report, units, zoo_dataset)


def head_inputs(
    model: nn.Module,
    features: Any,
    heads: ProbeHeads,
    mask: torch.Tensor,
    *,
    batch_size: int = 256,
    embeddings: Any = None,
) -> dict[str, np.ndarray]:
    """The feature sets ``heads`` read, for a `SaneProcessor` output ``features`` (normalized
    tokens ``[M, N, T]`` and positions); ``mask`` ``[N, T]`` marks the real values (the
    processor's ``layout.mask()``), for s(W). ``embeddings``: already computed ones of the same
    networks, reused when they hold what is needed."""
    wanted = heads.feature_sets
    token_latents = needs_token_latents(wanted)
    if embeddings is None or (token_latents and embeddings.token_latents is None):
        embeddings = embed(
            model,
            features,
            batch_size=batch_size,
            return_token_latents=token_latents,
            progress=False,
        )
    tokens, positions = features["tokens"], features["positions"]
    positions = positions.reshape(-1, *positions.shape[-2:])[0].long()
    weight_stats = None
    if SANE_AND_WEIGHT_STATISTICS in wanted:
        weight_stats = weight_statistics(
            tokens.reshape(-1, *tokens.shape[-2:]).float(), mask, positions
        )
    mean = embeddings.mean.reshape(-1, embeddings.mean.shape[-1])
    return feature_matrices(
        wanted,
        mean=mean,
        layer_means=embeddings.layer_means.reshape(len(mean), -1),
        latent_stats=(
            latent_statistics(embeddings.token_latents, positions) if token_latents else None
        ),
        weight_stats=weight_stats,
    )


def split_head_inputs(
    model: nn.Module, split: Dataset, heads: ProbeHeads, *, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """`head_inputs` of every row of a zoo dataset split (normalized tokens already)."""
    tokens, positions, mask = split_tokens(split)
    features = BatchFeature({"tokens": tokens, "positions": positions.expand(len(tokens), -1, -1)})
    return head_inputs(model, features, heads, mask, batch_size=batch_size)


__all__ = ["ProbeHeads", "PropertyHead", "fit_probe_heads", "head_inputs", "split_head_inputs"]
