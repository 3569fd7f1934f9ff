"""Zoos of several architectures as one `datasets` dataset, in universal tokens.

``build_mixed_dataset([zoo_a, zoo_b, ...])`` reads raw zoo directories of different
architectures and tokenizes every checkpoint with one `TokenScheme` (nothing fitted on the
zoos: no statistics, no alignment reference). Every row names its architecture, whose build
name, kwargs and row layout are in the metadata, so any row decodes into a module:

    network_id str, architecture str, model_id str, epoch int32,
    tokens Array2D[(None, T), float32], positions Array2D[(None, 3), int32]
    (depth bucket, layer type, index in layer), counts list[int16] (real values per token),
    scales list[float32] (one per layer; decode multiplies by them), seed int64 and the
    accuracy columns of the raw zoos.

Sequences differ in length between architectures; ``counts`` is the mask. Splits are by model
and stratified by architecture: each zoo's models are split 70/15/15 with `split_models`.
The metadata (``sane_mixed.json`` beside the Arrow files) holds the scheme and the
architectures.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Array2D, Dataset, DatasetDict, Features, List, Value, load_from_disk
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from sane_hf.weights.alignment import PermutationSpec
from sane_hf.weights.layout import WeightLayout
from sane_hf.weights.universal import TokenScheme, UniversalTokenizer, UniversalTokens
from sane_hf.zoo.architectures import build_model
from sane_hf.zoo.dataset import SPLITS, split_models
from sane_hf.zoo.formats import (
    MIXED_METADATA_FILE,
    RAW_METADATA_FILE,
    atomic_write_text,
    check_checkpoint_tensors,
    load_zoo_info,
    load_zoo_metadata,
    resolve_in_zoo,
)
from sane_hf.zoo.population import structural_kwargs

PROPERTIES = ("train_acc", "val_acc", "test_acc", "test_loss", "ggap")


@dataclass
class MixedArchitecture:
    """One architecture of a mixed dataset: how to build it and its row layout."""

    architecture: str
    architecture_kwargs: dict[str, Any]
    layout: WeightLayout
    zoo: dict[str, Any] = field(default_factory=dict)  # task: dataset, input shape, kwargs

    def build(self) -> nn.Module:
        return build_model(self.architecture, **self.architecture_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "architecture_kwargs": self.architecture_kwargs,
            "layout": self.layout.to_dict(),
            "zoo": self.zoo,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixedArchitecture:
        return cls(
            data["architecture"],
            dict(data["architecture_kwargs"]),
            WeightLayout.from_dict(data["layout"]),
            dict(data.get("zoo", {})),
        )


@dataclass
class MixedMetadata:
    """The scheme and the architectures of a mixed dataset; decodes its rows."""

    scheme: TokenScheme
    architectures: dict[str, MixedArchitecture]

    @property
    def tokenizer(self) -> UniversalTokenizer:
        return UniversalTokenizer(self.scheme)

    def decode(self, row: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """A row's state_dict (``tokens``, ``scales`` and ``architecture`` of the row)."""
        entry = self.architectures[row["architecture"]]
        tokens = torch.as_tensor(row["tokens"], dtype=torch.float32)
        scales = torch.as_tensor(row["scales"], dtype=torch.float32)
        return self.tokenizer.decode(tokens, entry.layout, scales)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": "sane_hf.MixedZoo",
                "scheme": self.scheme.to_dict(),
                "architectures": {name: a.to_dict() for name, a in self.architectures.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> MixedMetadata:
        data = json.loads(text)
        if data.get("format") != "sane_hf.MixedZoo":
            raise ValueError(f"not a mixed zoo description (format {data.get('format')!r})")
        architectures = {
            name: MixedArchitecture.from_dict(entry)
            for name, entry in data["architectures"].items()
        }
        return cls(TokenScheme.from_dict(data["scheme"]), architectures)


@dataclass
class MixedZooDataset:
    splits: DatasetDict
    metadata: MixedMetadata


def is_mixed_dataset(path: str | os.PathLike) -> bool:
    return (Path(path) / MIXED_METADATA_FILE).is_file()


def universal_row(tokens: UniversalTokens) -> dict[str, Any]:
    """The token columns of a row."""
    return {
        "tokens": tokens.tokens.numpy(),
        "positions": tokens.positions.to(torch.int32).numpy(),
        "counts": tokens.counts.tolist(),
        "scales": tokens.scales.tolist(),
    }


def _features(tokensize: int) -> Features:
    return Features(
        {
            "network_id": Value("string"),
            "architecture": Value("string"),
            "model_id": Value("string"),
            "epoch": Value("int32"),
            "tokens": Array2D((None, tokensize), "float32"),
            "positions": Array2D((None, 3), "int32"),
            "counts": List(Value("int16")),
            "scales": List(Value("float32")),
            "seed": Value("int64"),
            **{name: Value("float64") for name in PROPERTIES},
        }
    )


def build_mixed_dataset(
    raw_zoo_dirs: Sequence[str | os.PathLike],
    scheme: TokenScheme | None = None,
    *,
    names: Sequence[str] | None = None,
    epochs: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> MixedZooDataset:
    """One dataset of the checkpoints of several raw zoos (see the module docstring).

    ``names`` name the architectures (default: each zoo folder's name, or its parent's when the
    folder is called ``zoo``); ``epochs`` keeps only these checkpoint epochs.
    """
    scheme = scheme or TokenScheme()
    names = list(names) if names is not None else [_zoo_name(Path(d)) for d in raw_zoo_dirs]
    if len(names) != len(raw_zoo_dirs) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct name per zoo, got {names}")
    tokenizer = UniversalTokenizer(scheme)
    architectures, rows = {}, {split: [] for split in SPLITS}
    for name, raw_dir in zip(names, raw_zoo_dirs):
        zoo = load_zoo_info(raw_dir)
        records = [r for r in load_zoo_metadata(raw_dir) if epochs is None or r["epoch"] in epochs]
        if not records:
            raise ValueError(f"{raw_dir}: no checkpoints (epochs {epochs})")
        kwargs = {**zoo.get("architecture_kwargs", {}), **_structural_kwargs(records, raw_dir)}
        module = build_model(zoo["architecture"], **kwargs)
        layout = tokenizer.layout(module)
        spec = PermutationSpec.from_model(module) if scheme.alignment == "canonical" else None
        architectures[name] = MixedArchitecture(
            zoo["architecture"],
            kwargs,
            layout,
            {
                **{k: zoo.get(k) for k in ("dataset", "input_shape", "num_classes")},
                "config": {"dataset_kwargs": zoo.get("config", {}).get("dataset_kwargs", {})},
            },
        )
        split_of = {
            model: split
            for split, models in split_models([r["model_id"] for r in records], seed).items()
            for model in models
        }
        bar = tqdm(records, desc=f"tokenizing {name}", unit="checkpoint", disable=not progress)
        for record in bar:
            state_dict = _load_checkpoint(Path(raw_dir), record, layout, module)
            row = {
                "network_id": f"{name}/{record['model_id']}_epoch_{record['epoch']}",
                "architecture": name,
                "model_id": f"{name}/{record['model_id']}",
                "epoch": record["epoch"],
                "seed": record.get("seed", -1),
                **{key: _number(record.get(key)) for key in PROPERTIES},
                **universal_row(tokenizer(state_dict, spec)),
            }
            rows[split_of[record["model_id"]]].append(row)
    features = _features(scheme.tokensize)
    splits = DatasetDict(
        {split: Dataset.from_list(r, features=features) for split, r in rows.items() if r}
    )
    return MixedZooDataset(splits, MixedMetadata(scheme, architectures))


def save_mixed_dataset(dataset: MixedZooDataset, path: str | os.PathLike) -> None:
    """Save splits and ``sane_mixed.json`` to ``path`` (through a temporary folder)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    dataset.splits.save_to_disk(str(partial))
    atomic_write_text(partial / MIXED_METADATA_FILE, dataset.metadata.to_json())
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)


def load_mixed_dataset(path: str | os.PathLike) -> MixedZooDataset:
    path = Path(path)
    if not is_mixed_dataset(path):
        raise ValueError(f"{path}: not a mixed zoo dataset (no {MIXED_METADATA_FILE})")
    metadata = MixedMetadata.from_json((path / MIXED_METADATA_FILE).read_text())
    return MixedZooDataset(load_from_disk(str(path)), metadata)


def padded_split(split: Dataset) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tokens [C, N, T]``, ``counts [C, N]``, ``positions [C, N, 3]`` and ``lengths [C]`` of a
    mixed split, padded to its longest network."""
    data = split.with_format("numpy", columns=["tokens", "counts", "positions"])
    lengths = [len(counts) for counts in split["counts"]]
    longest, tokensize = max(lengths), split.features["tokens"].shape[1]
    tokens = torch.zeros(len(split), longest, tokensize)
    counts = torch.zeros(len(split), longest, dtype=torch.long)
    positions = torch.zeros(len(split), longest, 3, dtype=torch.long)
    for index in range(len(split)):
        row, length = data[index], lengths[index]
        tokens[index, :length] = torch.from_numpy(np.asarray(row["tokens"], dtype=np.float32))
        counts[index, :length] = torch.from_numpy(np.asarray(row["counts"], dtype=np.int64))
        positions[index, :length] = torch.from_numpy(np.asarray(row["positions"], dtype=np.int64))
    return tokens, counts, positions, torch.tensor(lengths)


def _load_checkpoint(
    root: Path, record: Mapping[str, Any], layout: WeightLayout, module: nn.Module
) -> dict[str, torch.Tensor]:
    where = f"checkpoint of model {record['model_id']!r} ({root / RAW_METADATA_FILE})"
    path = resolve_in_zoo(root, record["file"], where)
    state_dict = load_file(path)
    layout.check_compatible(state_dict)
    float_keys = [k for k, v in module.state_dict().items() if v.is_floating_point()]
    check_checkpoint_tensors(state_dict, float_keys, f"checkpoint {path}")
    return state_dict


def _structural_kwargs(records: Sequence[Mapping[str, Any]], raw_dir: Any) -> dict[str, Any]:
    """The module-changing hyperparameters (activation, dropout) every model of a zoo shares:
    the architecture a row decodes into must compute what the trained network computed."""
    found = {
        json.dumps(structural_kwargs(r["hyperparameters"]), sort_keys=True)
        for r in records
        if "hyperparameters" in r
    }
    if len(found) > 1:
        raise ValueError(
            f"{raw_dir}: models differ in activation or dropout ({sorted(found)}); build one "
            "zoo per setting so that each architecture of the mixed dataset is one module"
        )
    return json.loads(found.pop()) if found else {}


def _zoo_name(path: Path) -> str:
    return path.parent.name if path.name == "zoo" else path.name


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


__all__ = [
    "MixedArchitecture",
    "MixedMetadata",
    "MixedZooDataset",
    "build_mixed_dataset",
    "is_mixed_dataset",
    "load_mixed_dataset",
    "padded_split",
    "save_mixed_dataset",
    "universal_row",
]
