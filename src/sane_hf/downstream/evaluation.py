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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sane_hf.downstream.baselines import MemorizationBaselines
from sane_hf.downstream.sampling import SampledModels
from sane_hf.zoo.architectures import initialize
from sane_hf.zoo.tasks import ImageDataset, load_dataset_by_name
from sane_hf.zoo.training import fine_tune_population, network_structure


@dataclass
class SampleEvaluation:
    """Test accuracy per group, network and fine-tuning epoch (``accuracy[group]``:
    ``[networks, len(epochs)]``, epoch 0 = before any training), and with memorization
    baselines the novelty of every network built from tokens.

    ``novelty[group]``: ``{"distance": [networks], "iou": [networks]}`` (distance to the nearest
    training checkpoint in normalized weight space; largest IoU of test mistakes with a prompt or
    training network). ``roles[group]``: ``samples``, ``noise`` or ``ensemble``;
    ``matched[sane_group]``: its matched-noise group; ``selected[sane_group]``: its matched
    noise selected the way the group was (selecting methods only); ``scale``: the median
    distance between distinct prompts (``rel`` in the table is a group's median distance over
    it). With a ``prompts`` group the table shows every group's epoch-0 share of the prompts'.
    """

    epochs: list[int]
    accuracy: dict[str, np.ndarray]
    novelty: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    matched: dict[str, str] = field(default_factory=dict)
    scale: float | None = None
    selected: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, list[float]]]:
        """Mean and standard deviation over the networks of each group, per epoch."""
        return {
            group: {"mean": values.mean(0).tolist(), "std": values.std(0).tolist()}
            for group, values in self.accuracy.items()
        }

    def novelty_medians(self, group: str) -> dict[str, float] | None:
        """Median ``distance``, ``relative`` (over ``scale``) and ``iou`` of a group, if known."""
        if group not in self.novelty:
            return None
        distance = float(np.median(self.novelty[group]["distance"]))
        relative = distance / self.scale if self.scale else float("nan")
        return {
            "distance": distance,
            "relative": relative,
            "iou": float(np.median(self.novelty[group]["iou"])),
        }

    def table(
        self, epochs: Sequence[int] | None = None, relative: Mapping[str, float] | None = None
    ) -> str:
        """Paper Table 3 layout: one row per group, "mean ± std" accuracy in % per epoch; with
        baselines also the median novelty: ``dist`` to the nearest training checkpoint, ``rel``
        (``dist`` over the median distance between prompts: about 1 is as new as the prompts are
        to each other, near 0 a copy) and mistake ``IoU`` (1: the same mistakes as a training
        network). Every SANE row is followed by its matched-noise row. ``relative`` gives ``rel``
        of groups without per-network novelty (older results)."""
        epochs = list(epochs) if epochs is not None else self.epochs
        missing = [e for e in epochs if e not in self.epochs]
        if missing:
            raise ValueError(f"epochs {missing} were not evaluated (have {self.epochs})")
        columns = [self.epochs.index(e) for e in epochs]
        novelty_columns = bool(self.novelty or relative)
        prompts = self.accuracy.get("prompts")
        prompt_share = prompts is not None and 0 in self.epochs
        width = max(len("method"), *(len(group) for group in self.accuracy))
        header = f"{'method':<{width}}  {'n':>3}" + "".join(f"  {f'epoch {e}':>13}" for e in epochs)
        if prompt_share:
            header += f"  {'of prompts':>10}"
        if novelty_columns:
            header += f"  {'dist':>8}  {'rel':>5}  {'IoU':>5}"
        lines = [header, "-" * len(header)]
        for group, values in self.accuracy.items():
            cells = "".join(
                f"  {100 * values[:, c].mean():>6.1f} ± {100 * values[:, c].std():<4.1f}"
                for c in columns
            )
            if prompt_share:
                first = self.epochs.index(0)
                share = values[:, first].mean() / prompts[:, first].mean()
                cells += f"  {share:>10.1%}"
            if novelty_columns:
                medians = self.novelty_medians(group) or {}
                if "relative" not in medians and relative and group in relative:
                    medians["relative"] = relative[group]
                cells += "".join(
                    f"  {medians[key]:>{w}.{p}f}" if key in medians else f"  {'-':>{w}}"
                    for key, w, p in (("distance", 8, 2), ("relative", 5, 2), ("iou", 5, 2))
                )
            lines.append(f"{group:<{width}}  {len(values):>3}{cells}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "epochs": self.epochs,
            "accuracy": {group: values.tolist() for group, values in self.accuracy.items()},
            "summary": self.summary(),
            "novelty": {
                group: {key: values.tolist() for key, values in figures.items()}
                for group, figures in self.novelty.items()
            },
            "roles": self.roles,
            "matched": self.matched,
            "selected": self.selected,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> SampleEvaluation:
        """Inverse of `to_dict` (results saved before baselines existed load without them)."""
        return cls(
            data["epochs"],
            {group: np.array(rows) for group, rows in data["accuracy"].items()},
            {
                group: {key: np.array(values) for key, values in figures.items()}
                for group, figures in data.get("novelty", {}).items()
            },
            dict(data.get("roles", {})),
            dict(data.get("matched", {})),
            data.get("scale"),
            dict(data.get("selected", {})),
        )

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def plot(self, path: str | Path, title: str | None = None) -> None:
        """Test accuracy vs fine-tuning epoch: mean line and ± std band per group (PNG), under
        ``title`` (which networks, on which task and split)."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 4), dpi=120)
        axes = figure.add_subplot()
        for group, values in self.accuracy.items():
            mean, std = 100 * values.mean(0), 100 * values.std(0)
            axes.plot(self.epochs, mean, marker="o", label=group)
            axes.fill_between(self.epochs, mean - std, mean + std, alpha=0.2)
        axes.set(xlabel="fine-tuning epoch", ylabel="test accuracy (%)")
        axes.set_xticks(self.epochs)
        axes.legend(fontsize="small")
        if title:
            axes.set_title(title, fontsize="medium")
        figure.tight_layout()
        figure.savefig(path)

    def plot_novelty(self, path: str | Path, title: str | None = None) -> None:
        """Accuracy at epoch 0 against novelty (PNG): left the distance to the nearest training
        checkpoint, right the largest mistake IoU with a training network. The noise groups form
        a curve (medians, by distance), ensembles and every SANE method are points per network."""
        if not self.novelty:
            raise ValueError("no novelty figures: evaluate with baselines to plot accuracy/novelty")
        from matplotlib.figure import Figure

        figure = Figure(figsize=(10, 4), dpi=120)
        panels = figure.subplots(1, 2, sharey=True)
        noise = sorted(
            (g for g, role in self.roles.items() if role == "noise" and g in self.novelty),
            key=lambda g: np.median(self.novelty[g]["distance"]),
        )
        for axes, key, label, panel_title in zip(
            panels,
            ("distance", "iou"),
            ("distance to nearest training checkpoint", "largest mistake IoU with a training net"),
            ("how far from the training networks", "how alike the mistakes are"),
        ):
            if noise:
                x = [np.median(self.novelty[g][key]) for g in noise]
                y = [100 * np.median(self.accuracy[g][:, 0]) for g in noise]
                axes.plot(x, y, "k--o", label="prompt + noise (median)")
            for group, figures in self.novelty.items():
                if self.roles.get(group) == "noise":
                    continue
                marker = "s" if self.roles.get(group) == "ensemble" else "o"
                axes.scatter(
                    figures[key], 100 * self.accuracy[group][:, 0], marker=marker, label=group
                )
            axes.set(xlabel=label, title=panel_title)
        panels[0].set(ylabel="test accuracy at epoch 0 (%)")
        panels[1].legend(fontsize="x-small")
        if title:
            figure.suptitle(title)
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
    groups: Mapping[str, Sequence[nn.Module] | SampledModels],
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
    baselines: MemorizationBaselines | None = None,
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
        baselines: memorization baselines around the prompts. Every group given as
            ``SampledModels`` (SANE samples) is followed by a noise group at its median distance
            to the prompts (and, for selected groups, by noise selected the same way); the noise
            curve and the ensemble are added, and the novelty of every
            network built from tokens is measured on the test split before fine-tuning.
    """
    groups, novelty, extra = dict(groups), {}, {}
    if baselines is not None:
        sampled = {name: g for name, g in groups.items() if isinstance(g, SampledModels)}
        built = baselines.groups(sampled)
        novelty = baselines.novelty(built, *dataset.test)
        others = {name: g for name, g in groups.items() if name not in sampled}
        groups = {**built.groups, **others}
        extra = {
            "roles": built.roles,
            "matched": built.matched,
            "scale": baselines.scale,
            "selected": built.selected,
        }
    groups = {name: g.models if isinstance(g, SampledModels) else g for name, g in groups.items()}
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
    return SampleEvaluation(list(range(epochs + 1)), accuracy, novelty, **extra)


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
