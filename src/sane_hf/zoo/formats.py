"""The one home of sane-hf's on-disk zoo formats: file names, readers and atomic writers.

A **raw zoo** is a folder written by `train_zoo` or `import_zoo` and read by `build_zoo_dataset`::

    zoo.json            what the zoo is: architecture (+ kwargs), dataset, kind, epochs, config
    metadata.jsonl      one JSON record per checkpoint: file, model_id, epoch, seed, properties
    checkpoints/        <model_id>_epoch_<epoch:03d>.safetensors

A **zoo dataset** (`save_zoo_dataset`) is a `datasets.DatasetDict` folder plus
``sane_zoo.json`` (`ZooMetadata`: layout, normalization, splits, zoo description).

Every file is written through a temporary file in the same folder and `os.replace`d, so a reader
(or a process killed half-way) never sees half a file; files get the permissions of the user's
umask, like any file the user writes.

Paths that come from zoo metadata (``model_id``, ``file``) are untrusted input: model ids must
match `MODEL_ID_PATTERN` and every ``file`` must resolve inside its zoo folder
(`resolve_in_zoo`), so a crafted ``metadata.jsonl`` can neither read nor write outside it.
A raw zoo folder has one writer at a time: `zoo_writer_lock` (a `filelock` lock file,
released by the OS when its process dies) refuses a second `train_zoo`/`import_zoo` at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

ZOO_FILE = "zoo.json"
RAW_METADATA_FILE = "metadata.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Each chunk's training state (weights, optimizer, records) at its last epoch, kept so that a
# zoo trained for E epochs extends to more exactly as if it had been planned longer.
FINAL_STATE_DIR = "final_state"
DATASET_METADATA_FILE = "sane_zoo.json"
# Beside the Arrow files of a dataset of several architectures (sane_hf.zoo.mixed).
MIXED_METADATA_FILE = "sane_mixed.json"
# Beside a SANE model: the processor's alignment target and the fitted property probes.
ALIGNMENT_REFERENCE_FILE = "alignment_reference.safetensors"
PROBE_HEADS_FILE = "probe_heads.safetensors"
PROBE_HEADS_CONFIG_FILE = "probe_heads.json"
# Beside a SANE model: what AutoProcessor(trust_remote_code=True) runs (it points to sane-hf).
REMOTE_PROCESSOR_FILE = "processing_sane.py"
IN_DISTRIBUTION_FILE = "in_distribution.safetensors"
IN_DISTRIBUTION_CONFIG_FILE = "in_distribution.json"
LOCK_FILE = ".sane_zoo.lock"
# A pretraining output folder (checkpoints, metrics.jsonl, the final model) has one run at a time.
PRETRAINING_LOCK_FILE = ".sane_pretraining.lock"
METADATA_LOCK_FILE = ".sane_zoo.metadata.lock"
# Model ids become file names: letters, digits, '.', '_', '-', not starting with a separator.
MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ZooBusyError(RuntimeError):
    """Another process is writing the same zoo folder."""


@contextlib.contextmanager
def zoo_writer_lock(folder: str | os.PathLike, lock_file: str = LOCK_FILE) -> Iterator[None]:
    """Hold the writer lock of ``folder`` (created if needed); refuse at once if another holds it.

    ``lock_file`` names the lock: `LOCK_FILE` for zoo folders and zoo datasets,
    `PRETRAINING_LOCK_FILE` for pretraining output folders.

    Refusing rather than waiting: a second writer of the same zoo is almost always a mistake (two
    terminals, a restarted job while the old one still runs), and waiting for a multi-hour
    training would look like a hang. The lock is an OS file lock, so a killed owner releases it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ZooBusyError(
            f"{folder} is being written by another process (it holds {folder / lock_file}): "
            "wait until it finishes, or write to another folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def zoo_metadata_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Wait for and hold the short lock around one read-modify-write of ``metadata.jsonl``: the
    processes of one multi-process run (which share the writer lock) take turns with it."""
    with FileLock(Path(folder) / METADATA_LOCK_FILE):
        yield


def check_model_id(model_id: Any, where: str) -> str:
    """``model_id`` if it is safe as a file name (`MODEL_ID_PATTERN`), else ``ValueError``."""
    if not isinstance(model_id, str) or not MODEL_ID_PATTERN.fullmatch(model_id):
        raise ValueError(
            f"{where}: model_id {model_id!r} is not allowed (use letters, digits, '.', '_' and "
            "'-', starting with a letter or digit)"
        )
    return model_id


def resolve_in_zoo(root: str | os.PathLike, file: Any, where: str) -> Path:
    """The path of ``file`` (relative, from zoo metadata) inside ``root``; ``ValueError`` if it is
    not a relative path that stays inside ``root`` after resolving ``..`` and symlinks."""
    root = Path(root).resolve()
    if not isinstance(file, str) or not file or Path(file).is_absolute():
        raise ValueError(f"{where}: file {file!r} must be a path relative to the zoo folder {root}")
    path = (root / file).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{where}: file {file!r} points outside the zoo folder {root}")
    return path


def check_checkpoint_tensors(
    state_dict: Mapping[str, torch.Tensor], float_keys: Iterable[str], where: str
) -> None:
    """``ValueError`` naming ``where`` (file, model id) and the parameter if a tensor the
    architecture holds as floating point is not floating point, or holds NaN/Inf.

    Integer weights would otherwise be cast to float tokens silently (and decoded as floats).
    """
    for key in float_keys:
        value = state_dict.get(key)
        if value is None:
            continue
        if not value.is_floating_point():
            raise ValueError(f"{where}: parameter {key!r} has dtype {value.dtype}, expected float")
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(
                f"{where}: parameter {key!r} has non-finite values (NaN/Inf) in {bad} of "
                f"{value.numel()} entries"
            )


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
        file.write(text)
        temporary = Path(file.name)
    apply_umask(temporary)  # NamedTemporaryFile creates 0600 files
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that needs a file name (parquet, numpy),
    moved over ``path`` when the block ends; removed if it fails or is interrupted, so
    ``path`` is always the previous complete file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        apply_umask(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def apply_umask(path: Path, directory: bool = False) -> None:
    """Give ``path`` the permissions the user's umask gives a new file (or folder): temporary
    files and folders are created private (0600/0700), the zoos and datasets made from them
    should not be."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (threads may be writing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file`` through a temporary file (a crash leaves no half file),
    with the permissions of the user's umask (safetensors writes its files 0600)."""
    temporary = path.with_name(path.name + ".tmp")
    save_file({key: value.contiguous() for key, value in state_dict.items()}, temporary)
    apply_umask(temporary)
    os.replace(temporary, path)


def read_safetensors(path: str | os.PathLike, where: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; ``ValueError`` naming the file (and ``where``)
    when it is not a regular file or not a complete safetensors file (truncated, empty, another
    format), instead of the library's message without the file's name."""
    path = Path(path)
    label = f"{path}" + (f" ({where})" if where else "")
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise ValueError(f"{label}: expected a .safetensors file, found {what}")
    try:
        return load_file(path)
    except Exception as error:  # SafetensorError (header, truncation), OSError
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{label}: not a complete safetensors file ({detail}); is it truncated or corrupt?"
        ) from None


def checkpoint_file_name(model_id: str, epoch: int) -> str:
    """Path of a checkpoint inside a raw zoo directory, as written in ``metadata.jsonl``."""
    check_model_id(model_id, "checkpoint name")
    return f"{CHECKPOINT_DIR}/{model_id}_epoch_{epoch:03d}.safetensors"


def write_checkpoint(
    root: str | os.PathLike, model_id: str, epoch: int, state_dict: Mapping[str, torch.Tensor]
) -> str:
    """Save one checkpoint of a raw zoo atomically under its canonical name; return that name
    (the ``file`` of its ``metadata.jsonl`` record)."""
    file = checkpoint_file_name(model_id, epoch)
    path = Path(root) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(dict(state_dict), path)
    return file


def write_zoo_metadata(root: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite ``metadata.jsonl`` atomically with ``records`` (one JSON line each, in order)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write_text(Path(root) / RAW_METADATA_FILE, text)


def write_zoo_info(root: str | os.PathLike, info: Mapping[str, Any]) -> None:
    """Write ``zoo.json`` atomically."""
    atomic_write_text(Path(root) / ZOO_FILE, json.dumps(info, indent=2) + "\n")


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
