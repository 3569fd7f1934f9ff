"""The one home of sane-hf's on-disk zoo formats: file names, readers and atomic writers.

A **raw zoo** is a folder written by `train_zoo` or `import_zoo` and read by `build_zoo_dataset`::

    zoo.json            what the zoo is: architecture (+ kwargs), dataset, kind, epochs, config
    metadata.jsonl      one JSON record per checkpoint: file, model_id, epoch, seed, properties
    checkpoints/        <model_id>_epoch_<epoch:03d>.safetensors

A **zoo dataset** (`save_zoo_dataset`) is a `datasets.DatasetDict` folder plus
``sane_zoo.json`` (`ZooMetadata`: layout, normalization, splits, zoo description).

Every file is written through a temporary file in the same folder and `os.replace`d, so a reader
(or a process killed half-way) never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ZOO_FILE = "zoo.json"
RAW_METADATA_FILE = "metadata.jsonl"
CHECKPOINT_DIR = "checkpoints"
DATASET_METADATA_FILE = "sane_zoo.json"
# Beside a SANE model: the processor's alignment target and the fitted property probes.
ALIGNMENT_REFERENCE_FILE = "alignment_reference.safetensors"
PROBE_HEADS_FILE = "probe_heads.safetensors"
PROBE_HEADS_CONFIG_FILE = "probe_heads.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
        file.write(text)
        temporary = Path(file.name)
    os.replace(temporary, path)


def atomic_save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file`` through a temporary file (a crash leaves no half file)."""
    temporary = path.with_name(path.name + ".tmp")
    save_file({key: value.contiguous() for key, value in state_dict.items()}, temporary)
    os.replace(temporary, path)


def checkpoint_file_name(model_id: str, epoch: int) -> str:
    """Path of a checkpoint inside a raw zoo directory, as written in ``metadata.jsonl``."""
    return f"{CHECKPOINT_DIR}/{model_id}_epoch_{epoch:03d}.safetensors"


def load_zoo_info(raw_zoo_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``zoo.json`` of a raw zoo directory."""
    path = Path(raw_zoo_dir) / ZOO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a raw zoo directory needs a {ZOO_FILE}")
    return json.loads(path.read_text())


def load_zoo_metadata(raw_zoo_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``metadata.jsonl`` of a raw zoo directory: one dict per checkpoint, in file order."""
    path = Path(raw_zoo_dir) / RAW_METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a raw zoo directory needs a {RAW_METADATA_FILE}"
        )
    return read_json_lines(path)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
    return records
