"""Per-parameter standardization of weight tokens, and its float64 inverse.

Standardizing each parameter with its own mean and standard deviation over the training
checkpoints puts layers of very different scale on one scale for the autoencoder. The maps
from a parameter to its token values follow from the `WeightLayout` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sane_hf.weights.layout import WeightLayout

MIN_STD = 1e-8


def parameter_key_index(layout: WeightLayout) -> tuple[list[str], torch.Tensor]:
    """For every token value, the index of the parameter it comes from (``-1`` on padding).

    Returns ``(keys, index)`` with ``index`` a long tensor ``[N, T]``. A layer's rows are the
    concatenation of its parameters' columns (weight columns, then the bias column), cut into
    tokens of ``T`` values, so the map follows from the layout alone.
    """
    keys = [spec.key for layer in layout.layers for spec in layer.parameters]
    blocks = []
    for layer in layout.layers:
        row = torch.full((layer.tokens_per_row * layout.tokensize,), -1, dtype=torch.long)
        for spec in layer.parameters:
            start = spec.column_offset
            row[start : start + spec.columns] = keys.index(spec.key)
        blocks.append(row.view(layer.tokens_per_row, layout.tokensize).repeat(layer.rows, 1))
    return keys, torch.cat(blocks)


def standardize_tokens(
    tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(tokens - mean) / std`` in float64 with per-value maps (`NormalizationStats.token_maps`),
    rounded to the dtype of ``out`` (default: a new tensor like ``tokens``; may be ``tokens``)."""
    mean, std = mean.to(tokens.device), std.to(tokens.device)
    return _in_float64_per_sequence(tokens, out, lambda values: values.sub_(mean).div_(std))


def unstandardize_tokens(
    tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``tokens * std + mean`` in float64: the inverse of `standardize_tokens`."""
    mean, std = mean.to(tokens.device), std.to(tokens.device)
    return _in_float64_per_sequence(tokens, out, lambda values: values.mul_(std).add_(mean))


def _in_float64_per_sequence(
    tokens: torch.Tensor, out: torch.Tensor | None, update: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply the in-place ``update`` to every ``[N, T]`` sequence of ``tokens`` in float64.

    The sequences pass one at a time through a single float64 buffer: a float64 copy of all of
    them (1.2 GB for ten ResNet-18) costs more in freshly faulted-in memory than the arithmetic,
    several seconds on a 2-core machine.
    """
    if out is None:
        out = torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device)
    sequences = zip(tokens.reshape(-1, *tokens.shape[-2:]), out.view(-1, *out.shape[-2:]))
    buffer = torch.empty(tokens.shape[-2:], dtype=torch.float64, device=tokens.device)
    for source, target in sequences:
        target.copy_(update(buffer.copy_(source)))
    return out


@dataclass
class NormalizationStats:
    """Mean and standard deviation of every tokenized parameter, over the training checkpoints.

    Standardizing per parameter (not over the whole network) puts layers of very different scale
    (a 5x5 conv kernel, a 20-unit classifier, BatchNorm running variances) on one scale for the
    autoencoder; sampled tokens are mapped back with `denormalize_tokens`. A parameter whose
    values do not vary (std below 1e-8) keeps std 1: it is only centred.
    """

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def from_state_dicts(
        cls, state_dicts: Iterable[Mapping[str, torch.Tensor]], keys: Sequence[str]
    ) -> NormalizationStats:
        """Accumulate the statistics of ``keys`` over ``state_dicts`` (float64 sums, one pass)."""
        count = dict.fromkeys(keys, 0)
        total = dict.fromkeys(keys, 0.0)
        total_squares = dict.fromkeys(keys, 0.0)
        for state_dict in state_dicts:
            for key in keys:
                values = state_dict[key].double()
                count[key] += values.numel()
                total[key] += values.sum().item()
                total_squares[key] += values.square().sum().item()
        if not all(count.values()):
            raise ValueError("normalization statistics need at least one checkpoint")
        mean = {key: total[key] / count[key] for key in keys}
        std = {}
        for key in keys:
            variance = max(total_squares[key] / count[key] - mean[key] ** 2, 0.0)
            std[key] = math.sqrt(variance) if math.sqrt(variance) >= MIN_STD else 1.0
        return cls(mean, std)

    def normalize(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``(w - mean) / std`` per parameter; tensors without statistics pass through."""
        return {
            key: (value - self.mean[key]) / self.std[key] if key in self.mean else value
            for key, value in state_dict.items()
        }

    def denormalize(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``w * std + mean`` per parameter: the inverse of `normalize`."""
        return {
            key: value * self.std[key] + self.mean[key] if key in self.mean else value
            for key, value in state_dict.items()
        }

    def token_maps(self, layout: WeightLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-value mean and std ``[N, T]`` (float64) for ``layout``; padding gets 0 and 1."""
        keys, index = parameter_key_index(layout)
        missing = [key for key in keys if key not in self.mean]
        if missing:
            raise KeyError(f"no normalization statistics for parameters {missing}")
        mean = torch.tensor([*(self.mean[key] for key in keys), 0.0], dtype=torch.float64)
        std = torch.tensor([*(self.std[key] for key in keys), 1.0], dtype=torch.float64)
        return mean[index], std[index]  # index -1 picks the padding entry at the end

    def normalize_tokens(self, tokens: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
        """Standardize raw tokens ``[..., N, T]`` (same as tokenizing `normalize`'s output)."""
        return standardize_tokens(tokens, *self.token_maps(layout))

    def denormalize_tokens(self, tokens: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
        """Map normalized tokens ``[..., N, T]`` back to weight scale (padding stays as given)."""
        return unstandardize_tokens(tokens, *self.token_maps(layout))

    def check(self, keys: Iterable[str]) -> None:
        """``ValueError`` naming the field unless there is a finite mean and a finite std of at
        least ``MIN_STD`` for exactly the parameters ``keys``.

        Statistics are read from files a user may have edited (``sane_zoo.json``,
        ``preprocessor_config.json``); a std of 0, NaN or 1e-30 would make every token NaN or
        huge, a negative one would silently flip the parameter. `from_state_dicts` never writes
        a std below ``MIN_STD``.
        """
        for name, values in (("mean", self.mean), ("std", self.std)):
            for key, value in values.items():
                if not isinstance(value, int | float) or not math.isfinite(value):
                    raise ValueError(f"normalization {name} of {key!r} is {value!r}, not finite")
                if name == "std" and not value >= MIN_STD:
                    raise ValueError(
                        f"normalization std of {key!r} is {value!r}, must be > 0 (at least "
                        f"{MIN_STD})"
                    )
        keys = set(keys)
        if set(self.mean) != keys or set(self.std) != keys:
            differing = sorted((set(self.mean) | set(self.std)) ^ keys)
            raise ValueError(
                f"normalization statistics do not cover exactly the layout's parameters "
                f"(differing: {differing[:3]}; {len(self.mean)} means, {len(self.std)} stds, "
                f"{len(keys)} parameters)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"mean": dict(self.mean), "std": dict(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NormalizationStats:
        return cls(mean=dict(data["mean"]), std=dict(data["std"]))
