"""Model zoos as Hugging Face `datasets`: split, aligned, normalized and tokenized once.

`build_zoo_dataset` turns a raw zoo directory (``zoo.json``, ``metadata.jsonl``,
``checkpoints/*.safetensors``, see `sane_hf.zoo_import`) into a ``DatasetDict`` with one row per
checkpoint, so training SANE reads memory-mapped Arrow instead of re-doing the preprocessing:

- split 70/15/15 **by model** (all checkpoints of a model in one split), from sorted model ids
  and a seeded permutation, so the split does not depend on file-system or metadata order;
- every model aligned to one reference (the first training model's last checkpoint) by weight
  matching; the permutation is computed once per model, on one epoch, and applied to all;
- per-parameter standardization with statistics of the **training split only** (the reference
  implementation computes them per split, which leaks test weights into the inputs);
- tokenization with `sane_hf.tokenization.WeightTokenizer`.

The layout, the normalization statistics, the zoo description and the preprocessing settings
travel with the data: as JSON in every split's ``info.description`` and as ``sane_zoo.json``
beside the Arrow files on disk and in the Hub repo. `load_zoo_dataset` returns them as a
`ZooMetadata`, whose ``decode`` turns a row's tokens back into a state_dict.

Row schema (``T`` = token size, ``N`` = tokens per model)::

    model_id str, epoch int32, tokens Array2D[(None, T), float32|float16] (normalized),
    positions Array2D[(None, 3), int32] (global, layer, row index), counts list[int16] (real
    values per token; the mask is ``arange(T) < counts[:, None]``), seed int64,
    train_loss/train_acc/val_loss/val_acc/test_loss/test_acc/ggap float64 (val_* may be null),
    hyperparameters struct, and any further metadata keys (e.g. metrics struct, source str).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from datasets import (
    Array2D,
    Dataset,
    DatasetDict,
    Features,
    List,
    Value,
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    load_dataset,
    load_from_disk,
)
from datasets.fingerprint import generate_random_fingerprint, get_temporary_cache_files_directory
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    DatasetCard,
    HfApi,
    hf_hub_download,
)
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .alignment import PermutationSpec, apply_permutation
from .alignment import align as weight_match
from .architectures import build_model
from .hub import build_zoo_dataset_card
from .tokenization import WeightLayout, WeightTokenizer
from .zoo_import import atomic_write_text, load_zoo_info, load_zoo_metadata

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
METADATA_FILE = "sane_zoo.json"
METADATA_FORMAT = "sane_hf.ZooDataset"
METADATA_VERSION = 1
PROPERTY_COLUMNS = (
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "ggap",
)
# metadata.jsonl keys with a fixed column; every other key gets an inferred column.
FIXED_KEYS = ("file", "model_id", "epoch", "seed", *PROPERTY_COLUMNS)
TOKEN_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Rows are buffered in memory before Arrow writes them; keep a batch around this size.
WRITER_BATCH_BYTES = 64 * 2**20
MIN_STD = 1e-8


def split_models(
    model_ids: Iterable[str],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> dict[str, list[str]]:
    """Assign models to ``train``/``validation``/``test`` (sorted ids, then a seeded permutation).

    The train and validation sizes are rounded down, the test split takes the rest: 1000 models
    give 700/150/150, 10 models 7/1/2. Each returned list is sorted.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1):
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}"
        )
    ids = sorted(set(model_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    num_train = int(fractions[0] * len(ids))
    num_validation = int(fractions[1] * len(ids))
    bounds = (0, num_train, num_train + num_validation, len(ids))
    return {
        split: sorted(ids[i] for i in order[start:end])
        for split, start, end in zip(SPLITS, bounds[:-1], bounds[1:])
    }


def parameter_key_index(layout: WeightLayout) -> tuple[list[str], torch.Tensor]:
    """For every token value, the index of the parameter it comes from (``-1`` on padding).

    Returns ``(keys, index)`` with ``index`` a long tensor ``[N, T]``. A layer's rows are the
    concatenation of its parameters' columns (weight columns, then the bias column), cut into
    tokens of ``T`` values, so the map follows from the layout alone.
    """
    keys = [spec.key for layer in layout.layers for spec in layer.parameters]
    blocks = []
    for layer in layout.layers:
        row = torch.full((layer.tokens_per_row * layout.tokensize,), -1, dtype=torch.long)
        for spec in layer.parameters:
            start = spec.column_offset
            row[start : start + spec.columns] = keys.index(spec.key)
        blocks.append(row.view(layer.tokens_per_row, layout.tokensize).repeat(layer.rows, 1))
    return keys, torch.cat(blocks)


def standardize_tokens(
    tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(tokens - mean) / std`` in float64 with per-value maps (`NormalizationStats.token_maps`),
    rounded to the dtype of ``out`` (default: a new tensor like ``tokens``; may be ``tokens``)."""
    mean, std = mean.to(tokens.device), std.to(tokens.device)
    return _in_float64_per_sequence(tokens, out, lambda values: values.sub_(mean).div_(std))


def unstandardize_tokens(
    tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``tokens * std + mean`` in float64: the inverse of `standardize_tokens`."""
    mean, std = mean.to(tokens.device), std.to(tokens.device)
    return _in_float64_per_sequence(tokens, out, lambda values: values.mul_(std).add_(mean))


def _in_float64_per_sequence(
    tokens: torch.Tensor, out: torch.Tensor | None, update: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply the in-place ``update`` to every ``[N, T]`` sequence of ``tokens`` in float64.

    The sequences pass one at a time through a single float64 buffer: a float64 copy of all of
    them (1.2 GB for ten ResNet-18) costs more in freshly faulted-in memory than the arithmetic,
    several seconds on a 2-core machine.
    """
    if out is None:
        out = torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device)
    sequences = zip(tokens.reshape(-1, *tokens.shape[-2:]), out.view(-1, *out.shape[-2:]))
    buffer = torch.empty(tokens.shape[-2:], dtype=torch.float64, device=tokens.device)
    for source, target in sequences:
        target.copy_(update(buffer.copy_(source)))
    return out


@dataclass
class NormalizationStats:
    """Mean and standard deviation of every tokenized parameter, over the training checkpoints.

    Standardizing per parameter (not over the whole network) puts layers of very different scale
    (a 5x5 conv kernel, a 20-unit classifier, BatchNorm running variances) on one scale for the
    autoencoder; sampled tokens are mapped back with `denormalize_tokens`. A parameter whose
    values do not vary (std below 1e-8) keeps std 1: it is only centred.
    """

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def from_state_dicts(
        cls, state_dicts: Iterable[Mapping[str, torch.Tensor]], keys: Sequence[str]
    ) -> NormalizationStats:
        """Accumulate the statistics of ``keys`` over ``state_dicts`` (float64 sums, one pass)."""
        count = dict.fromkeys(keys, 0)
        total = dict.fromkeys(keys, 0.0)
        total_squares = dict.fromkeys(keys, 0.0)
        for state_dict in state_dicts:
            for key in keys:
                values = state_dict[key].double()
                count[key] += values.numel()
                total[key] += values.sum().item()
                total_squares[key] += values.square().sum().item()
        if not all(count.values()):
            raise ValueError("normalization statistics need at least one checkpoint")
        mean = {key: total[key] / count[key] for key in keys}
        std = {}
        for key in keys:
            variance = max(total_squares[key] / count[key] - mean[key] ** 2, 0.0)
            std[key] = math.sqrt(variance) if math.sqrt(variance) >= MIN_STD else 1.0
        return cls(mean, std)

    def normalize(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(w - mean) / std`` per parameter; tensors without statistics pass through."""
        return {
            key: (value - self.mean[key]) / self.std[key] if key in self.mean else value
            for key, value in state_dict.items()
        }

    def denormalize(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``w * std + mean`` per parameter: the inverse of `normalize`."""
        return {
            key: value * self.std[key] + self.mean[key] if key in self.mean else value
            for key, value in state_dict.items()
        }

    def token_maps(self, layout: WeightLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-value mean and std ``[N, T]`` (float64) for ``layout``; padding gets 0 and 1."""
        keys, index = parameter_key_index(layout)
        missing = [key for key in keys if key not in self.mean]
        if missing:
            raise KeyError(f"no normalization statistics for parameters {missing}")
        mean = torch.tensor([*(self.mean[key] for key in keys), 0.0], dtype=torch.float64)
        std = torch.tensor([*(self.std[key] for key in keys), 1.0], dtype=torch.float64)
        return mean[index], std[index]  # index -1 picks the padding entry at the end

    def normalize_tokens(self, tokens: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
        """Standardize raw tokens ``[..., N, T]`` (same as tokenizing `normalize`'s output)."""
        return standardize_tokens(tokens, *self.token_maps(layout))

    def denormalize_tokens(self, tokens: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
        """Map normalized tokens ``[..., N, T]`` back to weight scale (padding stays as given)."""
        return unstandardize_tokens(tokens, *self.token_maps(layout))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean), "std": dict(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NormalizationStats:
        return cls(mean=dict(data["mean"]), std=dict(data["std"]))


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
    """

    zoo: dict[str, Any]
    layout: WeightLayout
    normalization: NormalizationStats
    tokenizer: dict[str, Any]
    alignment: dict[str, Any]
    split: dict[str, Any]
    statistics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
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


def zoo_metadata(dataset: DatasetDict | Dataset) -> ZooMetadata:
    """The `ZooMetadata` stored in a zoo dataset's ``info.description``."""
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


@dataclass
class _Column:
    """An Arrow column for a free-form metadata key: its feature and how values are encoded.

    Lists and mixed-type values become JSON strings (``as_json``); dicts become structs.
    """

    feature: Any
    as_json: bool = False
    fields: dict[str, _Column] | None = None

    @classmethod
    def infer(cls, values: Sequence[Any], nested: bool = True) -> _Column | None:
        present = [value for value in values if value is not None]
        if nested and present and all(isinstance(value, dict) for value in present):
            names = list(dict.fromkeys(name for value in present for name in value))
            if not names:
                return None  # only empty dicts: nothing to store
            fields = {
                name: cls.infer([value.get(name) for value in present], nested=False)
                for name in names
            }
            return cls({name: column.feature for name, column in fields.items()}, fields=fields)
        if all(isinstance(value, bool) for value in present):
            return cls(Value("bool"))
        if all(isinstance(value, int) and not isinstance(value, bool) for value in present):
            return cls(Value("int64"))
        if all(isinstance(value, int | float) and not isinstance(value, bool) for value in present):
            return cls(Value("float64"))
        if all(isinstance(value, str) for value in present):
            return cls(Value("string"))
        return cls(Value("string"), as_json=True)

    def encode(self, value: Any) -> Any:
        if value is None:
            return None
        if self.fields is not None:
            return {name: column.encode(value.get(name)) for name, column in self.fields.items()}
        return json.dumps(value) if self.as_json else value


def _metadata_columns(records: Sequence[Mapping[str, Any]]) -> dict[str, _Column]:
    names = dict.fromkeys(key for record in records for key in record if key not in FIXED_KEYS)
    columns = {name: _Column.infer([record.get(name) for record in records]) for name in names}
    return {name: column for name, column in columns.items() if column is not None}


def _features(tokensize: int, dtype: str, columns: Mapping[str, _Column]) -> Features:
    return Features(
        {
            "model_id": Value("string"),
            "epoch": Value("int32"),
            "tokens": Array2D(shape=(None, tokensize), dtype=dtype),
            "positions": Array2D(shape=(None, 3), dtype="int32"),
            "counts": List(Value("int16" if tokensize < 2**15 else "int32")),
            "seed": Value("int64"),
            **{name: Value("float64") for name in PROPERTY_COLUMNS},
            **{name: column.feature for name, column in columns.items()},
        }
    )


# ----------------------------------------------------------------------------------------------
# Building


class _ZooEncoder:
    """Loads, aligns, normalizes and tokenizes the checkpoints of one zoo, model by model."""

    def __init__(self, root: Path, zoo: Mapping[str, Any], tokenizer: WeightTokenizer, dtype: str):
        self.root = root
        # One module, reused: tokenizing through it applies the module-type rules of the tokenizer.
        self.model = build_model(zoo["architecture"], **zoo.get("architecture_kwargs", {}))
        self.tokenizer = tokenizer
        self.layout = tokenizer.layout(self.model)
        self.dtype = TOKEN_DTYPES[dtype]
        self.positions = self.layout.positions().to(torch.int32).numpy()
        self.counts = self.layout.row_counts().numpy()
        self.spec: PermutationSpec | None = None
        self.reference: dict[str, torch.Tensor] | None = None
        self.normalization: NormalizationStats | None = None
        self.mean = self.std = None  # per-value maps [N, T] of the normalization

    def load(self, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        path = self.root / record["file"]
        try:
            state_dict = load_file(path)
            self.layout.check_compatible(state_dict)
        except Exception as error:  # missing/corrupt file or another architecture
            raise ValueError(f"checkpoint {path}: {error}") from None
        return state_dict

    def fit_normalization(self, records: Sequence[Mapping[str, Any]], progress: bool) -> None:
        keys = [spec.key for layer in self.layout.layers for spec in layer.parameters]
        bar = tqdm(records, desc="normalization statistics (train split)", disable=not progress)
        self.normalization = NormalizationStats.from_state_dicts(map(self.load, bar), keys)
        self.mean, self.std = self.normalization.token_maps(self.layout)

    def set_reference(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.spec = PermutationSpec.from_model(self.model)
        self.reference = state_dict

    def encode_model(
        self, records: Sequence[Mapping[str, Any]], alignment_index: int
    ) -> Iterator[np.ndarray]:
        """Tokens of every checkpoint of one model, all permuted like ``records[alignment_index]``."""
        state_dicts = [self.load(record) for record in records]
        if self.reference is not None:
            found = weight_match(state_dicts[alignment_index], self.reference, spec=self.spec)
            state_dicts = [
                apply_permutation(sd, self.spec, found.permutations) for sd in state_dicts
            ]
        for state_dict in state_dicts:
            self.model.load_state_dict(state_dict)
            tokens = self.tokenizer(self.model).tokens.double()
            yield standardize_tokens(tokens, self.mean, self.std).to(self.dtype).numpy()


def _generate_rows(
    model_ids: Sequence[str],
    records_by_model: Mapping[str, list[dict]],
    encoder: _ZooEncoder,
    columns: Mapping[str, _Column],
    alignment_epoch: int | None,
    bar: tqdm,
) -> Iterator[dict[str, Any]]:
    for model_id in model_ids:
        records = records_by_model[model_id]
        alignment_index = _alignment_index(model_id, records, alignment_epoch)
        for record, tokens in zip(records, encoder.encode_model(records, alignment_index)):
            yield {
                "model_id": model_id,
                "epoch": record["epoch"],
                "tokens": tokens,
                "positions": encoder.positions,
                "counts": encoder.counts,
                "seed": record["seed"],
                **{name: record.get(name) for name in PROPERTY_COLUMNS},
                **{name: column.encode(record.get(name)) for name, column in columns.items()},
            }
            bar.update()


def _alignment_index(model_id: str, records: Sequence[Mapping], alignment_epoch: int | None) -> int:
    """Position of the checkpoint whose permutation a model gets: its last, or a chosen epoch."""
    if alignment_epoch is None:
        return len(records) - 1
    epochs = [record["epoch"] for record in records]
    if alignment_epoch not in epochs:
        raise ValueError(
            f"{model_id} has no checkpoint at alignment_epoch={alignment_epoch} (epochs {epochs})"
        )
    return epochs.index(alignment_epoch)


def _group_records(records: Sequence[dict], epochs: Sequence[int] | None) -> dict[str, list[dict]]:
    """Checkpoints per model sorted by epoch, keeping only ``epochs`` when given."""
    by_model: dict[str, list[dict]] = {}
    for record in records:
        if epochs is None or record["epoch"] in epochs:
            by_model.setdefault(record["model_id"], []).append(record)
    for model_id, checkpoints in by_model.items():
        checkpoints.sort(key=lambda record: record["epoch"])
        seen = [record["epoch"] for record in checkpoints]
        if len(set(seen)) != len(seen):
            raise ValueError(f"metadata.jsonl lists {model_id} twice for one epoch (epochs {seen})")
    if not by_model:
        raise ValueError(f"no checkpoint left after selecting epochs {list(epochs or [])}")
    return dict(sorted(by_model.items()))  # file order must not matter, not even for float sums


def _split_zoo(
    records_by_model: Mapping[str, list], seed: int, fractions: Sequence[float]
) -> dict[str, list[str]]:
    splits = split_models(records_by_model, seed, fractions)
    if not all(splits.values()):
        sizes = {split: len(model_ids) for split, model_ids in splits.items()}
        raise ValueError(
            f"every split needs at least one model: {len(records_by_model)} models with fractions "
            f"{tuple(fractions)} give {sizes}"
        )
    return splits


def _set_reference(
    encoder: _ZooEncoder,
    records_by_model: Mapping[str, list[dict]],
    reference: str,
    alignment_epoch: int | None,
) -> dict[str, Any]:
    """Make ``reference`` (at the alignment epoch, default its last) the alignment target."""
    if reference not in records_by_model:
        raise ValueError(
            f"reference model {reference!r} is not in the zoo (or has no selected epoch)"
        )
    records = records_by_model[reference]
    record = records[_alignment_index(reference, records, alignment_epoch)]
    encoder.set_reference(encoder.load(record))
    return {"reference_model_id": reference, "reference_epoch": record["epoch"]}


@contextlib.contextmanager
def _datasets_progress_bars_hidden() -> Iterator[None]:
    """Our own bar counts checkpoints; hide datasets' per-split bars while building."""
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def build_zoo_dataset(
    raw_zoo_dir: str | os.PathLike,
    *,
    tokensize: int = 289,
    include_norm: bool = True,
    align: bool = True,
    reference: str | None = None,
    alignment_epoch: int | None = None,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    epochs: Sequence[int] | None = None,
    dtype: str | torch.dtype = "float32",
    writer_batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> DatasetDict:
    """Split, align, normalize and tokenize a raw zoo into a ``DatasetDict`` (one row per checkpoint).

    Args:
        raw_zoo_dir: directory with ``zoo.json``, ``metadata.jsonl`` and the checkpoints.
        tokensize, include_norm: `WeightTokenizer` settings (289 fits the CNN zoos). With
            ``include_norm=False`` normalization layers are not stored: decoding takes them from
            a freshly built model (BatchNorm statistics then need re-estimating).
        align: permute every model onto the ``reference`` model's ordering (weight matching).
        reference: model id of the alignment reference; default: the first (sorted) model of the
            training split.
        alignment_epoch: the epoch whose permutation every model gets, matched against the
            reference at that epoch (default: each model's last selected epoch).
        seed, split_fractions: the by-model split (see `split_models`).
        epochs: keep only checkpoints of these epochs.
        dtype: storage dtype of the tokens, ``"float32"`` or ``"float16"`` (normalized tokens
            are of order 1, so float16 loses only precision, not range).
        writer_batch_size: rows per Arrow write; default: about 64 MiB of tokens.
        cache_dir: where the Arrow files are written; default: a temporary directory that
            datasets deletes at exit (save the result with `save_zoo_dataset`).
        progress: show progress bars.

    Returns:
        ``DatasetDict`` with ``train``/``validation``/``test``; `zoo_metadata(result)` gives the
        layout, normalization statistics and settings (stored in ``info.description``).
    """
    root = Path(raw_zoo_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {list(TOKEN_DTYPES)}, got {dtype!r}")
    zoo = load_zoo_info(root)
    records_by_model = _group_records(load_zoo_metadata(root), epochs)
    splits = _split_zoo(records_by_model, seed, split_fractions)

    encoder = _ZooEncoder(root, zoo, WeightTokenizer(tokensize, include_norm), dtype_name)
    train_records = [r for model_id in splits["train"] for r in records_by_model[model_id]]
    encoder.fit_normalization(train_records, progress)
    alignment = {"aligned": align, "alignment_epoch": alignment_epoch}
    if align:
        reference = reference or splits["train"][0]
        alignment |= _set_reference(encoder, records_by_model, reference, alignment_epoch)

    all_records = [record for records in records_by_model.values() for record in records]
    columns = _metadata_columns(all_records)
    features = _features(tokensize, dtype_name, columns)
    row_bytes = encoder.layout.num_tokens * tokensize * TOKEN_DTYPES[dtype_name].itemsize
    writer_batch_size = writer_batch_size or int(min(1000, max(1, WRITER_BATCH_BYTES // row_bytes)))
    cache_dir = cache_dir or tempfile.mkdtemp(
        prefix="sane_zoo_", dir=get_temporary_cache_files_directory()
    )
    statistics = zoo_statistics(all_records, splits)
    metadata = ZooMetadata(
        # zoo.json lists the epochs of the raw zoo; the dataset's copy lists those it holds
        zoo=zoo | {"epochs": statistics["epochs"]},
        layout=encoder.layout,
        normalization=encoder.normalization,
        tokenizer={"tokensize": tokensize, "include_norm": include_norm, "dtype": dtype_name},
        alignment=alignment,
        split={"seed": seed, "fractions": list(split_fractions), "models": splits},
        statistics=statistics,
    )
    bar = tqdm(total=len(all_records), desc="tokenizing checkpoints", disable=not progress)
    dataset = DatasetDict()
    with bar, _datasets_progress_bars_hidden():
        for split, model_ids in splits.items():
            generate = partial(
                _generate_rows, model_ids, records_by_model, encoder, columns, alignment_epoch, bar
            )
            dataset[split] = Dataset.from_generator(
                generate,
                features=features,
                cache_dir=str(cache_dir),
                split=split,
                fingerprint=generate_random_fingerprint(),
                writer_batch_size=writer_batch_size,
            )
    _attach_metadata(dataset, metadata)
    return dataset


def _attach_metadata(dataset: DatasetDict, metadata: ZooMetadata) -> None:
    description = metadata.to_json()
    for split in dataset.values():
        split.info.description = description


# ----------------------------------------------------------------------------------------------
# Saving, loading, pushing


def _as_splits(dataset: DatasetDict | ZooDataset) -> tuple[DatasetDict, ZooMetadata]:
    if isinstance(dataset, ZooDataset):
        return dataset.splits, dataset.metadata
    return dataset, zoo_metadata(dataset)


def save_zoo_dataset(dataset: DatasetDict | ZooDataset, path: str | os.PathLike) -> None:
    """``save_to_disk`` plus ``sane_zoo.json`` and a dataset card (``README.md``) beside it."""
    splits, metadata = _as_splits(dataset)
    path = Path(path)
    splits.save_to_disk(str(path))
    atomic_write_text(path / METADATA_FILE, metadata.to_json() + "\n")
    build_zoo_dataset_card(metadata).save(path / "README.md")


def load_zoo_dataset(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
) -> ZooDataset:
    """Load a zoo dataset from a `save_zoo_dataset` directory (memory-mapped) or a Hub repo."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        if not (path / METADATA_FILE).is_file():
            raise FileNotFoundError(
                f"{path} has no {METADATA_FILE}: not a zoo dataset saved by save_zoo_dataset"
            )
        splits = load_from_disk(str(path))
        metadata_text = (path / METADATA_FILE).read_text()
    else:
        repo_id = str(path_or_repo_id)
        splits = load_dataset(repo_id, revision=revision, token=token)
        metadata_file = hf_hub_download(
            repo_id, METADATA_FILE, repo_type="dataset", revision=revision, token=token
        )
        metadata_text = Path(metadata_file).read_text()
    metadata = ZooMetadata.from_json(metadata_text)
    _attach_metadata(splits, metadata)
    return ZooDataset(splits, metadata)


def push_zoo_dataset(
    dataset: DatasetDict | ZooDataset,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload zoo dataset with sane-hf",
) -> CommitInfo:
    """Push the splits (parquet), then ``sane_zoo.json`` and the dataset card in one commit.

    The card keeps the ``configs``/``dataset_info`` metadata that ``push_to_hub`` wrote, so
    ``datasets.load_dataset(repo_id)`` and `load_zoo_dataset` both work on the repo.
    """
    splits, metadata = _as_splits(dataset)
    splits.push_to_hub(repo_id, private=private, token=token, commit_message=commit_message)
    existing = DatasetCard.load(repo_id, repo_type="dataset", token=token).data
    card = build_zoo_dataset_card(metadata, repo_id=repo_id, card_data=existing)
    operations = [
        CommitOperationAdd("README.md", str(card).encode()),
        CommitOperationAdd(METADATA_FILE, (metadata.to_json() + "\n").encode()),
    ]
    return HfApi(token=token).create_commit(
        repo_id, operations, commit_message=commit_message, repo_type="dataset"
    )


# ----------------------------------------------------------------------------------------------
# Statistics, summary and plot (``sane-hf zoo info``)


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


ACCURACY_COLUMNS = ["model_id", "epoch", "train_acc", "test_acc"]


def load_zoo_records(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[str]] | None]:
    """``(zoo info, records, splits)`` of a saved zoo dataset or a raw zoo directory.

    Only the metadata columns of a dataset are read (not the tokens); a raw zoo has no splits
    (``None``).
    """
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        zoo = load_zoo_dataset(path)
        records, splits = [], {}
        for split, dataset in zoo.splits.items():
            columns = dataset.select_columns(ACCURACY_COLUMNS).to_dict()
            records += [dict(zip(columns, row)) for row in zip(*columns.values())]
            splits[split] = sorted(set(columns["model_id"]))
        return zoo.metadata.zoo, records, splits
    return load_zoo_info(path), load_zoo_metadata(path), None


def plot_zoo_accuracy(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Test accuracy vs epoch: one thin line per model, the population mean and min-max band."""
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
    axes.set(xlabel="epoch", ylabel="test accuracy", title=f"{len(by_model)} models, one line each")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
