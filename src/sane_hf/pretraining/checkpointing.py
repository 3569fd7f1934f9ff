"""Training checkpoints in safe formats: tensors in safetensors, everything else in JSON.

Accelerate's ``save_state`` writes the optimizer, the schedule and the RNG states with
``torch.save`` (pickle). A checkpoint folder here holds instead:

- ``model.safetensors``: the model's full state dict;
- ``optimizer.safetensors``: every tensor of the optimizer's per-parameter state, named
  ``<parameter name>.<state name>`` (``encoder.layers.0.mlp.fc1.weight.exp_avg``), and
  ``optimizer.json``: the parameter groups (parameters by name) and any non-tensor state;
- ``training_state.json``: the step counters, the learning-rate schedule and the fp16 loss
  scaler;
- ``rng_state_<rank>.safetensors`` and ``rng_state_<rank>.json``: each process's torch
  generator states (CPU and CUDA; dropout draws from them), and Python's and NumPy's.

The folders of a run: ``checkpoint-<step>/``, written as ``checkpoint-<step>.partial/`` and
renamed when complete, so a kill leaves no half checkpoint under the final name; `resolve_checkpoint`
picks the newest complete one for ``latest``. `save_run_config` keeps a resumed run on the config
it was started with.

Model and optimizer go through ``torch.distributed.checkpoint``'s full state dicts, keyed by
parameter name: one process, DDP and FSDP write the same files (FSDP gathers the shards onto the
main process, which writes them), and every process reads them back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.zoo.formats import atomic_save_safetensors

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_SUFFIX = ".partial"
CONFIG_FILE = "pretraining_config.yaml"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_FILE = "optimizer.json"
TRAINING_STATE_FILE = "training_state.json"
# Whole tensors keyed by parameter name, gathered onto the main process' host memory (the other
# processes get nothing): the same files from one process, DDP and FSDP.
FULL_STATE_DICT = StateDictOptions(full_state_dict=True, cpu_offload=True)


def plain_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module inside Accelerate's wrappers (DDP, and ``torch.compile``'s, whose parameter
    names start with ``_orig_mod.``): what checkpoints and saved models are keyed by."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def full_model_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, Any]:
    """The prepared model's whole state dict on the main process (empty on the others)."""
    return get_model_state_dict(plain_model(accelerator, model), options=FULL_STATE_DICT)


def flatten_optimizer_state(
    state_dict: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict keyed by parameter name into named tensors and JSON data."""
    tensors, other = {}, {}
    for name, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.contiguous()
            else:
                other.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": other}


def unflatten_optimizer_state(
    tensors: dict[str, torch.Tensor], data: dict[str, Any]
) -> dict[str, Any]:
    """The inverse of `flatten_optimizer_state` (state names hold no dots; parameter names may)."""
    state = {name: dict(values) for name, values in data["state"].items()}
    for key, tensor in tensors.items():
        name, _, entry = key.rpartition(".")
        state.setdefault(name, {})[entry] = tensor
    return {"state": state, "param_groups": data["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's generator states: torch's as uint8 tensors, Python's and NumPy's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, keys, gauss = random.getstate()
    kind, np_keys, position, has_gauss, cached_gauss = np.random.get_state()
    data = {
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": np_keys.tolist(),
            "position": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gauss,
        },
    }
    return tensors, data


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(tensors["torch_cpu"])
    for key, state in tensors.items():
        if key.startswith("torch_cuda_"):
            torch.cuda.set_rng_state(state, int(key.removeprefix("torch_cuda_")))
    python = data["python"]
    random.setstate((python["version"], tuple(python["keys"]), python["gauss"]))
    numpy = data["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            np.array(numpy["keys"], dtype=np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rng_state_{rank}.safetensors", folder / f"rng_state_{rank}.json"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def save_training_state(
    folder: str | os.PathLike,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    counters: dict[str, int],
) -> None:
    """Write a checkpoint of a prepared model and optimizer; every process must call it.

    ``counters`` (e.g. ``{"step": 200}``) go to ``training_state.json`` as they are.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_state, optimizer_state = get_state_dict(
        plain_model(accelerator, model),
        getattr(optimizer, "optimizer", optimizer),  # the torch optimizer inside Accelerate's
        options=FULL_STATE_DICT,
    )
    rng_tensors, rng_data = rng_state()
    tensors_file, json_file = _rng_files(folder, accelerator.process_index)
    atomic_save_safetensors(rng_tensors, tensors_file)
    _write_json(json_file, rng_data)
    if accelerator.is_main_process:
        atomic_save_safetensors(model_state, folder / MODEL_FILE)
        optimizer_tensors, optimizer_data = flatten_optimizer_state(optimizer_state)
        atomic_save_safetensors(optimizer_tensors, folder / OPTIMIZER_TENSORS_FILE)
        _write_json(folder / OPTIMIZER_FILE, optimizer_data)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {**counters, "scheduler": scheduler.state_dict(), "scaler": scaler}
        _write_json(folder / TRAINING_STATE_FILE, state)
    accelerator.wait_for_everyone()


def load_training_state(
    folder: str | os.PathLike,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, int]:
    """Restore a `save_training_state` checkpoint in place; returns its counters."""
    folder = Path(folder)
    tensors_file, json_file = _rng_files(folder, accelerator.process_index)
    if not tensors_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no RNG state of process {accelerator.process_index}: resume with the "
            "number of processes that wrote the checkpoint"
        )
    optimizer_state = unflatten_optimizer_state(
        load_file(folder / OPTIMIZER_TENSORS_FILE),
        json.loads((folder / OPTIMIZER_FILE).read_text()),
    )
    set_state_dict(
        plain_model(accelerator, model),
        getattr(optimizer, "optimizer", optimizer),
        model_state_dict=load_file(folder / MODEL_FILE),
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True),
    )
    state = json.loads((folder / TRAINING_STATE_FILE).read_text())
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler = state.pop("scaler")
    if (scaler is None) != (accelerator.scaler is None):
        raise ValueError(
            f"{folder} was saved {'without' if scaler is None else 'with'} an fp16 loss scaler: "
            "resume with the mixed_precision it was trained with"
        )
    if scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    set_rng_state(load_file(tensors_file), json.loads(json_file.read_text()))
    return state


def checkpoint_is_complete(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds every file the main process writes (and rank 0's RNG)."""
    folder = Path(folder)
    needed = (MODEL_FILE, OPTIMIZER_TENSORS_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE)
    return all((folder / name).is_file() for name in (*needed, *map(str, _rng_files(Path(), 0))))


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a ``checkpoint-<step>`` folder was saved at."""
    name = Path(path).name
    if not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX) :].isdigit():
        raise ValueError(f"{path} is not a checkpoint folder (expected {CHECKPOINT_PREFIX}<step>)")
    return int(name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary ``.partial`` folders excluded)."""
    folders = Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
    return sorted(
        (f for f in folders if f.name[len(CHECKPOINT_PREFIX) :].isdigit()), key=checkpoint_step
    )


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf: the run stopped before saving such a model."""


def check_finite_loss(
    accelerator: Accelerator, running: torch.Tensor, step: int, output_dir: str | os.PathLike
) -> None:
    """Stop the run (`NonFiniteLossError`, on every process) when the loss terms summed since
    the last log hold NaN/Inf, before a checkpoint or the model is saved with such weights: the
    last good checkpoint stays the newest one, for a resume with other settings."""
    total = accelerator.reduce(running.clone(), "sum")
    if bool(torch.isfinite(total).all()):
        return
    saved = list_checkpoints(output_dir)
    kept = (
        f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved before it"
    )
    raise NonFiniteLossError(
        f"the training loss became non-finite (NaN/Inf) by step {step}: lower the learning rate "
        f"or enable clipping (max_grad_norm); {kept}"
    )


def resolve_checkpoint(config: PretrainingConfig) -> Path:
    """The folder ``resume_from_checkpoint`` points to (``latest``: the newest complete one in
    output_dir; incomplete ones, e.g. of a run killed by an older version, are skipped with a
    warning)."""
    if config.resume_from_checkpoint != "latest":
        path = Path(config.resume_from_checkpoint)
        checkpoint_step(path)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint folder at {path}")
        if not checkpoint_is_complete(path):
            raise ValueError(f"resume_from_checkpoint: {path} is incomplete (a killed save)")
        return path
    for checkpoint in reversed(list_checkpoints(config.output_dir)):
        if checkpoint_is_complete(checkpoint):
            return checkpoint
        logger.warning(f"skipping the incomplete checkpoint {checkpoint} (a killed save)")
    raise FileNotFoundError(
        f"resume_from_checkpoint=latest: no complete checkpoint in {config.output_dir}"
    )


def save_checkpoint(
    accelerator: Accelerator,
    config: PretrainingConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
) -> None:
    """Training state at ``step`` to ``output_dir/checkpoint-<step>``, dropping the oldest beyond
    ``checkpoints_total_limit``.

    Every process writes into ``checkpoint-<step>.partial``; the main process renames it once
    all files are there, so a kill at any point leaves either no checkpoint or a whole one.
    """
    folder = Path(config.output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed save
    accelerator.wait_for_everyone()
    save_training_state(partial, accelerator, model, optimizer, scheduler, {"step": step})
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)  # a checkpoint of a run resumed before it
        partial.rename(folder)
        if config.checkpoints_total_limit:
            for old in list_checkpoints(config.output_dir)[: -config.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_run_config(config: PretrainingConfig, checkpoint: Path | None, write: bool) -> None:
    """Check a resume against the config its run was started with, and write
    ``pretraining_config.yaml`` (when ``write``: on the main process; every process checks, so
    all of them stop alike).

    A new run writes its config. A resume keeps the original (of ``output_dir``, else of the
    checkpoint's run) and must match it (`PretrainingConfig.changed_fields`) unless
    ``allow_config_change``; then the changed config is kept beside the original as
    ``pretraining_config.resume-<step>.yaml``.
    """
    saved_file = Path(config.output_dir) / CONFIG_FILE
    original = saved_file if saved_file.is_file() else None
    if checkpoint is not None and original is None:
        original = (
            checkpoint.parent / CONFIG_FILE if (checkpoint.parent / CONFIG_FILE).is_file() else None
        )
    changed = []
    if checkpoint is not None and original is not None:
        changed = config.changed_fields(yaml.safe_load(original.read_text()) or {})
    if changed and not config.allow_config_change:
        raise ValueError(
            f"resume from {checkpoint} with changed settings {changed} (the run's are in "
            f"{original}): resume with those, or pass --allow-config-change"
        )
    if not write:
        return
    if checkpoint is None or not saved_file.is_file():
        config.save(saved_file)
    if changed:
        logger.warning(f"resuming with changed settings {changed} (allow_config_change)")
        step = checkpoint_step(checkpoint)
        config.save(saved_file.with_name(f"pretraining_config.resume-{step}.yaml"))
