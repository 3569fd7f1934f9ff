"""Zoo datasets on disk and on the Hub: save (atomically, with a fingerprint) and load (checked).

A saved zoo dataset is a ``datasets`` ``save_to_disk`` folder plus ``sane_zoo.json`` (the
`ZooMetadata` and a fingerprint of the Arrow files) and a dataset card. Saving writes into a
temporary sibling folder and swaps it in only when complete; loading refuses Arrow files that do
not match the recorded fingerprint and a description that does not fit its rows
(`sane_hf.zoo.metadata.check_zoo_dataset`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import DatasetDict, load_dataset, load_from_disk
from huggingface_hub import hf_hub_download

from sane_hf.zoo.card import build_zoo_dataset_card
from sane_hf.zoo.formats import (
    DATASET_METADATA_FILE,
    RAW_METADATA_FILE,
    ZOO_FILE,
    apply_umask,
    atomic_write_text,
    load_zoo_info,
    load_zoo_metadata,
    resolve_in_zoo,
    zoo_writer_lock,
)
from sane_hf.zoo.metadata import (
    ZooDataset,
    ZooMetadata,
    attach_metadata,
    check_zoo_dataset,
    zoo_metadata,
)


def as_splits(dataset: DatasetDict | ZooDataset) -> tuple[DatasetDict, ZooMetadata]:
    """``(splits, metadata)`` of a `ZooDataset` or of a ``DatasetDict`` carrying its description."""
    if isinstance(dataset, ZooDataset):
        return dataset.splits, dataset.metadata
    return dataset, zoo_metadata(dataset)


# Zoo dataset folders this process is writing (`dataset_writer_lock` is reentrant per process:
# `sane-hf zoo build` holds it for the build and the save inside it).
_WRITING: set[Path] = set()


@contextlib.contextmanager
def dataset_writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """One writer per zoo dataset folder: a second build or save to ``path`` while one runs is
    refused at once (`ZooBusyError`) instead of the last swap silently winning. The lock file is
    ``.<name>.lock`` beside the folder, since saving swaps the folder itself."""
    path = Path(path).resolve()
    if path in _WRITING:
        yield
        return
    with zoo_writer_lock(path.parent, f".{path.name}.lock"):
        _WRITING.add(path)
        try:
            yield
        finally:
            _WRITING.discard(path)


def save_zoo_dataset(dataset: DatasetDict | ZooDataset, path: str | os.PathLike) -> None:
    """``save_to_disk`` plus ``sane_zoo.json`` and a dataset card (``README.md``) beside it.

    Atomic: the dataset is written into a temporary sibling folder and swapped in only when
    complete, so a process killed half-way leaves the previous dataset at ``path`` (or, killed
    between the two renames of the swap, in ``.<name>.old-*`` beside it, which
    `load_zoo_dataset` points to). ``sane_zoo.json`` is written last and records a fingerprint
    of the Arrow files that `load_zoo_dataset` checks. An existing folder that is not a zoo
    dataset is never replaced.
    """
    with dataset_writer_lock(path):
        _save_zoo_dataset(dataset, Path(path))


def _save_zoo_dataset(dataset: DatasetDict | ZooDataset, path: Path) -> None:
    splits, metadata = as_splits(dataset)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.building-*"):  # of a killed save: we hold
        shutil.rmtree(stale, ignore_errors=True)  # the folder's lock, no one else writes them
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        apply_umask(staging, directory=True)  # mkdtemp makes 0700 folders
        splits.save_to_disk(str(staging))
        build_zoo_dataset_card(metadata).save(staging / "README.md")
        recorded = dataclasses.replace(metadata, fingerprint=dataset_fingerprint(staging))
        atomic_write_text(staging / DATASET_METADATA_FILE, recorded.to_json() + "\n")
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_replaceable(path: Path) -> None:
    occupied = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if occupied and not (path / DATASET_METADATA_FILE).is_file():
        raise FileExistsError(
            f"{path} exists and is not a zoo dataset (no {DATASET_METADATA_FILE}): refusing "
            "to replace it; choose another output folder"
        )


def _swap_in(staging: Path, path: Path) -> None:
    """Move the complete ``staging`` folder to ``path``, then delete the dataset it replaces."""
    if not path.exists():
        os.replace(staging, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(staging, path)
    shutil.rmtree(old)


# Fingerprints over the Arrow files' bytes; older sane-hf versions recorded sizes only.
FINGERPRINT_PREFIX = "sha256-content:"


def dataset_fingerprint(folder: str | os.PathLike) -> str:
    """A real fingerprint of a ``save_to_disk`` folder: sha256 over each split's datasets
    fingerprint and the names and sha256 digests of its Arrow files.

    A split's datasets fingerprint is its `content_fingerprint`, so Arrow files of a build from
    other inputs or settings (or a truncated copy, or a same-size file of another build) do not
    match the ``sane_zoo.json`` written with them, while a serial and a parallel build of one zoo
    get the same fingerprint. Reading the files costs about a second per GB (and warms the page
    cache that memory-mapping them reads from anyway).
    """
    folder = Path(folder)
    splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
    parts = []
    for split in splits:
        state = json.loads((folder / split / "state.json").read_text())
        files = [entry["filename"] for entry in state["_data_files"]]
        digests = []
        for name in files:
            with (folder / split / name).open("rb") as file:
                digests.append(hashlib.file_digest(file, "sha256").hexdigest())
        parts.append([split, state["_fingerprint"], list(zip(files, digests))])
    return FINGERPRINT_PREFIX + hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# Bump when the rows a build writes change for the same inputs (the encoding, the columns).
BUILD_FORMAT = "sane_hf zoo dataset build 1"


def content_fingerprint(
    metadata: ZooMetadata, split: str, records: list[dict[str, Any]], root: str | os.PathLike
) -> str:
    """The datasets fingerprint of one split of a build, derived from what determines its rows:
    the description (layout, normalization, settings, split), the split's metadata records and
    the bytes of their checkpoint files (read from inside the raw zoo ``root``).

    Not random per run, so a build with several processes gets the fingerprint of a serial one,
    and ``datasets`` may reuse the Arrow files of an identical earlier build in the same
    ``cache_dir``.
    """
    digest = hashlib.sha256()
    for part in (BUILD_FORMAT, _package_version(), metadata.to_json(), split):
        digest.update(part.encode() + b"\0")
    for record in records:
        where = f"{Path(root) / RAW_METADATA_FILE}, model {record.get('model_id')!r}"
        path = resolve_in_zoo(root, record.get("file"), where)
        try:
            with path.open("rb") as file:
                checkpoint = hashlib.file_digest(file, "sha256").hexdigest()
        except OSError as error:
            raise ValueError(f"checkpoint {path} ({where}): {error.strerror}") from None
        digest.update(json.dumps(record, sort_keys=True).encode() + checkpoint.encode())
    return digest.hexdigest()[:32]


def _package_version() -> str:
    try:
        return importlib.metadata.version("sane-hf")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def load_zoo_dataset(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
) -> ZooDataset:
    """Load a zoo dataset from a `save_zoo_dataset` directory (memory-mapped) or a Hub repo."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        if (problem := not_a_zoo_dataset(path)) is not None:
            raise FileNotFoundError(problem)
        metadata_text = (path / DATASET_METADATA_FILE).read_text()
        _check_fingerprint(path, metadata_text)
        splits = load_from_disk(str(path))
    elif interrupted := sorted(path.parent.glob(f".{path.name}.old-*/{path.name}")):
        raise FileNotFoundError(
            f"{path} does not exist: a save over it was interrupted and the previous dataset is "
            f"in {interrupted[-1]}; move it back to {path}"
        )
    else:
        repo_id = str(path_or_repo_id)
        splits = load_dataset(repo_id, revision=revision, token=token)
        metadata_file = hf_hub_download(
            repo_id, DATASET_METADATA_FILE, repo_type="dataset", revision=revision, token=token
        )
        metadata_text = Path(metadata_file).read_text()
    try:
        metadata = ZooMetadata.from_json(metadata_text)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path_or_repo_id}: {DATASET_METADATA_FILE} is invalid ({error})"
        ) from None
    check_zoo_dataset(splits, metadata, f"{path_or_repo_id}/{DATASET_METADATA_FILE}")
    attach_metadata(splits, metadata)
    return ZooDataset(splits, metadata)


def not_a_zoo_dataset(path: Path) -> str | None:
    """What a folder that is no zoo dataset is instead, and the command that makes one (None
    for a zoo dataset folder)."""
    build = "build its dataset with `sane-hf zoo build RAW_ZOO --output DATASET`"
    if (path / "config.json").is_file() and not (path / "dataset_dict.json").is_file():
        return (
            f"{path} is a model folder (config.json), not a zoo dataset: give the zoo dataset "
            f"(a raw zoo of networks: {build})"
        )
    if (path / ZOO_FILE).is_file():
        build = build.replace("RAW_ZOO", str(path))
        return f"{path} is a raw zoo ({ZOO_FILE}), not a zoo dataset: {build}"
    if not (path / DATASET_METADATA_FILE).is_file():
        return f"{path} has no {DATASET_METADATA_FILE}: not a zoo dataset ({build})"
    return None


def _check_fingerprint(path: Path, metadata_text: str) -> None:
    """Refuse Arrow files that are not the ones ``sane_zoo.json`` was written with, and a local
    ``sane_zoo.json`` without a fingerprint of this version (removed, or an older save)."""
    try:
        recorded = json.loads(metadata_text).get("fingerprint")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path / DATASET_METADATA_FILE} is not a JSON object") from None
    if not isinstance(recorded, str) or not recorded.startswith(FINGERPRINT_PREFIX):
        raise ValueError(
            f"{path / DATASET_METADATA_FILE} records no content fingerprint of the Arrow files "
            f"(got {recorded!r}: removed, or saved by an older sane-hf): re-save the dataset "
            "with save_zoo_dataset or rebuild it"
        )
    try:
        found = dataset_fingerprint(path)
    except (OSError, KeyError, TypeError, ValueError) as error:
        found = f"unreadable ({type(error).__name__}: {error})"
    if found != recorded:
        raise ValueError(
            f"{path}: the Arrow files do not match the fingerprint in {DATASET_METADATA_FILE} "
            f"(recorded {recorded}, found {found}): the folder mixes two builds or was copied "
            "partly; rebuild or re-copy the dataset"
        )


ACCURACY_COLUMNS = ["model_id", "epoch", "train_acc", "test_acc"]


def load_zoo_records(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[str]] | None]:
    """``(zoo info, records, splits)`` of a saved zoo dataset or a raw zoo directory.

    Only the metadata columns of a dataset are read (not the tokens); a raw zoo has no splits
    (``None``).
    """
    path = Path(path)
    if (path / ZOO_FILE).is_file():
        return load_zoo_info(path), load_zoo_metadata(path), None
    if (problem := not_a_zoo_dataset(path)) is not None:
        raise FileNotFoundError(problem)
    zoo = load_zoo_dataset(path)
    records, splits = [], {}
    for split, dataset in zoo.splits.items():
        columns = dataset.select_columns(ACCURACY_COLUMNS).to_dict()
        records += [dict(zip(columns, row)) for row in zip(*columns.values())]
        splits[split] = sorted(set(columns["model_id"]))
    return zoo.metadata.zoo, records, splits


__all__ = [
    "as_splits",
    "content_fingerprint",
    "dataset_fingerprint",
    "load_zoo_dataset",
    "load_zoo_records",
    "save_zoo_dataset",
]
