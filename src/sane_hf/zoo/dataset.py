"""Model zoos as Hugging Face `datasets`: split, aligned, normalized and tokenized once.

`build_zoo_dataset` turns a raw zoo directory (``zoo.json``, ``metadata.jsonl``,
``checkpoints/*.safetensors``, see `sane_hf.zoo.importing`) into a ``DatasetDict`` with one row per
checkpoint, so training SANE reads memory-mapped Arrow instead of re-doing the preprocessing:

- split 70/15/15 **by model** (all checkpoints of a model in one split), from sorted model ids
  and a seeded permutation, so the split does not depend on file-system or metadata order;
- every model aligned to one reference (the first training model's last checkpoint) by weight
  matching; the permutation is computed once per model, on one epoch, and applied to all;
- per-parameter standardization with statistics of the **training split only** (the reference
  implementation computes them per split, which leaks test weights into the inputs);
- tokenization with `sane_hf.weights.tokenization.WeightTokenizer`.

The layout, the normalization statistics, the zoo description and the preprocessing settings
travel with the data: as JSON in every split's ``info.description`` and as ``sane_zoo.json``
beside the Arrow files on disk and in the Hub repo. `build_zoo_dataset` and `load_zoo_dataset`
both return a `ZooDataset` (``.splits``, ``.metadata``); the metadata's ``decode`` turns a row's
tokens back into a state_dict. Saving and loading (atomic swaps, fingerprints, checks) are in
`sane_hf.zoo.storage`.

The raw zoo is read as untrusted input: every ``file`` must stay inside the zoo folder, weights
must be floating point where the architecture's are and finite (errors name file, model and
parameter), and a zoo whose training or import has not finished is refused unless
``allow_incomplete=True``.

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
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

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
)
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import get_temporary_cache_files_directory
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from tqdm.auto import tqdm

from sane_hf.weights.alignment import PermutationSpec, apply_permutation
from sane_hf.weights.alignment import align as weight_match
from sane_hf.weights.normalization import (
    NormalizationStats,
    standardize_tokens,
)
from sane_hf.weights.tokenization import DEFAULT_TOKENSIZE, WeightTokenizer
from sane_hf.zoo.architectures import build_model
from sane_hf.zoo.distributed import (
    WorkerReports,
    children_die_with_this_process,
    die_with_parent,
    shared_progress,
)
from sane_hf.zoo.formats import (
    RAW_METADATA_FILE,
    check_checkpoint_tensors,
    check_model_id,
    load_zoo_info,
    load_zoo_metadata,
    resolve_in_zoo,
)
from sane_hf.zoo.metadata import ZooDataset, ZooMetadata, attach_metadata
from sane_hf.zoo.statistics import zoo_statistics
from sane_hf.zoo.storage import content_fingerprint

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
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
# Folders that only exist while a raw zoo is being written (train_zoo's and import_zoo's state).
UNFINISHED_MARKERS = ("train_state", ".import_progress")


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
        self.float_keys = [
            key for key, value in self.model.state_dict().items() if value.is_floating_point()
        ]
        self.positions = self.layout.positions().to(torch.int32).numpy()
        self.counts = self.layout.row_counts().numpy()
        self.spec: PermutationSpec | None = None
        self.reference: dict[str, torch.Tensor] | None = None
        self.normalization: NormalizationStats | None = None
        self.mean = self.std = None  # per-value maps [N, T] of the normalization

    def load(self, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The checkpoint of ``record``, read only from inside the zoo folder, checked against
        the architecture: keys and shapes, float dtypes (never cast) and finite values."""
        where = f"{self.root / RAW_METADATA_FILE}, model {record['model_id']!r}"
        path = resolve_in_zoo(self.root, record["file"], where)
        try:
            state_dict = load_file(path)
            self.layout.check_compatible(state_dict)
        except Exception as error:  # missing/corrupt file or another architecture
            raise ValueError(f"checkpoint {path} (model {record['model_id']!r}): {error}") from None
        check_checkpoint_tensors(
            state_dict, self.float_keys, f"checkpoint {path} (model {record['model_id']!r})"
        )
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
    *,
    records_by_model: Mapping[str, list[dict]],
    encoder: _ZooEncoder,
    columns: Mapping[str, _Column],
    alignment_epoch: int | None,
    reports: WorkerReports,
    threads: int | None,
) -> Iterator[dict[str, Any]]:
    """The rows of ``model_ids`` in order; run in a worker process of a parallel build (a
    contiguous share of the models each, so the concatenated shards keep the serial order)."""
    if threads is not None:  # a worker: its share of the cores, not all of them
        die_with_parent()  # and it ends with the build, also a killed one
        torch.set_num_threads(threads)
    try:
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
                reports.update(1)
    except ValueError as error:  # bad input: its one-line message goes back to the caller
        reports.fail(str(error))
        raise
    reports.flush()


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
    tokensize: int = DEFAULT_TOKENSIZE,
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
    allow_incomplete: bool = False,
    num_proc: int | None = None,
) -> ZooDataset:
    """Split, align, normalize and tokenize a raw zoo into a ``DatasetDict`` (one row per checkpoint).

    Args:
        raw_zoo_dir: directory with ``zoo.json``, ``metadata.jsonl`` and the checkpoints.
        tokensize, include_norm: `WeightTokenizer` settings (`DEFAULT_TOKENSIZE`, 289, fits the CNN zoos). With
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
        allow_incomplete: build from the finished models of a zoo whose training or import
            stopped half-way (by default such a zoo is refused: its splits would silently
            change once the rest is finished).
        num_proc: align and tokenize with this many worker processes (``datasets``' own
            ``num_proc``; each split's models are shared out in contiguous blocks). The rows, the
            description and the fingerprint are those of a serial build: every checkpoint is
            encoded on its own, and the fingerprint is derived from the inputs, not the run.

    Returns:
        `ZooDataset` (like `load_zoo_dataset`): ``.splits`` the ``DatasetDict`` with
        ``train``/``validation``/``test``, ``.metadata`` the layout, normalization statistics and
        settings (also stored in every split's ``info.description``).
    """
    root = Path(raw_zoo_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {list(TOKEN_DTYPES)}, got {dtype!r}")
    zoo = load_zoo_info(root)
    all_metadata = load_zoo_metadata(root)
    if not allow_incomplete:
        _check_complete(root, zoo, all_metadata)
    for record in all_metadata:  # every file is confined before any is read
        check_model_id(record.get("model_id"), str(root / RAW_METADATA_FILE))
        resolve_in_zoo(
            root, record.get("file"), f"{root / RAW_METADATA_FILE}, model {record['model_id']!r}"
        )
    records_by_model = _group_records(all_metadata, epochs)
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
    cache_dir = cache_dir or _temporary_cache_dir()
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
    num_proc = _check_num_proc(num_proc)
    if num_proc is not None:  # its helper processes end with the build, also a killed one
        children_die_with_this_process()
    dataset = DatasetDict()
    with (
        shared_progress(len(all_records), "tokenizing checkpoints", progress, num_proc) as reports,
        _datasets_progress_bars_hidden(),
    ):
        generate = partial(
            _generate_rows,
            records_by_model=records_by_model,
            encoder=encoder,
            columns=columns,
            alignment_epoch=alignment_epoch,
            reports=reports,
            threads=None if num_proc is None else max(1, (os.cpu_count() or 1) // num_proc),
        )
        for split, model_ids in splits.items():
            records = [record for model_id in model_ids for record in records_by_model[model_id]]
            try:
                dataset[split] = Dataset.from_generator(
                    generate,
                    features=features,
                    cache_dir=str(cache_dir),
                    split=split,
                    gen_kwargs={"model_ids": list(model_ids)},
                    num_proc=None if num_proc is None else min(num_proc, len(model_ids)),
                    fingerprint=content_fingerprint(metadata, split, records, root),
                    writer_batch_size=writer_batch_size,
                )
            except DatasetGenerationError:  # our one-line message, not datasets' wrapper
                if reports.errors:
                    raise ValueError(reports.errors[0]) from None
                raise
    attach_metadata(dataset, metadata)
    return ZooDataset(dataset, metadata)


# The lock files of this process's temporary build caches, held until it exits: a later build
# removes only caches whose owner is gone (a killed build leaves its Arrow files behind).
_HELD_CACHES: list[FileLock] = []
CACHE_PREFIX = "sane_zoo_"
CACHE_LOCK_FILE = ".owner.lock"


def _temporary_cache_dir() -> str:
    """A fresh cache folder for the Arrow files of a build (in datasets' temporary folder,
    removed when this process exits normally), after removing those of killed builds."""
    for stale in Path(tempfile.gettempdir()).glob(f"hf_datasets-*/{CACHE_PREFIX}*"):
        if not (stale / CACHE_LOCK_FILE).is_file():  # being made, or not made by this rule
            continue
        lock = FileLock(stale / CACHE_LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:  # a running process's build (or its dataset, memory-mapped)
            continue
        except OSError:
            continue
        lock.release()
        shutil.rmtree(stale, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=CACHE_PREFIX, dir=get_temporary_cache_files_directory())
    lock = FileLock(Path(folder) / CACHE_LOCK_FILE, timeout=0)
    lock.acquire()
    _HELD_CACHES.append(lock)
    return folder


def _check_num_proc(num_proc: int | None) -> int | None:
    """``None`` for a serial build, else the number of worker processes (refused below 1)."""
    if num_proc is None:
        return None
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc must be a whole number >= 1 (or None), got {num_proc!r}")
    return None if num_proc == 1 else num_proc


def _check_complete(root: Path, zoo: Mapping[str, Any], records: Sequence[Mapping]) -> None:
    """Refuse a raw zoo whose training or import is unfinished (see ``allow_incomplete``)."""
    problems = [f"{name}/ is present" for name in UNFINISHED_MARKERS if (root / name).exists()]
    expected = zoo.get("num_models")
    found = len({record.get("model_id") for record in records})
    if isinstance(expected, int) and found < expected:
        problems.append(f"{found} of the {expected} models in {root / 'zoo.json'} are finished")
    if problems:
        raise ValueError(
            f"{root} is an unfinished zoo ({'; '.join(problems)}): rerun the training or import "
            "to finish it, or pass allow_incomplete=True (--allow-incomplete) to build from the "
            "finished models"
        )


__all__ = ["build_zoo_dataset", "split_models"]
