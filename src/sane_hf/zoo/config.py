"""`ZooConfig`: everything that defines a zoo (architecture, task, seeds or hyperparameter grid,
epochs, batch size), validated where it is made, and the protocol defaults of Model Zoos."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sane_hf.utils.config import LoadableConfig

SEED_ZOO_HYPERPARAMETERS: dict[str, Any] = {
    "activation": "tanh",
    "dropout": 0.0,
    "init": "uniform",
    "optimizer": "adam",
    "lr": 3e-4,
    "weight_decay": 0.0,
}
HYPERPARAMETER_GRID: dict[str, list] = {
    "activation": ["tanh", "relu", "sigmoid", "gelu"],
    "dropout": [0.0, 0.5],
    "init": ["uniform", "normal", "kaiming_uniform", "kaiming_normal"],
    "optimizer": ["adam", "sgd"],
    "lr": [1e-3, 1e-4],
    "weight_decay": [1e-3, 1e-4],
}
OPTIMIZERS = ("adam", "adamw", "sgd")
ZOO_KINDS = ("seed", "hyperparameter")

# Input shape each built-in architecture is meant for, and the kwarg that receives it.
DEFAULT_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "cnn_s": (1, 28, 28),
    "cnn_m": (3, 32, 32),
    "cnn_wide": (1, 28, 28),
    "resnet18": (3, 32, 32),
    "resnet_bottleneck": (3, 32, 32),
}
INPUT_KWARGS = {
    "cnn_s": "in_channels",
    "cnn_m": "in_channels",
    "cnn_wide": "in_channels",
    "resnet_small": "in_channels",
    "resnet18": "in_channels",
    "resnet_bottleneck": "in_channels",
    "mlp": "in_features",
}


@dataclass
class ZooConfig(LoadableConfig):
    """Everything that defines a zoo; ``train_zoo(config, dir)`` trains it, rerunning resumes it.

    ``hyperparameters`` holds the seed zoo's fixed values, and the values of any hyperparameter a
    hyperparameter zoo's ``grid`` leaves out. ``num_models`` is the number of seeds of a seed zoo
    and sub-samples a hyperparameter zoo's grid (``None``: the full grid). ``input_shape``
    defaults to the architecture's (e.g. ``(1, 28, 28)`` for CNN-s; native for MLPs).
    ``dataset_kwargs`` go to ``load_dataset_by_name`` (``num_samples``, ``split_seed``,
    ``fractions``). ``eval_batch_size`` samples are evaluated at once for every model in a chunk
    (``None``: about 1k (CPU) or 256k (GPU) model-samples per forward). ``models_per_chunk``
    models are trained at once: 50 suits CPU caches (a 100-model chunk of CNN-s steps ~1.5x slower
    per model); on a GPU raise it as far as memory allows (e.g. 1000 for CNN-s).
    """

    CONFIG_KIND: ClassVar[str] = "zoo"

    architecture: str = "cnn_s"
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    kind: str = "seed"
    num_models: int | None = 100
    seed: int = 0
    seeds_per_combination: int = 1
    hyperparameters: dict[str, Any] = field(default_factory=lambda: dict(SEED_ZOO_HYPERPARAMETERS))
    grid: dict[str, list] = field(default_factory=lambda: dict(HYPERPARAMETER_GRID))
    epochs: int = 50
    checkpoint_epochs: list[int] | None = None
    batch_size: int = 10
    eval_batch_size: int | None = None
    models_per_chunk: int = 50
    device: str = "cpu"
    bf16: bool = False
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9

    def __post_init__(self):
        if self.input_shape is not None:
            self.input_shape = tuple(self.input_shape)
        self.adam_betas = tuple(self.adam_betas)
        self.hyperparameters = {**SEED_ZOO_HYPERPARAMETERS, **self.hyperparameters}
        self._validate()

    def _validate(self) -> None:
        if self.kind not in ZOO_KINDS:
            raise ValueError(f"kind must be one of {ZOO_KINDS}, got {self.kind!r}")
        if self.kind == "seed" and not self.num_models:
            raise ValueError("a seed zoo needs num_models >= 1")
        if self.num_models is not None and self.num_models < 1:
            raise ValueError(
                f"num_models must be >= 1 (null: the full grid), got {self.num_models}"
            )
        for name, value in [
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("eval_batch_size", self.eval_batch_size or 1),
            ("models_per_chunk", self.models_per_chunk),
            ("seeds_per_combination", self.seeds_per_combination),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for epoch in self.checkpoint_epochs or []:
            if not 0 <= epoch <= self.epochs:
                raise ValueError(f"checkpoint epoch {epoch} is outside [0, epochs={self.epochs}]")
        _check_hyperparameters(self.hyperparameters, "hyperparameters")
        if self.kind == "hyperparameter":
            _check_hyperparameters(self.grid, "grid", is_grid=True)

    @property
    def resolved_checkpoint_epochs(self) -> list[int]:
        """Checkpoint epochs: the given ones (default: every epoch) plus 0 and the last epoch."""
        epochs = (
            range(self.epochs + 1) if self.checkpoint_epochs is None else self.checkpoint_epochs
        )
        return sorted({0, self.epochs, *epochs})

    def model_specs(self) -> list[ModelSpec]:
        """The zoo's models in id order: seed, and the full hyperparameters of each."""
        if self.kind == "seed":
            choices = [(self.hyperparameters, self.seed + i) for i in range(self.num_models)]
        else:
            choices = self._grid_choices()
        width = max(4, len(str(len(choices) - 1)))
        return [
            ModelSpec(f"model_{i:0{width}d}", seed, {**hp, "batch_size": self.batch_size})
            for i, (hp, seed) in enumerate(choices)
        ]

    def _grid_choices(self) -> list[tuple[dict[str, Any], int]]:
        names = list(self.grid)
        combinations = [
            {**self.hyperparameters, **dict(zip(names, values))}
            for values in itertools.product(*(self.grid[name] for name in names))
        ]
        seeds = range(self.seed, self.seed + self.seeds_per_combination)
        choices = [(hp, seed) for hp in combinations for seed in seeds]
        if self.num_models is None or self.num_models == len(choices):
            return choices
        if self.num_models > len(choices):
            raise ValueError(
                f"num_models={self.num_models} exceeds the {len(choices)} models of the grid"
            )
        import numpy as np  # here, not at the top: `sane-hf zoo --help` needs no numpy

        picked = np.random.default_rng(self.seed).choice(
            len(choices), self.num_models, replace=False
        )
        return [choices[i] for i in np.sort(picked)]


@dataclass(frozen=True)
class ModelSpec:
    """One zoo member: its id, seed and hyperparameters (including ``batch_size``)."""

    model_id: str
    seed: int
    hyperparameters: dict[str, Any]


def _check_hyperparameters(values: dict[str, Any], where: str, is_grid: bool = False) -> None:
    unknown = sorted(set(values) - set(SEED_ZOO_HYPERPARAMETERS))
    if unknown:
        raise ValueError(
            f"{where} has unknown hyperparameters {unknown}; known: {sorted(SEED_ZOO_HYPERPARAMETERS)}"
        )
    # imported here: the names live with the torch modules they build, and the CLI's parser
    # (flags from this dataclass) must not import torch
    from sane_hf.zoo.architectures import ACTIVATIONS, INITIALIZATIONS

    allowed = {"activation": ACTIVATIONS, "init": INITIALIZATIONS, "optimizer": OPTIMIZERS}
    for name, value in values.items():
        options = value if is_grid else [value]
        if is_grid and (not isinstance(value, list | tuple) or not value):
            raise ValueError(f"{where}[{name!r}] must be a non-empty list, got {value!r}")
        for option in options:
            if name in allowed and option not in allowed[name]:
                raise ValueError(
                    f"{where}[{name!r}]: {option!r} is not one of {sorted(allowed[name])}"
                )
            if name in ("dropout", "lr", "weight_decay") and not option >= 0:
                raise ValueError(f"{where}[{name!r}] must be >= 0, got {option!r}")


__all__ = [
    "ModelSpec",
    "ZooConfig",
]
