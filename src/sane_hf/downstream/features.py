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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
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
    counts = first["counts"].long()
    mask = torch.arange(first["tokens"].shape[-1]) < counts[:, None]
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
    "feature_matrices",
    "latent_statistics",
    "split_tokens",
]
