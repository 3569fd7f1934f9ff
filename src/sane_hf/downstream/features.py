"""The feature sets a linear probe may read from SANE, and how each is computed.

SANE's model embedding is the mean of its token latents (paper Sec. 4.1). A mean over ~50
latents of width 256 is a weak summary when the autoencoder passes every value through (the
`cpu` recipe), so probes and the shipped probe heads choose, per property and on the validation
split, among richer poolings of the same latents:

- ``SANE``: the mean token latent ``[D]``;
- ``SANE layers``: the mean latent of every layer, concatenated ``[L * D]``;
- ``s(Z)``: statistics of the token latents per layer and latent dimension (mean, std and the
  10/50/90 percentiles, ``[5 * L * D]``), the latent-space analogue of ``s(W)``;
- ``SANE + s(W)``: the mean latent next to the weight statistics ``s(W)``. This one is *not*
  SANE alone: it is reported as its own row, and what it adds over ``s(W)`` is SANE's share.

and the baselines read from the weights themselves: ``s(W)`` (per-layer mean, variance and
1/25/50/75/99 percentiles of the real weights, Unterthiner et al. 2020) and the raw weights ``W``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from sane_hf.weights.layout import real_entry_mask

if TYPE_CHECKING:
    from datasets import Dataset

SANE = "SANE"
SANE_LAYERS = "SANE layers"
LATENT_STATISTICS = "s(Z)"
SANE_AND_WEIGHT_STATISTICS = "SANE + s(W)"
#: feature sets read from SANE's latents only
SANE_ONLY_FEATURE_SETS = (SANE, SANE_LAYERS, LATENT_STATISTICS)
#: feature sets a shipped probe head may use
HEAD_FEATURE_SETS = (*SANE_ONLY_FEATURE_SETS, SANE_AND_WEIGHT_STATISTICS)
LATENT_QUANTILES = (0.1, 0.5, 0.9)
LATENT_STATISTIC_NAMES = ("mean", "std", *(f"q{round(100 * q):02d}" for q in LATENT_QUANTILES))


STATISTIC_QUANTILES = (0.01, 0.25, 0.5, 0.75, 0.99)
STATISTIC_NAMES = ("mean", "var", *(f"q{round(100 * q):02d}" for q in STATISTIC_QUANTILES))


def _as_model_batch(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Accept ``[N, T]`` (one model) or ``[M, N, T]`` tokens; return ``[M, N, T]`` and whether one."""
    single = tokens.dim() == 2
    batch = tokens[None] if single else tokens
    if batch.dim() != 3 or batch.shape[1:] != mask.shape:
        raise ValueError(
            f"tokens must be [N, T] or [M, N, T] matching mask {tuple(mask.shape)}, "
            f"got {tuple(tokens.shape)}"
        )
    return batch, single


def weight_statistics(
    tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The ``s(W)`` baseline: per layer mean, variance and 1/25/50/75/99 percentiles.

    Args:
        tokens: ``[N, T]`` tokens of one model or ``[M, N, T]`` of models sharing one layout.
        mask: ``[N, T]`` bool, True on real weights; padding never enters a statistic.
        positions: ``[N, 3]`` (global, layer, row); the layer index groups the values.

    Returns:
        ``[7 * L]`` (one model) or ``[M, 7 * L]`` features, ordered by layer index, then
        ``STATISTIC_NAMES``. Variance is the population variance; percentiles interpolate
        linearly like ``numpy.percentile``.

    All models are handled at once: the values are sorted per model, then stably regrouped by
    layer, so every percentile is a gather at a per-layer offset.
    """
    batch, single = _as_model_batch(tokens, mask)
    mask = mask.to(batch.device)
    values = batch[:, mask].double()  # [M, V], token-major order
    layer_of_value = positions[:, 1].to(batch.device).repeat_interleave(mask.sum(1))
    _, layer_of_value = torch.unique(layer_of_value, return_inverse=True)
    sizes = torch.bincount(layer_of_value)
    num_layers = sizes.numel()

    mean = values.new_zeros(len(values), num_layers).index_add_(1, layer_of_value, values) / sizes
    centered = values - mean[:, layer_of_value]
    var = values.new_zeros(mean.shape).index_add_(1, layer_of_value, centered**2) / sizes

    by_value = values.argsort(dim=1)
    by_layer = layer_of_value[by_value].argsort(dim=1, stable=True)
    grouped = values.gather(1, by_value).gather(1, by_layer)  # per layer, ascending
    starts = sizes.cumsum(0) - sizes
    quantiles = torch.tensor(STATISTIC_QUANTILES, dtype=values.dtype, device=values.device)
    rank = quantiles * (sizes[:, None] - 1)  # [L, Q]
    lower = rank.floor().long()
    fraction = rank - lower
    upper = torch.minimum(lower + 1, sizes[:, None] - 1)
    percentiles = (
        grouped[:, starts[:, None] + lower] * (1 - fraction)
        + grouped[:, starts[:, None] + upper] * fraction
    )

    features = torch.cat([mean[..., None], var[..., None], percentiles], dim=-1).flatten(1)
    features = features.to(tokens.dtype)
    return features[0] if single else features


def raw_weight_features(
    tokens: torch.Tensor, mask: torch.Tensor, max_features: int | None = None
) -> torch.Tensor:
    """The ``W`` baseline: the real weights of each model, flattened (padding dropped).

    Raises ``ValueError`` when a model has more than ``max_features`` weights: a linear probe on
    millions of raw weights is neither meaningful nor affordable, and callers should say so.
    """
    batch, single = _as_model_batch(tokens, mask)
    num_weights = int(mask.sum())
    if max_features is not None and num_weights > max_features:
        raise ValueError(
            f"models have {num_weights} weights, more than max_features={max_features} "
            "for the raw-weight baseline"
        )
    features = batch[:, mask.to(batch.device)]
    return features[0] if single else features


def latent_statistics(latents: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``s(Z)``: per layer and latent dimension, mean, std and percentiles of the token latents.

    Args:
        latents: ``[M, N, D]`` token latents of ``M`` networks sharing one layout.
        positions: ``[N, 3]`` (global, layer, row); column 1 groups the tokens by layer.

    Returns:
        ``[M, 5 * L * D]``, ordered by layer index, then ``LATENT_STATISTIC_NAMES``, then latent
        dimension. A layer of one token has std 0 and all percentiles equal to its latent.
    """
    if latents.dim() != 3 or positions.shape != (latents.shape[1], 3):
        raise ValueError(
            f"latents must be [M, N, D] and positions [N, 3], got {tuple(latents.shape)} and "
            f"{tuple(positions.shape)}"
        )
    latents = latents.float()
    layers = positions[:, 1].to(latents.device)
    quantiles = torch.tensor(LATENT_QUANTILES, device=latents.device)
    parts = []
    for layer in torch.unique(layers):
        tokens = latents[:, layers == layer]  # [M, n_l, D]
        spread = tokens.std(1, unbiased=False)
        percentiles = torch.quantile(tokens, quantiles, dim=1).transpose(0, 1)  # [M, Q, D]
        parts.append(torch.cat([tokens.mean(1)[:, None], spread[:, None], percentiles], dim=1))
    return torch.cat([part.flatten(1) for part in parts], dim=1)


def needs_token_latents(feature_sets: Sequence[str]) -> bool:
    return LATENT_STATISTICS in feature_sets


def feature_matrices(
    feature_sets: Sequence[str],
    *,
    mean: torch.Tensor,
    layer_means: torch.Tensor | None = None,
    latent_stats: torch.Tensor | None = None,
    weight_stats: torch.Tensor | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``{feature set: [M, d] float64}`` for ``feature_sets`` from one network batch's poolings
    (``Embeddings.mean``/``layer_means``, `latent_statistics`, ``s(W)``). A set whose input is
    missing is an error naming it."""
    unknown = [name for name in feature_sets if name not in HEAD_FEATURE_SETS]
    if unknown:
        raise ValueError(f"unknown feature sets {unknown}; choose from {list(HEAD_FEATURE_SETS)}")
    inputs: Mapping[str, object] = {
        SANE: mean,
        SANE_LAYERS: layer_means,
        LATENT_STATISTICS: latent_stats,
        SANE_AND_WEIGHT_STATISTICS: weight_stats,
    }
    result = {}
    for name in feature_sets:
        if inputs[name] is None:
            raise ValueError(f"feature set {name!r} needs inputs that were not computed")
        matrix = _as_array(inputs[name])
        if name == SANE_AND_WEIGHT_STATISTICS:
            matrix = np.concatenate([_as_array(mean), matrix], axis=1)
        result[name] = matrix.reshape(len(matrix), -1)
    return result


def split_tokens(split: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [M, N, T], positions [N, 3], mask [N, T])`` of a zoo dataset split (normalized
    tokens; the mask marks real values, from the per-token counts)."""
    rows = split.with_format("torch", columns=["tokens", "positions", "counts"])
    first = rows[0]
    mask = real_entry_mask(first["counts"].long(), first["tokens"].shape[-1])
    return rows[:]["tokens"].float(), first["positions"].long(), mask


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


__all__ = [
    "HEAD_FEATURE_SETS",
    "LATENT_STATISTICS",
    "SANE_AND_WEIGHT_STATISTICS",
    "SANE_ONLY_FEATURE_SETS",
    "STATISTIC_NAMES",
    "feature_matrices",
    "latent_statistics",
    "raw_weight_features",
    "split_tokens",
    "weight_statistics",
]
