"""Is a network like the zoo's? An in-distribution signal for every embedding and prediction.

A probe head fitted on one zoo extrapolates silently to networks made another way: networks
trained in a plain PyTorch loop (non-zero biases, inputs in 0..1) or untrained ones get
confident, wrong accuracies. Three scores say how unlike the zoo a network is, each compared
with the same score of the zoo's *validation* networks (networks SANE never saw, made the zoo's
way):

- ``reconstruction_error``: mean squared error of decode(encode(tokens)) over the real values,
  in the zoo's normalized token space (SANE reconstructs what it was trained on);
- ``embedding_distance``: distance of the standardized mean embedding to the nearest embedding
  of the zoo's training networks;
- ``weight_statistics_distance``: the same for the standardized weight statistics ``s(W)``
  (per-layer mean, variance, percentiles: catches other init conventions, e.g. biases).

Each score becomes a percentile of the validation networks' scores (100: above all of them),
and a network is *outside the zoo's range* when any score exceeds the largest validation score.
The reference (training features, validation scores) is saved beside the probe heads
(``in_distribution.safetensors`` / ``.json``) when a model is pretrained or released.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from transformers.utils import cached_file

if TYPE_CHECKING:
    from datasets import Dataset

from sane_hf.downstream.embedding import Embeddings, decode_latents, embed
from sane_hf.downstream.features import split_tokens, weight_statistics
from sane_hf.zoo.formats import (
    IN_DISTRIBUTION_CONFIG_FILE,
    IN_DISTRIBUTION_FILE,
    atomic_save_safetensors,
    atomic_write_text,
    read_safetensors,
)

IN_DISTRIBUTION_FORMAT = "sane_hf.InDistributionReference"
IN_DISTRIBUTION_VERSION = 1
SIGNALS = ("reconstruction_error", "embedding_distance", "weight_statistics_distance")
TENSOR_FIELDS = (
    "embedding_mean",
    "embedding_std",
    "statistics_mean",
    "statistics_std",
    "train_embeddings",
    "train_statistics",
)
MAX_REFERENCE_NETWORKS = 5000  # nearest-neighbour reference: the first of the train split


@dataclass
class InDistribution:
    """Scores, percentiles among the zoo's validation networks, and the verdict per network."""

    scores: dict[str, np.ndarray]
    percentiles: dict[str, np.ndarray]
    outside: np.ndarray  # [M] bool: some score above every validation network's

    def columns(self) -> dict[str, np.ndarray]:
        """Flat per-network columns (for a table or a Parquet file)."""
        columns = {f"{name}_percentile": values for name, values in self.percentiles.items()}
        return {**columns, "outside_zoo_range": self.outside}

    def reasons(self, index: int) -> list[str]:
        """The signals by which network ``index`` lies outside the zoo's range."""
        return [name for name, values in self.percentiles.items() if values[index] > 100.0]


@dataclass
class InDistributionReference:
    """What a network is compared with: the zoo's training features and validation scores."""

    embedding_mean: torch.Tensor
    embedding_std: torch.Tensor
    train_embeddings: torch.Tensor  # [R, D], standardized
    statistics_mean: torch.Tensor
    statistics_std: torch.Tensor
    train_statistics: torch.Tensor  # [R, S], standardized
    validation_scores: dict[str, np.ndarray]
    zoo_dataset: str | None = None

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        splits: Mapping[str, Dataset],
        *,
        zoo_dataset: str | None = None,
        batch_size: int = 256,
        progress: bool = False,
    ) -> InDistributionReference:
        """Reference of a zoo dataset's splits: train features, validation networks' scores."""
        train = splits["train"]
        train = train.select(range(min(len(train), MAX_REFERENCE_NETWORKS)))
        embeddings = embed(model, train, batch_size=batch_size, progress=progress)
        statistics = _split_statistics(train)
        mean_e, std_e = _standardization(embeddings.mean)
        mean_s, std_s = _standardization(statistics)
        reference = cls(
            mean_e,
            std_e,
            (embeddings.mean.double() - mean_e) / std_e,
            mean_s,
            std_s,
            (statistics - mean_s) / std_s,
            {},
            zoo_dataset,
        )
        validation = splits["validation"]
        tokens, positions, mask = split_tokens(validation)
        scores = reference.scores(model, tokens, positions, mask, batch_size=batch_size)
        reference.validation_scores = scores
        return reference

    def scores(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        *,
        embeddings: Embeddings | None = None,
        batch_size: int = 256,
    ) -> dict[str, np.ndarray]:
        """The three scores of networks given as normalized tokens ``[M, N, T]``, positions
        ``[N, 3]`` and real-value mask ``[N, T]``; ``embeddings`` with ``token_latents`` of the
        same networks are reused."""
        if embeddings is None or embeddings.token_latents is None:
            features = BatchFeature(
                {"tokens": tokens, "positions": positions.expand(len(tokens), -1, -1)}
            )
            embeddings = embed(
                model, features, batch_size=batch_size, return_token_latents=True, progress=False
            )
        latents = embeddings.token_latents
        reconstructed = decode_latents(
            model, latents, positions.expand(len(latents), -1, -1), batch_size=batch_size
        )
        real = mask.to(tokens.device)
        errors = ((reconstructed.float().cpu() - tokens.float()) ** 2)[:, real].mean(1)
        embedding = (embeddings.mean.double().cpu() - self.embedding_mean) / self.embedding_std
        statistics = weight_statistics(tokens.float(), real, positions).double()
        statistics = (statistics - self.statistics_mean) / self.statistics_std
        return {
            "reconstruction_error": errors.double().numpy(),
            "embedding_distance": _nearest(embedding, self.train_embeddings),
            "weight_statistics_distance": _nearest(statistics, self.train_statistics),
        }

    def assess(self, scores: Mapping[str, np.ndarray]) -> InDistribution:
        """Percentiles of ``scores`` among the validation networks' (100 * share of them scoring
        lower; above 100 means above all of them) and the outside-the-range verdict."""
        percentiles, outside = {}, None
        for name in SIGNALS:
            reference = np.sort(self.validation_scores[name])
            values = np.asarray(scores[name], dtype=np.float64)
            percentile = 100.0 * np.searchsorted(reference, values, side="left") / len(reference)
            above = values > reference[-1]
            percentile = np.where(above, 100.0 + 1e-9, percentile)  # strictly above: > 100
            percentiles[name] = percentile
            outside = above if outside is None else outside | above
        return InDistribution(
            {name: np.asarray(scores[name]) for name in SIGNALS}, percentiles, outside
        )

    # -- saving and loading ----------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: getattr(self, name).float().contiguous()
            for name in (
                "embedding_mean", "embedding_std", "train_embeddings",
                "statistics_mean", "statistics_std", "train_statistics",
            )
        }  # fmt: skip
        atomic_save_safetensors(tensors, folder / IN_DISTRIBUTION_FILE)
        description = {
            "format": IN_DISTRIBUTION_FORMAT,
            "version": IN_DISTRIBUTION_VERSION,
            "zoo_dataset": self.zoo_dataset,
            "signals": list(SIGNALS),
            "outside_rule": "any score above the largest score of the zoo's validation networks",
            "validation_scores": {
                name: [float(v) for v in values] for name, values in self.validation_scores.items()
            },
        }
        atomic_write_text(
            folder / IN_DISTRIBUTION_CONFIG_FILE, json.dumps(description, indent=1) + "\n"
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any
    ) -> InDistributionReference | None:
        """The reference saved beside a model, or None when the model has none (older
        releases)."""
        source = str(pretrained_model_name_or_path)
        try:
            config_path = cached_file(source, IN_DISTRIBUTION_CONFIG_FILE, **hub_kwargs)
            tensors_path = cached_file(source, IN_DISTRIBUTION_FILE, **hub_kwargs)
        except OSError:
            return None
        if config_path is None or tensors_path is None:
            return None
        try:
            description = json.loads(Path(config_path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path}: not valid JSON ({error})") from None
        if (
            not isinstance(description, dict)
            or description.get("format") != IN_DISTRIBUTION_FORMAT
            or description.get("version") != IN_DISTRIBUTION_VERSION
        ):
            raise ValueError(
                f"{config_path}: not a {IN_DISTRIBUTION_FORMAT} version "
                f"{IN_DISTRIBUTION_VERSION} file"
            )
        tensors = read_safetensors(tensors_path, "the in-distribution reference")
        if sorted(tensors) != sorted(TENSOR_FIELDS):
            raise ValueError(f"{tensors_path}: holds {sorted(tensors)}, expected {TENSOR_FIELDS}")
        for name, value in tensors.items():  # an edited file would flag or pass every network
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise ValueError(f"{tensors_path}: {name} must be finite floating-point values")
        tensors = {key: value.clone().double() for key, value in tensors.items()}
        for name in ("embedding_std", "statistics_std"):
            if not (tensors[name] > 0).all():
                raise ValueError(f"{tensors_path}: {name} must be > 0 everywhere")
        scores = description.get("validation_scores", {})
        missing = [name for name in SIGNALS if not scores.get(name)]
        if missing:
            raise ValueError(f"{config_path} lacks validation scores for {missing}")
        for name in SIGNALS:
            try:
                values = np.asarray(scores[name], dtype=float)
            except (TypeError, ValueError):
                values = np.array([np.nan])
            if values.ndim != 1 or not np.isfinite(values).all():
                raise ValueError(f"{config_path}: validation_scores.{name} must be finite numbers")
        return cls(
            **tensors,
            validation_scores={name: np.asarray(scores[name]) for name in SIGNALS},
            zoo_dataset=description.get("zoo_dataset"),
        )


def _split_statistics(split: Dataset) -> torch.Tensor:
    tokens, positions, mask = split_tokens(split)
    return weight_statistics(tokens, mask, positions).double()


def _standardization(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = values.double().cpu()
    std = values.std(0, unbiased=False)
    return values.mean(0), torch.where(std > 0, std, torch.ones_like(std))


def _nearest(queries: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Distance of every query row to its nearest reference row, over the feature count's root
    (a per-feature RMS distance)."""
    distances = torch.cdist(queries.double(), reference.double()).min(dim=1).values
    return (distances / queries.shape[1] ** 0.5).numpy()


__all__ = ["SIGNALS", "InDistribution", "InDistributionReference"]
