"""How good are sampled networks as initializations? Accuracy before and during fine-tuning.

Paper Table 3 reports the test accuracy of sampled models at epoch 0 (no training) and after 1
and 5 epochs of fine-tuning, against models trained from scratch with the same budget.
``evaluate_samples`` does that for any groups of networks (sampled by different methods, and
freshly initialized ones as the from-scratch baseline): every network is fine-tuned with the same
optimizer, data and number of epochs, and its test accuracy is recorded after every epoch.

Fine-tuning reuses the zoo trainer (`sane_hf.zoo.training.fine_tune_population`): all networks of one
structure train together in one vmapped step, so Table 3's 25 epochs for tens of networks take
seconds on a GPU rather than minutes of a Python loop per network.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sane_hf.zoo.architectures import initialize
from sane_hf.zoo.tasks import ImageDataset, load_dataset_by_name
from sane_hf.zoo.training import fine_tune_population, network_structure


@dataclass
class SampleEvaluation:
    """Test accuracy per group, network and fine-tuning epoch (``accuracy[group]``:
    ``[networks, len(epochs)]``, epoch 0 = before any training)."""

    epochs: list[int]
    accuracy: dict[str, np.ndarray]

    def summary(self) -> dict[str, dict[str, list[float]]]:
        """Mean and standard deviation over the networks of each group, per epoch."""
        return {
            group: {"mean": values.mean(0).tolist(), "std": values.std(0).tolist()}
            for group, values in self.accuracy.items()
        }

    def table(self, epochs: Sequence[int] | None = None) -> str:
        """Paper Table 3 layout: one row per group, "mean ± std" accuracy in % per epoch."""
        epochs = list(epochs) if epochs is not None else self.epochs
        missing = [e for e in epochs if e not in self.epochs]
        if missing:
            raise ValueError(f"epochs {missing} were not evaluated (have {self.epochs})")
        columns = [self.epochs.index(e) for e in epochs]
        width = max(len("method"), *(len(group) for group in self.accuracy))
        header = f"{'method':<{width}}  {'n':>3}" + "".join(f"  {f'epoch {e}':>13}" for e in epochs)
        lines = [header, "-" * len(header)]
        for group, values in self.accuracy.items():
            cells = "".join(
                f"  {100 * values[:, c].mean():>6.1f} ± {100 * values[:, c].std():<4.1f}"
                for c in columns
            )
            lines.append(f"{group:<{width}}  {len(values):>3}{cells}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "accuracy": {group: values.tolist() for group, values in self.accuracy.items()},
            "summary": self.summary(),
        }

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def plot(self, path: str | Path) -> None:
        """Test accuracy vs fine-tuning epoch: mean line and ± std band per group (PNG)."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 4), dpi=120)
        axes = figure.add_subplot()
        for group, values in self.accuracy.items():
            mean, std = 100 * values.mean(0), 100 * values.std(0)
            axes.plot(self.epochs, mean, marker="o", label=group)
            axes.fill_between(self.epochs, mean - std, mean + std, alpha=0.2)
        axes.set(xlabel="fine-tuning epoch", ylabel="test accuracy (%)")
        axes.set_xticks(self.epochs)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path)


def load_task_dataset(zoo: Mapping, name: str | None = None) -> ImageDataset:
    """The task a zoo was trained on, rebuilt from its ``zoo.json`` (same subsample, split and
    standardization), or another task ``name`` in the zoo's input shape (a new task)."""
    dataset_name = name or zoo.get("dataset")
    if dataset_name is None:
        raise ValueError("the zoo does not name its dataset: pass the task dataset explicitly")
    dataset_kwargs = zoo.get("config", {}).get("dataset_kwargs", {}) if name is None else {}
    return load_dataset_by_name(dataset_name, zoo.get("input_shape"), **dataset_kwargs)


def accuracy_score(
    dataset: ImageDataset, num_samples: int = 500, seed: int = 0
) -> Callable[[nn.Module], float]:
    """A ``score_fn`` for subsampling: accuracy on ``num_samples`` random training samples.

    Training data keeps the test split untouched for the final evaluation. The subset is drawn
    at random (seeded) because a split may be ordered by class: its first samples can be a
    few classes only, and ranking on them barely correlates with test accuracy.
    """
    inputs, labels = dataset.train
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(labels), generator=generator)[:num_samples]
    inputs, labels = inputs[subset], labels[subset]
    return lambda model: accuracy(model, inputs, labels)


def random_batches(
    dataset: ImageDataset, num_batches: int, batch_size: int = 64, seed: int = 0
) -> list[torch.Tensor]:
    """Input batches drawn at random (seeded) from the training split, e.g. for BatchNorm
    conditioning: the split may be ordered by class, so its first samples are not representative.
    """
    inputs = dataset.train[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)[: num_batches * batch_size]
    return list(inputs[order].split(batch_size))


@torch.no_grad()
def accuracy(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024
) -> float:
    """Fraction of ``inputs`` classified as ``labels`` (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for x, y in zip(inputs.split(batch_size), labels.split(batch_size)):
        correct += (model(x.to(device)).argmax(-1) == y.to(device)).sum().item()
    return correct / len(labels)


def evaluate_samples(
    groups: Mapping[str, Sequence[nn.Module]],
    dataset: ImageDataset,
    epochs: int = 5,
    *,
    optimizer: str = "adam",
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    batch_size: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> SampleEvaluation:
    """Fine-tune copies of every network of every group the same way; record test accuracy.

    Networks of one module structure (usually all of them: samples of one template and their
    from-scratch twins) are fine-tuned together by `sane_hf.zoo.training.fine_tune_population`, one
    training step for all of them.

    Args:
        groups: ``{"SANE subsampled": [...], "from scratch": [...]}``: networks per method. The
            networks themselves are not modified.
        dataset: the task (``sane_hf.zoo.tasks.load_dataset_by_name``); accuracy is on its test split.
        epochs: fine-tuning epochs; accuracy is recorded at epoch 0 and after each epoch.
        optimizer, lr, weight_decay, batch_size: the training recipe (default: the zoo's).
        seed: seeds the data order; network ``i`` of every group sees the same order.
    """
    members = [(group, i, net) for group, nets in groups.items() for i, net in enumerate(nets)]
    by_structure: dict[str, list[tuple[str, int, nn.Module]]] = {}
    for member in members:
        by_structure.setdefault(network_structure(member[2]), []).append(member)
    rows: dict[tuple[str, int], np.ndarray] = {}
    for population in by_structure.values():
        accuracies = fine_tune_population(
            [network for _, _, network in population],
            dataset,
            epochs,
            seeds=[seed + index for _, index, _ in population],
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
        rows.update({(group, index): row for (group, index, _), row in zip(population, accuracies)})
    accuracy = {
        group: np.array([rows[group, index] for index in range(len(networks))])
        for group, networks in groups.items()
    }
    return SampleEvaluation(list(range(epochs + 1)), accuracy)


def scratch_models(
    template: nn.Module, num_models: int, init: str = "default", seed: int = 0
) -> list[nn.Module]:
    """Freshly initialized copies of ``template``: the from-scratch baseline of
    ``evaluate_samples``. ``init`` is a scheme of ``sane_hf.initialize`` (``default``: PyTorch's
    own ``reset_parameters``); the draws are seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    models = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(num_models):
            network = copy.deepcopy(template)
            for module in network.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            models.append(initialize(network, init, generator))
    return models
