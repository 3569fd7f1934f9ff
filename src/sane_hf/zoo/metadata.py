"""`ZooMetadata` (``sane_zoo.json``): what travels with a zoo dataset to read rows back into networks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from sane_hf.weights.layout import WeightLayout
from sane_hf.weights.normalization import (
    NormalizationStats,
    unstandardize_tokens,
)
from sane_hf.weights.tokenization import WeightTokenizer
from sane_hf.zoo.architectures import build_model

if TYPE_CHECKING:  # datasets costs a second of start-up; reading networks needs none of it
    from datasets import Dataset, DatasetDict

METADATA_FORMAT = "sane_hf.ZooDataset"
METADATA_VERSION = 1


@dataclass
class ZooMetadata:
    """Everything needed to read a zoo dataset back into networks (``sane_zoo.json``).

    Attributes:
        zoo: the raw zoo's ``zoo.json`` (architecture, kwargs, dataset, kind, epochs, ...).
        layout: the `WeightLayout` of every row's tokens.
        normalization: the training-split `NormalizationStats` the tokens were standardized with.
        tokenizer: ``WeightTokenizer`` settings (``tokensize``, ``include_norm``) and the stored
            token ``dtype``.
        alignment: ``{"aligned", "alignment_epoch"}``, plus ``"reference_model_id"`` and
            ``"reference_epoch"`` when aligned.
        split: ``{"seed", "fractions", "models": {split: [model ids]}}``.
        statistics: counts and accuracy per epoch (see `zoo_statistics`).
        fingerprint: of the Arrow files of a saved dataset (`sane_hf.zoo.storage.save_zoo_dataset`
            records it, loading checks it); ``None`` for a dataset not saved yet or on the Hub.
    """

    zoo: dict[str, Any]
    layout: WeightLayout
    normalization: NormalizationStats
    tokenizer: dict[str, Any]
    alignment: dict[str, Any]
    split: dict[str, Any]
    statistics: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = field(default=None, compare=False)  # not the content

    def to_dict(self) -> dict[str, Any]:
        fingerprint = {} if self.fingerprint is None else {"fingerprint": self.fingerprint}
        return fingerprint | {
            "format": METADATA_FORMAT,
            "version": METADATA_VERSION,
            "zoo": self.zoo,
            "layout": self.layout.to_dict(),
            "normalization": self.normalization.to_dict(),
            "tokenizer": self.tokenizer,
            "alignment": self.alignment,
            "split": self.split,
            "statistics": self.statistics,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ZooMetadata:
        if data.get("format") != METADATA_FORMAT or data.get("version") != METADATA_VERSION:
            raise ValueError(
                f"not a {METADATA_FORMAT} version {METADATA_VERSION} description: got "
                f"format={data.get('format')!r}, version={data.get('version')!r}"
            )
        return cls(
            zoo=data["zoo"],
            layout=WeightLayout.from_dict(data["layout"]),
            normalization=NormalizationStats.from_dict(data["normalization"]),
            tokenizer=data["tokenizer"],
            alignment=data["alignment"],
            split=data["split"],
            statistics=data.get("statistics", {}),
            fingerprint=data.get("fingerprint"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ZooMetadata:
        return cls.from_dict(json.loads(text))

    def build_tokenizer(self) -> WeightTokenizer:
        """The tokenizer the rows were made with (decoding only needs the layout)."""
        return WeightTokenizer(self.tokenizer["tokensize"], self.tokenizer["include_norm"])

    def build_model(self, hyperparameters: Mapping[str, Any] | None = None) -> nn.Module:
        """A fresh network of the zoo's architecture, with a row's activation and dropout."""
        hyperparameters = hyperparameters or {}
        kwargs = {
            name: value.item() if isinstance(value, torch.Tensor) else value
            for name in ("activation", "dropout")
            if (value := hyperparameters.get(name)) is not None
        }
        return build_model(
            self.zoo["architecture"], **self.zoo.get("architecture_kwargs", {}), **kwargs
        )

    def decode(self, tokens: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """De-normalize one row's tokens ``[N, T]`` and decode them into a state_dict."""
        tokens = torch.as_tensor(tokens, dtype=torch.float32)
        weights = unstandardize_tokens(tokens, *self._token_maps)
        return self.build_tokenizer().decode(weights, self.layout, fill_from=self._skipped_fill())

    @cached_property
    def _token_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalization.token_maps(self.layout)

    def _skipped_fill(self) -> nn.Module | None:
        """Tensors left out of the tokens (``include_norm=False``) come from a fresh model."""
        return self.build_model() if self.layout.skipped else None


class ZooDataset(NamedTuple):
    """A zoo dataset and its description, as returned by `load_zoo_dataset`."""

    splits: DatasetDict
    metadata: ZooMetadata


def zoo_metadata(dataset: ZooDataset | DatasetDict | Dataset) -> ZooMetadata:
    """The `ZooMetadata` of a `ZooDataset`, or the one stored in a dataset's ``info.description``."""
    from datasets import DatasetDict

    if isinstance(dataset, ZooDataset):
        return dataset.metadata
    split = dataset[next(iter(dataset))] if isinstance(dataset, DatasetDict) else dataset
    try:
        return ZooMetadata.from_json(split.info.description or "")
    except json.JSONDecodeError:
        raise ValueError(
            "this dataset carries no zoo description (info.description is not sane-hf JSON): "
            "build it with build_zoo_dataset or load it with load_zoo_dataset"
        ) from None


# ----------------------------------------------------------------------------------------------
# Columns: fixed ones, and inferred ones for free-form metadata (hyperparameters, metrics, ...)


def attach_metadata(dataset: DatasetDict, metadata: ZooMetadata) -> None:
    """Store ``metadata`` as JSON in every split's ``info.description`` (what `zoo_metadata` reads)."""
    description = metadata.to_json()
    for split in dataset.values():
        split.info.description = description


def _check_architecture(metadata: ZooMetadata, where: str) -> None:
    """The described architecture must build, and tokenize to the stored layout (an edited
    ``num_classes`` or an unknown architecture would otherwise fail only when decoding, or in
    pretraining)."""
    architecture = metadata.zoo.get("architecture")
    try:
        # a check must not move the global RNG: a run seeded before loading its zoo would
        # otherwise initialize its model differently from one that loaded it elsewhere
        with torch.random.fork_rng(devices=[]):
            model = metadata.build_model()
    except Exception as error:  # unknown name, bad kwargs: whatever the builder raises
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{where}: zoo architecture {architecture!r} with "
            f"{metadata.zoo.get('architecture_kwargs', {})} cannot be built ({message})"
        ) from None
    layout = metadata.build_tokenizer().layout(model)
    if layout.to_dict() != metadata.layout.to_dict():
        raise ValueError(
            f"{where}: the layout does not match the zoo architecture {architecture!r} with "
            f"{metadata.zoo.get('architecture_kwargs', {})} ({layout.num_tokens} tokens vs "
            f"{metadata.layout.num_tokens} stored, or other parameter shapes)"
        )


def check_zoo_dataset(splits: DatasetDict, metadata: ZooMetadata, where: str) -> None:
    """Refuse (``ValueError``, one line naming ``where`` and the problem) a description that does
    not fit its rows: non-finite or non-positive normalization statistics, statistics for other
    parameters than the layout's, overlapping split lists or lists that differ from the rows'
    model ids, or a layout whose token count or size differs from the stored tokens.

    Decoding with a wrong description yields silently wrong (or NaN) weights; these checks cost
    one pass over the ``model_id`` column and one row.
    """
    tokenized = [spec.key for layer in metadata.layout.layers for spec in layer.parameters]
    try:
        metadata.normalization.check(tokenized)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    _check_architecture(metadata, where)
    listed = metadata.split.get("models", {})
    reference = metadata.alignment.get("reference_model_id")
    if metadata.alignment.get("aligned") and reference not in listed.get("train", []):
        raise ValueError(
            f"{where}: the alignment reference {reference!r} is not a model of the train split "
            "(a reference must be a training checkpoint)"
        )
    if set(listed) != set(splits):
        raise ValueError(
            f"{where}: split lists {sorted(listed)} but the dataset has {sorted(splits)}"
        )
    owner: dict[str, str] = {}
    for split, model_ids in listed.items():
        for model_id in model_ids:
            if model_id in owner:
                raise ValueError(
                    f"{where}: model {model_id!r} is listed in {owner[model_id]!r} and {split!r}"
                )
            owner[model_id] = split
    for split, rows in splits.items():
        found = set(rows.unique("model_id"))
        if found != set(listed[split]):
            extra, missing = sorted(found - set(listed[split])), sorted(set(listed[split]) - found)
            raise ValueError(
                f"{where}: split {split!r} lists other models than its rows (rows only: "
                f"{extra[:3]}, list only: {missing[:3]})"
            )
        tokens = rows.features.get("tokens")
        size = getattr(tokens, "shape", (None, None))[-1]
        if size != metadata.layout.tokensize or metadata.tokenizer.get("tokensize") != size:
            raise ValueError(
                f"{where}: layout tokensize {metadata.layout.tokensize} (tokenizer "
                f"{metadata.tokenizer.get('tokensize')}) does not match the {split!r} tokens of size {size}"
            )
        if len(rows) and len(rows[0]["counts"]) != metadata.layout.num_tokens:
            raise ValueError(
                f"{where}: the layout has {metadata.layout.num_tokens} tokens per model, the "
                f"{split!r} rows have {len(rows[0]['counts'])}"
            )


__all__ = [
    "ZooDataset",
    "ZooMetadata",
    "attach_metadata",
    "check_zoo_dataset",
    "zoo_metadata",
]
