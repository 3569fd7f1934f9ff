"""Downstream tasks across architectures on a mixed zoo (`sane_hf.zoo.mixed`).

- ``probe_mixed``: one linear probe of a property (test accuracy) over the embeddings of all
  architectures, fitted on the train split (ridge alpha on validation) and scored on the whole
  test split and per architecture, with R^2 and Kendall tau; next to ``s(W)`` for mixed zoos
  (`mixed_weight_statistics`: statistics of the weights per layer type and relative depth, so
  networks of different shapes get features of one length).
- ``reconstruction_accuracies``: decode(encode(network)) for rows of a mixed split, decoded
  into their architecture and evaluated on their task, next to the originals' accuracy;
- ``sample_from_prompts``: KDE samples in latent space around prompts of any architecture
  (also one the model never saw), next to prompts + noise at the same distance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from scipy.stats import kendalltau
from sklearn.metrics import r2_score
from torch import nn

from sane_hf.downstream.embedding import decode_latents, embed, encode_tokens
from sane_hf.downstream.evaluation import accuracy, load_task_dataset, random_batches
from sane_hf.downstream.probing import REGULARIZATION_GRID, RidgeProbe
from sane_hf.downstream.sampling import condition_batchnorm
from sane_hf.weights.universal import LAYER_TYPES, layer_types
from sane_hf.zoo.dataset import SPLITS
from sane_hf.zoo.mixed import MixedMetadata, MixedZooDataset

DEPTH_BINS = 3  # early, middle, late layers of a network
STATISTIC_QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)


def mixed_weight_statistics(split: Dataset, metadata: MixedMetadata) -> np.ndarray:
    """``s(W)`` for mixed zoos: ``[M, F]`` features of one length for every architecture.

    Each network's weights are grouped by (layer type, third of its depth); every group gives
    mean, variance and the 1/25/50/75/99 percentiles of its raw values and its share of the
    network's values (all zero where a network has no such layer).
    """
    stats_per_group = 2 + len(STATISTIC_QUANTILES) + 1
    features = np.zeros((len(split), len(LAYER_TYPES), DEPTH_BINS, stats_per_group))
    rows = split.select_columns(["architecture", "tokens", "scales"]).with_format("numpy")
    for index, row in enumerate(rows):
        entry = metadata.architectures[row["architecture"]]
        state_dict = metadata.decode(row)
        layout, groups = entry.layout, {}
        types, depth = layer_types(layout), _depth_bins(layout)
        for layer, type_name, depth_bin in zip(layout.layers, types, depth):
            values = torch.cat([state_dict[p.key].flatten() for p in layer.parameters])
            groups.setdefault((LAYER_TYPES.index(type_name), depth_bin), []).append(values)
        total = sum(v.numel() for values in groups.values() for v in values)
        for (type_id, depth_bin), values in groups.items():
            flat = torch.cat(values).double().numpy()
            features[index, type_id, depth_bin] = [
                flat.mean(),
                flat.var(),
                *np.quantile(flat, STATISTIC_QUANTILES),
                flat.size / total,
            ]
    return features.reshape(len(split), -1)


def _depth_bins(layout) -> list[int]:
    modules = list(
        dict.fromkeys(layer.parameters[0].key.rpartition(".")[0] for layer in layout.layers)
    )
    position = {name: i / max(len(modules) - 1, 1) for i, name in enumerate(modules)}
    return [
        min(int(position[layer.parameters[0].key.rpartition(".")[0]] * DEPTH_BINS), DEPTH_BINS - 1)
        for layer in layout.layers
    ]


@dataclass
class MixedProbeResult:
    """Test R^2 and Kendall tau of one probe, over the whole test split and per architecture."""

    features: str
    property: str
    r2: float
    kendall_tau: float
    validation_r2: float
    per_architecture: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "features": self.features,
            "property": self.property,
            "r2": self.r2,
            "kendall_tau": self.kendall_tau,
            "validation_r2": self.validation_r2,
            "per_architecture": self.per_architecture,
        }


def probe_mixed(
    features: Mapping[str, Mapping[str, np.ndarray]],
    targets: Mapping[str, np.ndarray],
    architectures: Mapping[str, np.ndarray],
    property_name: str = "test_acc",
    regularization_grid: Sequence[float] = REGULARIZATION_GRID,
) -> list[MixedProbeResult]:
    """One ridge probe per feature set (``{name: {split: [n, d]}}``), scored on the test split
    overall and per architecture (``architectures[split]`` names each row's architecture)."""
    results = []
    for name, splits in features.items():
        probe = RidgeProbe(regularization_grid).fit(
            splits["train"], targets["train"], splits["validation"], targets["validation"]
        )
        predicted, true = probe.predict(splits["test"]), np.asarray(targets["test"], dtype=float)
        labels = np.asarray(architectures["test"])
        per_architecture = {
            architecture: _scores(true[labels == architecture], predicted[labels == architecture])
            for architecture in sorted(set(labels))
        }
        overall = _scores(true, predicted)
        results.append(
            MixedProbeResult(
                name,
                property_name,
                overall["r2"],
                overall["kendall_tau"],
                float(np.max(probe.validation_scores)),
                per_architecture,
            )
        )
    return results


def _scores(true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    tau = kendalltau(true, predicted).statistic if len(true) > 1 else float("nan")
    return {"r2": float(r2_score(true, predicted)), "kendall_tau": float(tau)}


def mixed_probe_inputs(
    model: nn.Module,
    mixed: MixedZooDataset,
    property_name: str = "test_acc",
    progress: bool = False,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Feature sets (SANE mean embedding, SANE per-layer-type means, s(W)), targets and
    architecture labels of every split of a mixed zoo."""
    features: dict[str, dict[str, np.ndarray]] = {}
    targets, architectures = {}, {}
    for split in SPLITS:
        rows = mixed.splits[split]
        embeddings = embed(model, rows, progress=progress)
        features.setdefault("SANE", {})[split] = embeddings.mean.double().numpy()
        features.setdefault("SANE layer types", {})[split] = (
            embeddings.layer_means.flatten(1).double().numpy()
        )
        features.setdefault("s(W)", {})[split] = mixed_weight_statistics(rows, mixed.metadata)
        targets[split] = np.asarray(rows[property_name], dtype=float)
        architectures[split] = np.asarray(rows["architecture"])
    for name in list(features):
        features[f"{name}, centred"] = centre_per_architecture(features[name], architectures)
    return features, targets, architectures


def centre_per_architecture(
    features: Mapping[str, np.ndarray], architectures: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every split's features minus the training split's mean of the row's architecture.

    A network's architecture is known wherever it is embedded (its layout says it), so one
    probe over all architectures may compare each network with its own kind: the offsets
    between architectures' clusters then no longer mask the direction of accuracy.
    """
    means = {
        name: features["train"][architectures["train"] == name].mean(0)
        for name in set(architectures["train"])
    }
    return {
        split: values - np.stack([means[name] for name in architectures[split]])
        for split, values in features.items()
    }


@torch.no_grad()
def reconstruction_accuracies(
    model: nn.Module, rows: Dataset, metadata: MixedMetadata, num_test_samples: int | None = None
) -> dict[str, dict[str, list[float]]]:
    """Test accuracy of every row's network and of decode(encode(network)), per architecture:
    ``{architecture: {"original": [...], "reconstructed": [...]}}``."""
    results: dict[str, dict[str, list[float]]] = {}
    tasks = _Tasks(metadata, num_test_samples)
    tokenizer = metadata.tokenizer
    for row in rows.with_format("numpy"):
        name = row["architecture"]
        entry = metadata.architectures[name]
        tokens = torch.as_tensor(row["tokens"], dtype=torch.float32)
        positions = torch.as_tensor(row["positions"], dtype=torch.long)
        scales = torch.as_tensor(row["scales"], dtype=torch.float32)
        latents = encode_tokens(model, tokens, positions)
        reconstructed = decode_latents(model, latents, positions).float()
        scores = results.setdefault(name, {"original": [], "reconstructed": []})
        for key, values in (("original", tokens), ("reconstructed", reconstructed)):
            state_dict = tokenizer.decode(values, entry.layout, scales)
            scores[key].append(tasks.accuracy(name, state_dict, generated=key != "original"))
    return results


class _Tasks:
    """The test task of every architecture, loaded once; evaluates decoded networks.

    Generated networks (reconstructions, samples, noised prompts) get their BatchNorm running
    statistics re-estimated on 10 training batches (`condition_batchnorm`, as SANE's sampling
    does): decoded running variances are approximations and may come out negative.
    """

    def __init__(self, metadata: MixedMetadata, num_test_samples: int | None):
        self.metadata, self.num_test_samples, self._datasets = metadata, num_test_samples, {}

    def accuracy(self, name: str, state_dict: dict[str, torch.Tensor], generated: bool) -> float:
        entry = self.metadata.architectures[name]
        if name not in self._datasets:
            self._datasets[name] = load_task_dataset(entry.zoo)
        dataset = self._datasets[name]
        network = entry.build()
        network.load_state_dict(state_dict)
        if generated:
            condition_batchnorm(network, random_batches(dataset, 10))
        inputs, labels = dataset.test
        return accuracy(network, inputs[: self.num_test_samples], labels[: self.num_test_samples])


@torch.no_grad()
def sample_from_prompts(
    model: nn.Module,
    rows: Dataset,
    metadata: MixedMetadata,
    *,
    bandwidth: float = 0.5,
    seed: int = 0,
    num_test_samples: int | None = None,
) -> dict[str, dict[str, list[float]]]:
    """KDE samples around prompts of any architecture, next to prompts + matched noise.

    Every prompt's token latents are encoded; a sample adds Gaussian noise of ``bandwidth``
    times the per-dimension spread of the prompts' latents (a Gaussian KDE over the prompts of
    one architecture, centred on this prompt) and is decoded into the prompt's architecture.
    The memorization baseline adds Gaussian noise to the prompt's learned weights at the same
    L2 distance as the sample's (BatchNorm running statistics are kept). Returns test accuracies per architecture:
    ``{architecture: {"prompts": [...], "samples": [...], "prompts + matched noise": [...]}}``.
    """
    generator = torch.Generator().manual_seed(seed)
    tokenizer, results, latents_of = metadata.tokenizer, {}, {}
    tasks = _Tasks(metadata, num_test_samples)
    rows = rows.with_format("numpy")
    for index, row in enumerate(rows):
        tokens = torch.as_tensor(row["tokens"], dtype=torch.float32)
        positions = torch.as_tensor(row["positions"], dtype=torch.long)
        latents_of[index] = (encode_tokens(model, tokens, positions), positions)
    spread = {}
    for index, row in enumerate(rows):
        spread.setdefault(row["architecture"], []).append(latents_of[index][0])
    spread = {name: torch.stack(values).std(0) for name, values in spread.items()}
    for index, row in enumerate(rows):
        name = row["architecture"]
        entry = metadata.architectures[name]
        latents, positions = latents_of[index]
        noise = torch.randn(latents.shape, generator=generator) * spread[name] * bandwidth
        decoded = decode_latents(model, latents + noise, positions).float()
        scales = torch.as_tensor(row["scales"], dtype=torch.float32)
        prompt = tokenizer.decode(torch.as_tensor(row["tokens"]), entry.layout, scales)
        sample = tokenizer.decode(decoded, entry.layout, scales)
        learned = [k for k, v in prompt.items() if v.is_floating_point() and "running_" not in k]
        distance = torch.sqrt(sum((sample[k] - prompt[k]).square().sum() for k in learned))
        direction = {k: torch.randn(prompt[k].shape, generator=generator) for k in learned}
        norm = torch.sqrt(sum(d.square().sum() for d in direction.values()))
        noisy = {**prompt, **{k: prompt[k] + direction[k] * distance / norm for k in learned}}
        scores = results.setdefault(
            name, {"prompts": [], "samples": [], "prompts + matched noise": []}
        )
        for group, state_dict in (
            ("prompts", prompt),
            ("samples", sample),
            ("prompts + matched noise", noisy),
        ):
            scores[group].append(tasks.accuracy(name, state_dict, generated=group != "prompts"))
    return results


__all__ = [
    "MixedProbeResult",
    "centre_per_architecture",
    "mixed_probe_inputs",
    "mixed_weight_statistics",
    "probe_mixed",
    "reconstruction_accuracies",
    "sample_from_prompts",
]
