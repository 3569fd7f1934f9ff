"""Train model zoos: populations of one architecture, many models at once.

Protocol (Schürholt et al. 2022, "Model Zoos"):

- *seed zoo*: fixed hyperparameters, ``num_models`` seeds (``seed``, ``seed + 1``, ...). The
  defaults are the paper's MNIST setting: tanh, uniform init, Adam lr 3e-4, no weight decay,
  batch 10, 50 epochs.
- *hyperparameter zoo*: the product of ``grid`` (activation x dropout x init x optimizer x lr x
  weight decay) times ``seeds_per_combination`` seeds, optionally sub-sampled to ``num_models``
  models with a seeded draw.

Every model has its own seed, which fixes its initialization (``torch.manual_seed(seed)`` before
building and initializing it) and the order it sees the training data in (``data_order``).
Checkpoints are kept at ``checkpoint_epochs`` (always including epoch 0, the initialization, and
the last epoch) with train/validation/test loss and accuracy.

Speed: models that share their module structure (activation, dropout) and optimizer are trained
together. Their parameters are stacked into ``[M, ...]`` tensors and one training step is
``vmap(grad(loss))`` over ``torch.func.functional_call``: every model gets its own batch (gathered
from the in-memory dataset by per-model index tensors), its own dropout masks
(``randomness="different"``) and its own BatchNorm running statistics (stacked buffers updated in
place). Adam/AdamW/SGD are applied to the stacked tensors with a learning rate and weight decay per
model, so a group can mix lr/wd values. ``models_per_chunk`` bounds how many models are in memory.
On CPU, plain ``nn.Sequential`` networks of convolutions, linear, pooling, activation and dropout
layers (CNN-s, CNN-m, MLPs) skip vmap: they run as one network of grouped layers whose
activations stay ``[batch, models * channels, ...]`` (`sane_hf.zoo.grouped`, ~2x faster). With
``keep_freed_memory=True`` freed activation memory is also kept on the heap instead of being
returned to the OS after every step (a third of a CNN-s step on CPU), a glibc setting of the
whole process and therefore opt-in. The chunk trainer lives in `sane_hf.zoo.population`.
Stacked conv weights and batches are kept channels-last (oneDNN's fast grouped convolutions).
``bf16=True`` autocasts to bfloat16 (meant for GPUs; same accuracy on digits). On machines shared
with other jobs, set ``OMP_WAIT_POLICY=PASSIVE`` before starting Python: spinning OpenMP threads
of different processes slow each other down several times.

Output: the raw zoo directory (read by the dataset builder)::

    ZOO/zoo.json            architecture, architecture_kwargs, dataset, kind, epochs, num_classes,
                            input_shape, dataset_info, config
    ZOO/metadata.jsonl      one JSON object per checkpoint (file, model_id, epoch, seed, metrics,
                            ggap = train_acc - test_acc, hyperparameters)
    ZOO/checkpoints/<model_id>_epoch_<e:03d>.safetensors   full state_dict (nn.Module key names)
    ZOO/train_state/        while training: the state of the chunk in progress

Seeds: ``seed`` is the *first* seed; a seed zoo of ``num_models`` models uses seeds ``seed`` to
``seed + num_models - 1`` (a hyperparameter zoo ``seed`` to ``seed + seeds_per_combination - 1``
per combination). Two seed zoos with overlapping seed ranges and the same recipe share those
models byte for byte: to get independent zoos, start the second one past the first one's range.

One writer per zoo: `train_zoo` holds the folder's lock (`sane_hf.zoo.formats.zoo_writer_lock`)
for the whole run, so a second process on the same folder is refused at once with a
`ZooBusyError` instead of duplicating records or deleting the first one's ``train_state/``.

Several processes: under ``torchrun``/``accelerate launch`` (``python -m sane_hf zoo train``) the
chunks are dealt to the ranks (`sane_hf.zoo.distributed`); the zoo is byte-identical to a
one-process zoo, and a killed run resumes with any number of processes.

Resuming: metadata.jsonl only ever holds finished models (it is rewritten atomically when a chunk
finishes), so the models it lists are never retrained. The chunk in progress saves its stacked
parameters, buffers and optimizer state at every checkpoint epoch, so rerunning ``train_zoo`` with
the same config continues from there, bit-exactly on CPU (GPU kernels are not guaranteed to be
deterministic). ``device``, ``models_per_chunk`` and ``eval_batch_size`` may change between runs;
a chunk whose composition changed restarts from its initialization. Which models share a chunk
changes the floating-point summation order (and the dropout masks, drawn from the global generator
seeded per chunk and epoch), so results are reproducible for a given config, not across chunk
sizes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sane_hf.zoo.architectures import build_model
from sane_hf.zoo.config import (
    DEFAULT_INPUT_SHAPES,
    INPUT_KWARGS,
    ModelSpec,
    ZooConfig,
)
from sane_hf.zoo.distributed import Ranks, RunProgress, my_share, run_lock, zoo_processes
from sane_hf.zoo.formats import (
    CHECKPOINT_DIR,
    FINAL_STATE_DIR,
    RAW_METADATA_FILE,
    ZOO_FILE,
    load_zoo_metadata,
    write_zoo_info,
    write_zoo_metadata,
    zoo_metadata_lock,
)
from sane_hf.zoo.grouped import keep_freed_memory_on_the_heap
from sane_hf.zoo.population import (
    ChunkTrainer,
    steps_per_epoch,
    structural_kwargs,
)
from sane_hf.zoo.tasks import ImageDataset, load_dataset_by_name

# Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = ("device", "models_per_chunk", "eval_batch_size")


def train_zoo(
    config: ZooConfig,
    output_dir: str | Path,
    dataset: ImageDataset | None = None,
    progress: bool = True,
    keep_freed_memory: bool = False,
) -> Path:
    """Train (or resume) the zoo described by ``config`` into the raw zoo directory ``output_dir``.

    ``dataset`` overrides ``config.dataset`` (e.g. user tensors from ``dataset_from_tensors``).
    ``keep_freed_memory=True`` tunes glibc's allocator for the CPU steps (faster, but it changes
    how this whole process allocates memory; see `sane_hf.zoo.grouped`). Raises `ZooBusyError`
    if another process is writing ``output_dir``. Returns ``output_dir``.
    """
    output_dir = Path(output_dir)
    with zoo_processes() as ranks, run_lock(output_dir, ranks):
        _train_zoo(config, output_dir, dataset, progress, keep_freed_memory, ranks)
    return output_dir


def _train_zoo(
    config: ZooConfig,
    output_dir: Path,
    dataset: ImageDataset | None,
    progress: bool,
    keep_freed_memory: bool,
    ranks: Ranks,
) -> None:
    device = ranks.device(config.device)
    if dataset is None:
        dataset = load_dataset_by_name(
            config.dataset, _input_shape(config), **config.dataset_kwargs
        )
    architecture_kwargs = _architecture_kwargs(config, dataset)
    specs = config.model_specs()
    _check_architecture(config.architecture, architecture_kwargs, specs[0], dataset)
    if ranks.rank == 0:
        if not (output_dir / ZOO_FILE).exists():
            _warn_overlapping_seeds(output_dir, config)
        _start_or_resume(output_dir, _zoo_info(config, dataset, architecture_kwargs, len(specs)))
    ranks.barrier()
    finished = _finished_models(output_dir, config.epochs)
    # Planned over all models, so a chunk's composition (and with it every result) depends on
    # the config alone: not on what an interrupted run finished, nor on the number of processes.
    chunks = [
        [spec for spec in chunk if spec.model_id not in finished]
        for chunk in _plan_chunks(specs, config.models_per_chunk)
    ]
    chunks = [chunk for chunk in chunks if chunk]
    if not chunks:  # a rerun of a finished zoo: say so rather than show an empty bar
        if ranks.rank == 0:
            shutil.rmtree(_state_dir(output_dir), ignore_errors=True)  # made empty above
            print(
                f"{output_dir}: already complete ({len(specs)} models x {config.epochs} epochs), "
                "nothing to train; rerun with more --epochs to extend it",
                file=sys.stderr,
            )
        return
    # the bar (rank 0's only) counts the steps of all ranks
    total_steps = len(chunks) * config.epochs * steps_per_epoch(dataset, config.batch_size)
    chunks = my_share(chunks, ranks)
    data = dataset.to(device)
    progress = progress and ranks.rank == 0
    with (
        _population_run(device, total_steps, progress, keep_freed_memory=keep_freed_memory) as bar,
        RunProgress(bar, ranks) as run,
    ):
        for index, chunk in enumerate(chunks):
            run.set_description(f"chunk {index + 1}/{len(chunks)} ({len(chunk)} models)")
            trainer = ChunkTrainer(config, architecture_kwargs, chunk, data, device)
            state_path = _state_dir(output_dir) / f"chunk_{chunk[0].model_id}"
            _continue_from_final_state(output_dir, state_path, chunk)
            records = trainer.run(output_dir, state_path, run)
            with zoo_metadata_lock(output_dir):  # the ranks of a run take turns
                _finish_chunk(output_dir, state_path, records)
        run.wait_for_all()
    ranks.barrier()
    if ranks.rank == 0:  # left: states of chunks planned differently, if any
        shutil.rmtree(_state_dir(output_dir), ignore_errors=True)


def fine_tune_population(
    networks: Sequence[nn.Module],
    dataset: ImageDataset,
    epochs: int,
    *,
    seeds: Sequence[int],
    optimizer: str = "adam",
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    batch_size: int = 10,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Fine-tune copies of ``networks`` (one module structure) together, like a zoo chunk.

    All networks take one step per batch together (grouped layers on CPU, vmap otherwise; not
    one Python loop per network), with
    ``torch.optim``'s update rules; network ``i`` sees the training data in the order of
    ``seeds[i]`` (`data_order`). The networks themselves are not modified.

    Returns:
        Test accuracy ``[len(networks), epochs + 1]``, column 0 before any training.
    """
    if len(seeds) != len(networks) or not networks:
        raise ValueError(f"got {len(seeds)} seeds for {len(networks)} networks (need >= 1)")
    structure = network_structure(networks[0])
    odd = next((i for i, net in enumerate(networks) if network_structure(net) != structure), None)
    if odd is not None:
        raise ValueError(
            f"network {odd} differs in modules or parameter shapes from network 0: a "
            "population shares one structure (evaluate_samples groups networks by structure)"
        )
    hyperparameters = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay}
    config = ZooConfig(  # the recipe; the epochs are counted below (0: evaluation only)
        num_models=len(networks),
        hyperparameters=hyperparameters,
        epochs=max(epochs, 1),
        batch_size=batch_size,
        device=str(device),
    )
    specs = [
        ModelSpec(f"network_{i}", seed, config.hyperparameters) for i, seed in enumerate(seeds)
    ]
    device = torch.device(device)
    total_steps = epochs * steps_per_epoch(dataset, batch_size)
    with _population_run(device, total_steps, progress, "fine-tuning") as bar:
        trainer = ChunkTrainer(config, {}, specs, dataset.to(device), device, list(networks))
        accuracies = [trainer.evaluate(["test"])["test_acc"]]
        for epoch in range(1, epochs + 1):
            trainer.epoch = epoch
            trainer._train_epoch(bar)
            accuracies.append(trainer.evaluate(["test"])["test_acc"])
    return torch.stack(accuracies, dim=1).numpy()


def network_structure(network: nn.Module) -> str:
    """Modules (with their settings) and parameter shapes and dtypes of ``network``: networks
    with equal structure strings can be stacked into one population."""
    shapes = [(name, tuple(t.shape), t.dtype) for name, t in network.state_dict().items()]
    return f"{network!r}{shapes}"


@contextlib.contextmanager
def _population_run(
    device: torch.device,
    total_steps: int,
    progress: bool,
    description: str | None = None,
    keep_freed_memory: bool = False,
) -> Iterator[tqdm]:
    """Around every population training: CPU heap settings (when asked for), a progress bar over
    the steps, and the global RNG state restored afterwards (training seeds it per chunk and
    epoch)."""
    if keep_freed_memory and device.type == "cpu":
        keep_freed_memory_on_the_heap()
    with (
        tqdm(total=total_steps, desc=description, disable=not progress, unit="step") as bar,
        torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]),
    ):
        yield bar


def _input_shape(config: ZooConfig) -> tuple[int, ...] | None:
    return config.input_shape or DEFAULT_INPUT_SHAPES.get(config.architecture)


def _architecture_kwargs(config: ZooConfig, dataset: ImageDataset) -> dict[str, Any]:
    """The shape-defining kwargs: the config's, plus input size and classes for built-ins."""
    kwargs = dict(config.architecture_kwargs)
    input_kwarg = INPUT_KWARGS.get(config.architecture)
    if input_kwarg == "in_channels":
        kwargs.setdefault("in_channels", dataset.input_shape[0])
    elif input_kwarg == "in_features":
        kwargs.setdefault("in_features", math.prod(dataset.input_shape))
    if input_kwarg:
        kwargs.setdefault("num_classes", dataset.num_classes)
    return kwargs


def _check_architecture(
    architecture: str, kwargs: dict[str, Any], spec: ModelSpec, dataset: ImageDataset
) -> None:
    """Fail before training if the architecture does not map the inputs to ``num_classes`` logits."""
    sample = dataset.train[0][:2]
    try:
        model = build_model(architecture, **kwargs, **structural_kwargs(spec.hyperparameters))
        shape = tuple(model.eval()(sample).shape)
    except (TypeError, RuntimeError) as error:
        raise ValueError(
            f"architecture {architecture!r} with kwargs {kwargs} cannot be built or run on "
            f"inputs of shape {dataset.input_shape} ({dataset.name!r}): {error}"
        ) from error
    if shape != (2, dataset.num_classes):
        raise ValueError(
            f"architecture {architecture!r} returns shape {shape} for 2 inputs; expected "
            f"(2, {dataset.num_classes}) logits for {dataset.name!r}"
        )


def _plan_chunks(specs: list[ModelSpec], models_per_chunk: int) -> list[list[ModelSpec]]:
    """Group models that can share one vmapped step (same module structure and optimizer)."""
    groups: dict[tuple, list[ModelSpec]] = {}
    for spec in specs:
        hp = spec.hyperparameters
        groups.setdefault((hp["activation"], hp["dropout"], hp["optimizer"]), []).append(spec)
    return [
        group[start : start + models_per_chunk]
        for group in groups.values()
        for start in range(0, len(group), models_per_chunk)
    ]


def _zoo_info(
    config: ZooConfig, dataset: ImageDataset, architecture_kwargs: dict, num_models: int
) -> dict:
    return {
        "architecture": config.architecture,
        "architecture_kwargs": architecture_kwargs,
        "dataset": dataset.name,
        "kind": config.kind,
        "epochs": config.resolved_checkpoint_epochs,
        "num_classes": dataset.num_classes,
        "input_shape": list(dataset.input_shape),
        "num_models": num_models,
        "dataset_info": dataset.info(),
        "config": config.to_dict(),
        "protocol": "Model Zoos (Schürholt et al. 2022); trained with sane_hf.train_zoo",
    }


def _extends(old: dict, new: dict) -> bool:
    """Whether config ``new`` trains the zoo of ``old`` for more epochs, so that the longer zoo
    holds the shorter one's checkpoints unchanged (every epoch is checkpointed in both)."""
    every_epoch = old.get("checkpoint_epochs") is None and new.get("checkpoint_epochs") is None
    return every_epoch and new["epochs"] > old["epochs"]


def _start_or_resume(output_dir: Path, info: dict) -> None:
    """Write zoo.json, or check that an existing one describes the same zoo."""
    zoo_json = output_dir / ZOO_FILE
    if zoo_json.exists():
        previous = json.loads(zoo_json.read_text())
        old, new = previous.get("config", {}), info["config"]
        changed = sorted(
            k
            for k in old.keys() | new.keys()
            if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES
        )
        if changed == ["epochs"] and _extends(old, new):
            changed = []  # more epochs: every model continues from its final state
        if changed or previous.get("dataset_info") != json.loads(json.dumps(info["dataset_info"])):
            raise ValueError(
                f"{output_dir} holds a zoo trained with a different config (fields {changed or ['dataset']} "
                "differ); use another output directory or the original config to resume"
            )
    (output_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    _state_dir(output_dir).mkdir(exist_ok=True)
    write_zoo_info(output_dir, info)


def _warn_overlapping_seeds(output_dir: Path, config: ZooConfig) -> None:
    """Warn when a sibling folder holds a seed zoo of the same recipe whose seeds overlap this
    one's: models with equal seeds and recipe are identical, which is rarely intended."""
    if config.kind != "seed":
        return
    ignored = {"seed", "num_models", *_RESUMABLE_CHANGES}
    recipe = {k: v for k, v in config.to_dict().items() if k not in ignored}
    first, last = config.seed, config.seed + config.num_models - 1
    siblings = output_dir.parent.glob(f"*/{ZOO_FILE}") if output_dir.parent.is_dir() else []
    for zoo_json in sorted(siblings):
        try:
            other = json.loads(zoo_json.read_text()).get("config", {})
            other_first, other_last = other["seed"], other["seed"] + other["num_models"] - 1
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not a zoo trained by train_zoo: nothing to compare
        same_recipe = {k: v for k, v in other.items() if k not in ignored} == recipe
        if (
            same_recipe
            and other.get("kind") == "seed"
            and first <= other_last
            and other_first <= last
        ):
            warnings.warn(
                f"{zoo_json.parent} holds a seed zoo of the same recipe with seeds "
                f"{other_first}..{other_last}; this zoo's seeds {first}..{last} overlap it, and "
                f"models with equal seeds are identical (start at seed {other_last + 1} for an "
                "independent zoo)",
                stacklevel=3,
            )


def _state_dir(output_dir: Path) -> Path:
    return output_dir / "train_state"


def _finished_models(output_dir: Path, epochs: int) -> set[str]:
    """Models trained to ``epochs`` (those of a zoo being extended to more are not)."""
    last: dict[str, int] = {}
    for record in _read_metadata(output_dir):
        last[record["model_id"]] = max(record["epoch"], last.get(record["model_id"], -1))
    return {model_id for model_id, epoch in last.items() if epoch >= epochs}


def _continue_from_final_state(output_dir: Path, state_path: Path, chunk: list) -> None:
    """For a chunk trained before to fewer epochs (an extension): put its kept final state
    back where `ChunkTrainer.run` resumes from."""
    trained = {r["model_id"] for r in _read_metadata(output_dir)} & {s.model_id for s in chunk}
    if not trained:
        return
    kept = sorted((output_dir / FINAL_STATE_DIR).glob(f"{state_path.name}[._]*"))
    if not kept:
        raise ValueError(
            f"{output_dir}: cannot train models {sorted(trained)[:3]} further: their final "
            f"training state is not in {FINAL_STATE_DIR}/ (a zoo of an older sane-hf); train "
            "the longer zoo into a new folder"
        )
    state_path.parent.mkdir(exist_ok=True)
    for path in kept:
        shutil.copy2(path, state_path.parent / path.name)


def _finish_chunk(output_dir: Path, state_path: Path, records: list[dict]) -> None:
    """Add a finished chunk's records to metadata.jsonl (one atomic rewrite; an extended chunk's
    records replace its earlier ones, which they continue) and keep its state in
    ``final_state/``."""
    finished = _read_metadata(output_dir)
    new = {(r["model_id"], r["epoch"], r["file"]) for r in records}
    continued = {r["model_id"] for r in records}
    if all(
        (r["model_id"], r["epoch"], r["file"]) in new
        for r in finished
        if r["model_id"] in continued
    ):
        finished = [r for r in finished if r["model_id"] not in continued]
    if again := sorted({r["model_id"] for r in finished} & {r["model_id"] for r in records}):
        raise RuntimeError(  # the writer lock makes this impossible; never write records twice
            f"{output_dir / RAW_METADATA_FILE} already holds {again[:3]}: another process "
            "trained them; not adding their records again"
        )
    all_records = sorted([*finished, *records], key=lambda r: (r["model_id"], r["epoch"]))
    final = output_dir / FINAL_STATE_DIR
    final.mkdir(exist_ok=True)
    for path in final.glob(f"{state_path.name}[._]*"):  # the state before an extension
        path.unlink()
    for path in state_path.parent.glob(f"{state_path.name}[._]*"):
        path.replace(final / path.name)
    write_zoo_metadata(output_dir, all_records)


def _read_metadata(output_dir: Path) -> list[dict]:
    """The finished models' records (none before the first chunk finishes)."""
    if not (output_dir / RAW_METADATA_FILE).exists():
        return []
    return load_zoo_metadata(output_dir)


__all__ = [
    "fine_tune_population",
    "network_structure",
    "train_zoo",
]
