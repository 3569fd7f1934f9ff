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
activations stay ``[batch, models * channels, ...]`` (``_GroupedSequential``, ~2x faster), and
freed activation memory is kept on the heap instead of being returned to the OS after every step.
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
import copy
import ctypes
import json
import math
import platform
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from sane_hf.zoo.architectures import ACTIVATIONS, build_model, initialize
from sane_hf.zoo.config import (
    DEFAULT_INPUT_SHAPES,
    INPUT_KWARGS,
    ModelSpec,
    ZooConfig,
)
from sane_hf.zoo.formats import (
    CHECKPOINT_DIR,
    RAW_METADATA_FILE,
    ZOO_FILE,
    atomic_save_safetensors,
    atomic_write_text,
)
from sane_hf.zoo.tasks import ImageDataset, load_dataset_by_name

# Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = ("device", "models_per_chunk", "eval_batch_size")
# (model, sample) pairs per evaluation forward when eval_batch_size is None: on CPU, activations
# beyond ~1k pairs fall out of cache and throughput drops by a third; GPUs want large batches.
_EVAL_PAIRS = {"cpu": 1024, "cuda": 262144}
# glibc's mallopt parameters, and the values that keep a CPU step's activations on the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED_BYTES, _MMAP_BYTES = 256 * 2**20, 32 * 2**20


def data_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The order in which the zoo model with ``seed`` visits the training samples in ``epoch``.

    Derived from ``(seed, epoch)`` alone, so it does not depend on which models share a chunk and
    a plain training loop can replay a zoo model exactly.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def structural_kwargs(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters that change the module (dropout is passed only when non-zero, since
    dropout 0 is every architecture's default and ResNets take no dropout argument)."""
    kwargs = {"activation": hyperparameters["activation"]}
    if hyperparameters["dropout"]:
        kwargs["dropout"] = hyperparameters["dropout"]
    return kwargs


def initialize_zoo_model(
    architecture: str,
    architecture_kwargs: dict[str, Any],
    hyperparameters: dict[str, Any],
    seed: int,
) -> nn.Module:
    """Build and initialize one zoo model exactly as ``train_zoo`` does (for replays and checks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(
            architecture, **architecture_kwargs, **structural_kwargs(hyperparameters)
        )
        return initialize(model, hyperparameters["init"])


def train_zoo(
    config: ZooConfig,
    output_dir: str | Path,
    dataset: ImageDataset | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume) the zoo described by ``config`` into the raw zoo directory ``output_dir``.

    ``dataset`` overrides ``config.dataset`` (e.g. user tensors from ``dataset_from_tensors``).
    Returns ``output_dir``.
    """
    output_dir = Path(output_dir)
    device = torch.device(config.device)
    if dataset is None:
        dataset = load_dataset_by_name(
            config.dataset, _input_shape(config), **config.dataset_kwargs
        )
    architecture_kwargs = _architecture_kwargs(config, dataset)
    specs = config.model_specs()
    _check_architecture(config.architecture, architecture_kwargs, specs[0], dataset)
    _start_or_resume(output_dir, _zoo_info(config, dataset, architecture_kwargs, len(specs)))
    finished = _finished_models(output_dir)
    chunks = _plan_chunks([s for s in specs if s.model_id not in finished], config.models_per_chunk)
    data = dataset.to(device)
    total_steps = len(chunks) * config.epochs * _steps_per_epoch(dataset, config.batch_size)
    with _population_run(device, total_steps, progress) as bar:
        for index, chunk in enumerate(chunks):
            bar.set_description(f"chunk {index + 1}/{len(chunks)} ({len(chunk)} models)")
            trainer = _ChunkTrainer(config, architecture_kwargs, chunk, data, device)
            state_path = _state_dir(output_dir) / f"chunk_{chunk[0].model_id}"
            _finish_chunk(output_dir, state_path, trainer.run(output_dir, state_path, bar))
    shutil.rmtree(_state_dir(output_dir))  # left: states of chunks planned differently, if any
    return output_dir


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
    total_steps = epochs * _steps_per_epoch(dataset, batch_size)
    with _population_run(device, total_steps, progress, "fine-tuning") as bar:
        trainer = _ChunkTrainer(config, {}, specs, dataset.to(device), device, list(networks))
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


def _steps_per_epoch(dataset: ImageDataset, batch_size: int) -> int:
    return math.ceil(len(dataset.train[1]) / batch_size)


@contextlib.contextmanager
def _population_run(
    device: torch.device, total_steps: int, progress: bool, description: str | None = None
) -> Iterator[tqdm]:
    """Around every population training: CPU heap settings, a progress bar over the steps, and
    the global RNG state restored afterwards (training seeds it per chunk and epoch)."""
    if device.type == "cpu":
        _keep_freed_memory_on_the_heap()
    with (
        tqdm(total=total_steps, desc=description, disable=not progress, unit="step") as bar,
        torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]),
    ):
        yield bar


def _keep_freed_memory_on_the_heap() -> None:
    """Stop glibc from handing freed activation memory back to the OS after every CPU step.

    By default glibc serves the step's multi-MB activations with fresh mmaps or trims them off
    the heap once freed, so every step page-faults them in again: a third of a CNN-s step.
    This is process-wide, like setting ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``
    before starting Python, and keeps at most ``_KEEP_FREED_BYTES`` of freed memory mapped.
    Other C libraries are left alone.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)


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


class _PopulationOptimizer:
    """Adam, AdamW or SGD with momentum on stacked parameters ``[M, ...]``, updated in place.

    Follows ``torch.optim``'s update rules (L2 weight decay added to the gradient for adam/sgd,
    decoupled decay for adamw) with a learning rate and a weight decay per model.
    """

    def __init__(self, config: ZooConfig, specs: list[ModelSpec], params: dict[str, Tensor]):
        device = next(iter(params.values())).device
        self.name = specs[0].hyperparameters["optimizer"]
        self.lr = torch.tensor([s.hyperparameters["lr"] for s in specs], device=device)
        self.weight_decay = torch.tensor(
            [s.hyperparameters["weight_decay"] for s in specs], device=device
        )
        self.beta1, self.beta2 = config.adam_betas
        self.eps = config.adam_eps
        self.momentum = config.sgd_momentum
        self.steps = 0
        slots = ("momentum",) if self.name == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state = {
            f"{slot}.{k}": torch.zeros_like(p) for slot in slots for k, p in params.items()
        }

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        self.steps += 1
        for key, param in params.items():
            shape = (-1,) + (1,) * (param.dim() - 1)
            lr, weight_decay = self.lr.view(shape), self.weight_decay.view(shape)
            update = self._sgd if self.name == "sgd" else self._adam
            update(key, param, grads[key], lr, weight_decay)

    def _sgd(self, key: str, param: Tensor, grad: Tensor, lr: Tensor, weight_decay: Tensor) -> None:
        grad = grad + weight_decay * param
        if self.momentum:
            grad = self.state[f"momentum.{key}"].mul_(self.momentum).add_(grad)
        param.sub_(lr * grad)

    def _adam(
        self, key: str, param: Tensor, grad: Tensor, lr: Tensor, weight_decay: Tensor
    ) -> None:
        if self.name == "adamw":
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
        exp_avg, exp_avg_sq = self.state[f"exp_avg.{key}"], self.state[f"exp_avg_sq.{key}"]
        exp_avg.lerp_(grad, 1 - self.beta1)
        exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias_correction1 = 1 - self.beta1**self.steps
        bias_correction2_sqrt = math.sqrt(1 - self.beta2**self.steps)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param.sub_((lr / bias_correction1) * exp_avg / denom)


# Layers that act on every channel on its own: they run unchanged on grouped activations.
_PER_CHANNEL_LAYERS = (
    nn.Identity,
    nn.Dropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    *ACTIVATIONS.values(),
)
_CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class _GroupedSequential:
    """``M`` stacked copies of an ``nn.Sequential`` run as one network of grouped layers.

    vmap turns a convolution of stacked models into one grouped convolution, but then moves the
    model dimension next to the batch dimension for the following layer (bias, pooling), which
    copies the largest activations several times per step: on CPU those copies cost as much as
    the convolutions. Here activations stay ``[batch, M * channels, ...]`` (model ``m`` owns a
    block of channels) through the whole network: convolutions are grouped by model, linear
    layers are batched matmuls, and per-channel layers (activations, pooling, dropout) run as they
    are. Only plain ``Sequential`` networks of such layers without buffers qualify (``supports``);
    everything else trains through vmap.
    """

    def __init__(self, module: nn.Sequential, num_models: int):
        self.layers = list(module.named_children())
        self.num_models = num_models

    @staticmethod
    def supports(module: nn.Module) -> bool:
        if (
            not isinstance(module, nn.Sequential)
            or type(module).forward is not nn.Sequential.forward
        ):
            return False
        return next(module.buffers(), None) is None and all(
            _is_groupable(layer) for layer in module.children()
        )

    @staticmethod
    def inputs(x: Tensor) -> Tensor:
        """``[B, M, C, ...]`` per-model inputs as grouped ``[B, M * C, ...]`` (images channels-last,
        the layout of oneDNN's fast grouped convolutions)."""
        x = x.flatten(1, 2)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def shared_inputs(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits ``[M, B, classes]`` of every model on the same inputs ``x`` ``[B, C, ...]``."""
        models_x = x.unsqueeze(1).expand(-1, self.num_models, *x.shape[1:])
        return self(params, self.inputs(models_x)).transpose(0, 1)

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits ``[B, M, classes]`` of grouped inputs ``x`` (see ``inputs``)."""
        for name, layer in self.layers:
            weight, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
            if type(layer) in _CONVOLUTIONS:
                x = _CONVOLUTIONS[type(layer)](
                    x,
                    weight.flatten(0, 1),
                    None if bias is None else bias.flatten(),
                    layer.stride,
                    layer.padding,
                    layer.dilation,
                    layer.groups * self.num_models,
                )
            elif type(layer) is nn.Linear:
                x = self._linear(x, weight, bias)
            elif type(layer) is nn.Flatten:
                x = x.flatten(1)
            else:
                x = layer(x)
        return x.unflatten(1, (self.num_models, -1))

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if x.dim() != 2:
            raise ValueError(
                f"grouped Linear layers take [batch, features] inputs, got {x.dim()}-d"
            )
        x = x.unflatten(1, (self.num_models, -1)).transpose(0, 1)  # [M, B, in]
        weight = weight.transpose(1, 2)  # [M, in, out]
        out = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight)
        return out.transpose(0, 1).flatten(1)


def _is_groupable(layer: nn.Module) -> bool:
    kind = type(layer)
    if kind in _CONVOLUTIONS:
        return layer.padding_mode == "zeros"
    if kind is nn.Flatten:
        return layer.start_dim == 1 and layer.end_dim == -1
    return kind is nn.Linear or kind in _PER_CHANNEL_LAYERS


class _ChunkTrainer:
    """Trains one chunk of models with one vectorized step, checkpointing as it goes."""

    def __init__(
        self,
        config: ZooConfig,
        architecture_kwargs: dict[str, Any],
        specs: list[ModelSpec],
        data: ImageDataset,
        device: torch.device,
        models: list[nn.Module] | None = None,
    ):
        """``models`` (one per spec, all of one structure) start the training instead of the
        specs' own initializations (fine-tuning sampled networks)."""
        self.config, self.specs, self.data, self.device = config, specs, data, device
        # oneDNN's grouped convolutions (what vmap turns a batched conv into) run ~1.4x faster on
        # channels-last tensors; GPUs keep PyTorch's default layout.
        self.channels_last = device.type == "cpu"
        if models is None:
            models = [
                initialize_zoo_model(
                    config.architecture, architecture_kwargs, s.hyperparameters, s.seed
                )
                for s in specs
            ]
        # A parameter-less template: every tensor comes from the stacked dicts below.
        self.module = copy.deepcopy(models[0]).to("meta")
        params = _stack([dict(m.named_parameters()) for m in models], device)
        self.params = {k: self._weight_layout(v) for k, v in params.items()}
        self.buffers = _stack([dict(m.named_buffers()) for m in models], device)
        self.eval_splits = self._eval_splits()
        self.state_keys = list(models[0].state_dict())
        self.optimizer = _PopulationOptimizer(config, specs, self.params)
        self.epoch = 0
        self.records: list[dict] = []
        self._vmap_logits = vmap(self._forward, in_dims=(0, 0, None))
        self.grouped = self._grouped_network()
        if self.grouped is None:
            self._train_step = vmap(grad(self._loss), randomness="different")
        else:
            self._train_step = grad(self._grouped_loss)

    def _grouped_network(self) -> _GroupedSequential | None:
        """The grouped fast path, on CPU (where vmap's layout copies dominate a step), for
        networks it supports and whose logits it reproduces (checked on two samples)."""
        if self.device.type != "cpu" or not _GroupedSequential.supports(self.module):
            return None
        grouped = _GroupedSequential(self.module, len(self.specs))
        x = self.data.train[0][:2]
        self.module.eval()
        with torch.no_grad():
            expected = self._vmap_logits(self.params, self.buffers, x)
            try:
                logits = grouped.shared_inputs(self.params, x)
            except (RuntimeError, ValueError):
                return None
        return grouped if torch.allclose(logits, expected, rtol=1e-4, atol=1e-6) else None

    def _forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.module, (params, buffers), (x,))

    def _loss(self, params, buffers, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self._forward(params, buffers, x).float(), y)

    def _grouped_loss(self, params, buffers, x: Tensor, y: Tensor) -> Tensor:
        """Sum over models of each model's mean loss: its gradient is every model's own."""
        logits = self.grouped(params, x).float()  # [B, M, classes]
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0).sum()

    def _logits(self, params, buffers, x: Tensor) -> Tensor:
        """Logits ``[M, B, classes]`` of every model on the same inputs ``x``."""
        if self.grouped is None:
            return self._vmap_logits(params, buffers, x)
        return self.grouped.shared_inputs(params, x)

    def _train_batch(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and labels of the training samples ``batch`` ``[M, B]`` in the step's layout."""
        x, y = self.data.train
        if self.grouped is not None:
            batch = batch.t()
            return _GroupedSequential.inputs(x[batch]), y[batch]
        return self._batch_layout(x[batch]), y[batch]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _weight_layout(self, tensor: Tensor) -> Tensor:
        """Store stacked conv weights ``[M, O, C, kh, kw]`` as ``[M, O, kh, kw, C]``: merged into
        ``[M*O, C, kh, kw]`` for a grouped convolution they are channels-last."""
        if not (self.channels_last and tensor.dim() == 5):
            return tensor
        return tensor.movedim(2, -1).contiguous().movedim(-1, 2)

    def _batch_layout(self, batch: Tensor) -> Tensor:
        """Store image batches ``[M, B, C, H, W]`` as ``[B, H, W, M, C]``: merged into
        ``[B, M*C, H, W]`` by vmap's grouped convolution they are channels-last."""
        if not (self.channels_last and batch.dim() == 5):
            return batch
        return batch.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)

    def _eval_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        if not self.channels_last:
            return self.data.splits()
        return {
            name: (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, y)
            for name, (x, y) in self.data.splits().items()
        }

    def run(self, output_dir: Path, state_path: Path, bar: tqdm) -> list[dict]:
        """Train to ``config.epochs`` (resuming from ``state_path`` if saved); return the records."""
        if self._load_state(state_path):
            bar.update(self.epoch * _steps_per_epoch(self.data, self.config.batch_size))
        else:
            self._checkpoint(output_dir, state_path)  # epoch 0: the initialization
        while self.epoch < self.config.epochs:
            self.epoch += 1
            self._train_epoch(bar)
            if self.epoch in self.config.resolved_checkpoint_epochs:
                self._checkpoint(output_dir, state_path)
        return self.records

    def _train_epoch(self, bar: tqdm) -> None:
        y = self.data.train[1]
        # Dropout masks come from the global generator, seeded per chunk and epoch for resumption.
        torch.manual_seed(
            int(np.random.SeedSequence([self.specs[0].seed, self.epoch]).generate_state(1)[0])
        )
        orders = np.stack([data_order(s.seed, self.epoch, len(y)) for s in self.specs])
        orders = torch.from_numpy(orders).to(self.device)
        self.module.train()
        for batch in orders.split(self.config.batch_size, dim=1):
            with self._autocast():
                grads = self._train_step(self.params, self.buffers, *self._train_batch(batch))
            self.optimizer.step(self.params, grads)
            bar.update(1)

    @torch.no_grad()
    def evaluate(self, splits: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Loss and accuracy of every model on ``splits`` (default: all):
        ``{"train_loss": [M], ...}``."""
        self.module.eval()
        batch_size = self.config.eval_batch_size or max(
            1, _EVAL_PAIRS.get(self.device.type, _EVAL_PAIRS["cuda"]) // len(self.specs)
        )
        metrics = {}
        for split, (x, y) in self.eval_splits.items():
            if splits is not None and split not in splits:
                continue
            loss_sum = torch.zeros(len(self.specs), device=self.device)
            correct = torch.zeros(len(self.specs), device=self.device)
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                with self._autocast():
                    logits = self._logits(self.params, self.buffers, xb).float()  # [M, b, classes]
                target = yb.expand(len(self.specs), -1)
                loss_sum += F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
                correct += (logits.argmax(-1) == target).sum(1)
            metrics[f"{split}_loss"] = loss_sum.cpu().double() / len(y)
            metrics[f"{split}_acc"] = correct.cpu().double() / len(y)
        return metrics

    def _checkpoint(self, output_dir: Path, state_path: Path) -> None:
        metrics = {k: v.tolist() for k, v in self.evaluate().items()}
        tensors = {k: v.cpu() for k, v in {**self.params, **self.buffers}.items()}
        for i, spec in enumerate(self.specs):
            file = f"checkpoints/{spec.model_id}_epoch_{self.epoch:03d}.safetensors"
            atomic_save_safetensors({k: tensors[k][i] for k in self.state_keys}, output_dir / file)
            record = {
                "file": file,
                "model_id": spec.model_id,
                "epoch": self.epoch,
                "seed": spec.seed,
            }
            record.update({name: values[i] for name, values in metrics.items()})
            record["ggap"] = record["train_acc"] - record["test_acc"]
            record["hyperparameters"] = spec.hyperparameters
            self.records.append(record)
        self._save_state(state_path)

    def _save_state(self, state_path: Path) -> None:
        """Save the chunk's training state; the JSON names the tensor file, so it commits last."""
        tensors = {f"param.{k}": v for k, v in self.params.items()}
        tensors |= {f"buffer.{k}": v for k, v in self.buffers.items()}
        tensors |= {f"optimizer.{k}": v for k, v in self.optimizer.state.items()}
        tensor_file = state_path.with_name(f"{state_path.name}_epoch_{self.epoch:03d}.safetensors")
        atomic_save_safetensors({k: v.cpu() for k, v in tensors.items()}, tensor_file)
        state = {
            "tensors": tensor_file.name,
            "epoch": self.epoch,
            "optimizer_steps": self.optimizer.steps,
            "model_ids": [s.model_id for s in self.specs],
            "records": self.records,
        }
        atomic_write_text(_state_json(state_path), json.dumps(state))
        for old in state_path.parent.glob(f"{state_path.name}_epoch_*.safetensors"):
            if old != tensor_file:
                old.unlink()

    def _load_state(self, state_path: Path) -> bool:
        """Restore a saved state of this chunk; False if there is none (or it is of other models)."""
        if not _state_json(state_path).exists():
            return False
        state = json.loads(_state_json(state_path).read_text())
        if state["model_ids"] != [s.model_id for s in self.specs]:
            return False
        tensors = load_file(state_path.parent / state["tensors"], device=str(self.device))
        for prefix, target in [
            ("param.", self.params),
            ("buffer.", self.buffers),
            ("optimizer.", self.optimizer.state),
        ]:
            for key in target:
                target[key] = self._weight_layout(tensors[prefix + key])
        self.epoch = state["epoch"]
        self.optimizer.steps = state["optimizer_steps"]
        self.records = state["records"]
        return True


def _stack(tensor_dicts: list[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
    return {
        k: torch.stack([d[k].detach() for d in tensor_dicts]).to(device) for k in tensor_dicts[0]
    }


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
        if changed or previous.get("dataset_info") != json.loads(json.dumps(info["dataset_info"])):
            raise ValueError(
                f"{output_dir} holds a zoo trained with a different config (fields {changed or ['dataset']} "
                "differ); use another output directory or the original config to resume"
            )
    (output_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    _state_dir(output_dir).mkdir(exist_ok=True)
    atomic_write_text(zoo_json, json.dumps(info, indent=2))


def _state_dir(output_dir: Path) -> Path:
    return output_dir / "train_state"


def _state_json(state_path: Path) -> Path:
    return state_path.with_suffix(".json")


def _finished_models(output_dir: Path) -> set[str]:
    return {record["model_id"] for record in _read_metadata(output_dir)}


def _finish_chunk(output_dir: Path, state_path: Path, records: list[dict]) -> None:
    """Add a finished chunk's records to metadata.jsonl (one atomic rewrite), drop its state."""
    all_records = sorted(
        [*_read_metadata(output_dir), *records], key=lambda r: (r["model_id"], r["epoch"])
    )
    atomic_write_text(
        output_dir / RAW_METADATA_FILE, "".join(json.dumps(r) + "\n" for r in all_records)
    )
    for path in state_path.parent.glob(f"{state_path.name}[._]*"):
        path.unlink()


def _read_metadata(output_dir: Path) -> Iterator[dict]:
    path = output_dir / RAW_METADATA_FILE
    if path.exists():
        yield from (json.loads(line) for line in path.read_text().splitlines() if line)
