"""Read networks from what a user has: modules, state_dicts, files, folders, zoos, Hub ids.

`SaneProcessor` and the ``embed``/``predict`` commands accept any mix of these; everything is
turned into ``(network id, state_dict)`` pairs here, in a stable order, so ids in the results
say which input each row came from:

- ``nn.Module`` / state_dict: ``network_<i>`` (``i`` counts the inputs);
- ``.safetensors`` file: its file name without the suffix; a ``.pt``/``.pth``/``.bin`` state_dict
  the same, read with ``torch.load(weights_only=True)`` (no pickled code runs; anything but a
  dict of tensors is refused with how to convert it);
- a raw zoo folder (``zoo.json``): every checkpoint of ``metadata.jsonl``, as ``<model>_epoch_<e>``,
  each ``file`` confined to the zoo folder as for ``zoo build`` (`resolve_in_zoo`, all checked
  before any is read);
- a zoo dataset folder (``sane_zoo.json``) or a zoo split (``datasets.Dataset``): every row,
  decoded back into weights with the zoo's own statistics, as ``<model>_epoch_<e>``;
- a mixed zoo dataset folder (``sane_mixed.json``): every row decoded into its architecture,
  as ``<zoo>/<model>_epoch_<e>``;
- any other folder: its ``*.safetensors`` files, sorted by name (else its torch state_dicts);
- a Hub id (``owner/name``, not an existing path): a zoo dataset repo, else a model repo's
  ``*.safetensors`` files;
- `NamedWeights`: a state_dict that keeps the id it was read with (networks already read here
  and handed on, e.g. one process' share of a multi-process run).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from huggingface_hub import HfApi, snapshot_download
from torch import nn

from sane_hf.utils.sources import missing_local_path
from sane_hf.zoo.formats import (
    DATASET_METADATA_FILE,
    MIXED_METADATA_FILE,
    RAW_METADATA_FILE,
    ZOO_FILE,
    check_model_id,
    load_zoo_metadata,
    read_safetensors,
    resolve_in_zoo,
)
from sane_hf.zoo.import_readers import CheckpointProblem, load_torch_checkpoint
from sane_hf.zoo.metadata import zoo_metadata

# State dicts saved with torch.save, read with torch.load(weights_only=True).
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class NamedWeights:
    """A network read by `iter_networks`, with its id: read again, it keeps that id."""

    network_id: str
    state_dict: dict[str, torch.Tensor]


if TYPE_CHECKING:  # `datasets` costs a second of start-up; networks from files need none of it
    from datasets import Dataset, DatasetDict

NetworkInput = Union[  # the datasets types by name: they are not imported
    nn.Module, Mapping[str, torch.Tensor], str, os.PathLike, "Dataset", "DatasetDict", NamedWeights
]


def is_dataset(value: Any, class_name: str = "Dataset") -> bool:
    """Whether ``value`` is a ``datasets.Dataset`` (or another class of `datasets` by name),
    without importing `datasets` (a second of start-up for networks read from files): while
    nothing has imported it, nothing can be one."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(value, getattr(datasets, class_name))


def iter_networks(
    networks: NetworkInput | Iterable[NetworkInput],
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """``(network id, state_dict)`` of every network in ``networks`` (one input or many)."""
    inputs = [networks] if _is_single(networks) else list(networks)
    if not inputs:
        raise ValueError("no networks given")
    for index, item in enumerate(inputs):
        yield from _read(item, index)


def _is_single(item: Any) -> bool:
    single = isinstance(item, nn.Module | Mapping | str | os.PathLike | NamedWeights)
    return single or is_dataset(item) or is_dataset(item, "DatasetDict")


def _read(item: Any, index: int) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    if isinstance(item, nn.Module):
        yield f"network_{index}", {k: v.detach() for k, v in item.state_dict().items()}
    elif is_dataset(item, "DatasetDict"):
        for split in item.values():
            yield from _zoo_rows(split)
    elif is_dataset(item):
        yield from _zoo_rows(item)
    elif isinstance(item, Mapping):
        _check_state_dict(item, f"input {index}")
        yield f"network_{index}", dict(item)
    elif isinstance(item, NamedWeights):
        _check_state_dict(item.state_dict, item.network_id)
        yield item.network_id, dict(item.state_dict)
    elif isinstance(item, str | os.PathLike):
        yield from _read_path(item)
    else:
        raise TypeError(
            f"input {index}: expected an nn.Module, a state_dict, a .safetensors path, a folder, "
            f"a zoo (dataset) or a Hub id, got {type(item).__name__}"
        )


def _check_state_dict(state_dict: Mapping, where: str) -> None:
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: state_dict entry {key!r} is a {type(value).__name__}")


def _read_path(item: str | os.PathLike) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    path = Path(item)
    if path.suffix == ".safetensors" and path.exists():
        yield path.stem, read_safetensors(path)
    elif path.is_file():
        yield path.stem, _read_file(path)
    elif path.is_dir():
        yield from _read_folder(path)
    elif (problem := missing_local_path(str(item))) is not None:
        raise FileNotFoundError(f"{item}: {problem}")
    elif _looks_like_hub_id(str(item)):
        yield from _read_hub(str(item))
    else:
        raise FileNotFoundError(f"{item}: no such file or folder (and not a Hub id owner/name)")


def _read_folder(path: Path) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    if (path / DATASET_METADATA_FILE).is_file():
        from sane_hf.zoo.storage import load_zoo_dataset

        for split in load_zoo_dataset(path).splits.values():
            yield from _zoo_rows(split)
    elif (path / MIXED_METADATA_FILE).is_file():
        from sane_hf.zoo.mixed import load_mixed_dataset

        mixed = load_mixed_dataset(path)
        for split in mixed.splits.values():
            for row in split.select_columns(["network_id", "architecture", "tokens", "scales"]):
                yield row["network_id"], mixed.metadata.decode(row)
    elif (path / ZOO_FILE).is_file():
        files = _raw_zoo_files(path)
        for file in files:
            yield file.stem, read_safetensors(file)
    else:
        files = sorted(path.glob("*.safetensors")) or sorted(
            file for file in path.iterdir() if file.suffix in TORCH_SUFFIXES
        )
        if not files:
            raise FileNotFoundError(
                f"{path} holds no .safetensors or {'/'.join(TORCH_SUFFIXES)} file (nor "
                f"{ZOO_FILE} or {DATASET_METADATA_FILE})"
            )
        for file in files:
            yield file.stem, _read_file(file)


def _raw_zoo_files(root: Path) -> list[Path]:
    """The checkpoint files of a raw zoo, every one confined to its folder before any is read
    (the rule of ``zoo build``: a crafted ``metadata.jsonl`` reads nothing outside the zoo)."""
    where = str(root / RAW_METADATA_FILE)
    files = []
    for record in load_zoo_metadata(root):
        model_id = check_model_id(record.get("model_id"), where)
        files.append(resolve_in_zoo(root, record.get("file"), f"{where}, model {model_id!r}"))
    return files


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors file, or from a torch.save file without running any of
    its pickled code (``weights_only=True``)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"{path}: networks are read from .safetensors files or state_dicts saved with "
            f"torch.save ({', '.join(TORCH_SUFFIXES)})"
        )
    try:
        return load_torch_checkpoint(path)
    except CheckpointProblem as problem:
        reason = str(problem).splitlines()[0]
        if "Weights only load failed" in reason:  # torch's long explanation of the refusal
            reason = "it pickles more than tensors, e.g. a whole nn.Module"
        raise ValueError(
            f"{path}: not a state_dict that torch.load(weights_only=True) reads ({reason}); "
            "convert it where it was saved: safetensors.torch.save_file(model.state_dict(), "
            f"'{path.stem}.safetensors')"
        ) from None


def _zoo_rows(split: Dataset) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Rows of a zoo split decoded into weights with the zoo's own statistics and layout."""
    metadata = zoo_metadata(split)
    rows = split.select_columns(["model_id", "epoch", "tokens"]).with_format("torch")
    for row in rows:
        yield f"{row['model_id']}_epoch_{int(row['epoch']):03d}", metadata.decode(row["tokens"])


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _read_hub(repo_id: str) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """A zoo dataset repo (it has ``sane_zoo.json``), else the ``.safetensors`` of a model repo."""
    from sane_hf.zoo.storage import load_zoo_dataset

    api = HfApi()
    if api.repo_exists(repo_id, repo_type="dataset") and api.file_exists(
        repo_id, DATASET_METADATA_FILE, repo_type="dataset"
    ):
        for split in load_zoo_dataset(repo_id).splits.values():
            yield from _zoo_rows(split)
        return
    folder = snapshot_download(repo_id, allow_patterns=["*.safetensors"])
    yield from _read_folder(Path(folder))
