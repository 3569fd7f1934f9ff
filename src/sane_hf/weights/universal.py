"""Weight tokens that are not tied to one zoo: one representation for networks of many shapes.

The per-parameter mode of ``normalization`` needs statistics fitted on a zoo and positions that
count one architecture's tokens and layers. A `TokenScheme` instead reads any network built from
``Linear``, ``Conv1d``/``Conv2d``, ``BatchNorm``, ``LayerNorm`` and ``Embedding`` layers (residual
blocks are compositions of these) with nothing fitted:

- **tokens**: ``"row"`` cuts every output unit's row (weights, then the bias) into tokens of
  ``T`` values, as SANE does; ``"dense"`` flattens the whole layer (the same rows one after
  the other) and chunks it, as GeoSANE does, which wastes little padding on short rows;
- **positions** ``(depth, layer type, index in layer)``: the module's relative depth quantized
  to ``depth_buckets`` steps, a layer-type id (`LAYER_TYPES`) and the token's index within its
  layer. None of them counts one architecture's tokens, so networks of different depth share
  the tables;
- **scale** without zoo statistics: ``"none"`` (raw weights; pair it with a masked loss
  normalization of the model, ``SaneConfig.loss_normalization``), ``"fan_in"`` (each layer
  divided by a power of two near ``1 / sqrt(fan_in)``, fixed by the layer's shape) or
  ``"layer"`` (each layer of each network divided by a power of two near its own RMS; the
  scales travel beside the tokens). Powers of two make ``decode`` bit-exact;
- **alignment** without a reference: ``"canonical"`` sorts the hidden units of every
  permutation group of a `PermutationSpec` by a permutation-covariant key (the squared norm of
  the unit's weights over every tensor the group moves), so equivalent networks get one order.

``decode`` needs the tokens, the scales and the target architecture's layout only. Tensors are
read in sorted key order, the order of every ``.safetensors`` file, so that a module and its
saved file tokenize alike (a file does not keep the module's order); relative depth follows it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sane_hf.weights.alignment import PermutationSpec, apply_permutation
from sane_hf.weights.layout import LayerSpec, WeightLayout
from sane_hf.weights.tokenization import WeightTokenizer

LAYER_TYPES = (
    "linear",
    "conv1d",
    "conv2d",
    "embedding",
    "batchnorm",
    "batchnorm_running_mean",
    "batchnorm_running_var",
    "layernorm",
)
TOKEN_MODES = ("row", "dense")
SCALE_MODES = ("none", "fan_in", "layer")
ALIGNMENTS = ("none", "canonical")
SUPPORTED_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Embedding,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
)


@dataclass(frozen=True)
class TokenScheme:
    """How networks become tokens without zoo statistics; JSON in configs and datasets."""

    tokensize: int = 64
    token_mode: str = "row"
    scale: str = "fan_in"
    alignment: str = "none"
    depth_buckets: int = 32

    def __post_init__(self):
        for name, value, options in (
            ("token_mode", self.token_mode, TOKEN_MODES),
            ("scale", self.scale, SCALE_MODES),
            ("alignment", self.alignment, ALIGNMENTS),
        ):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        if self.tokensize < 1 or self.depth_buckets < 2:
            raise ValueError(
                f"tokensize must be >= 1 and depth_buckets >= 2, got {self.tokensize}, "
                f"{self.depth_buckets}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenScheme:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown token scheme settings {unknown}")
        return cls(**data)

    def max_positions(self, max_tokens_per_layer: int) -> tuple[int, int, int]:
        """Position-table sizes a model needs: depth buckets, layer types, tokens per layer."""
        return (self.depth_buckets, len(LAYER_TYPES), max_tokens_per_layer)


@dataclass(eq=False)
class UniversalTokens:
    """One network's tokens ``[N, T]``, real values per token ``counts`` ``[N]``, positions
    ``[N, 3]`` and one scale per layer of ``layout`` (``decode`` multiplies by them)."""

    tokens: Tensor
    counts: Tensor
    positions: Tensor
    scales: Tensor
    layout: WeightLayout

    @property
    def mask(self) -> Tensor:
        return torch.arange(self.tokens.shape[1]) < self.counts[:, None]


def check_supported_modules(module: nn.Module) -> None:
    """Refuse a module holding parameters in a layer type the scheme does not read, in one line."""
    for name, submodule in module.named_modules():
        own = list(submodule.parameters(recurse=False))
        if own and not isinstance(submodule, SUPPORTED_MODULES):
            supported = ", ".join(cls.__name__ for cls in SUPPORTED_MODULES)
            raise ValueError(
                f"unsupported layer {name or '<root>'!r} ({type(submodule).__name__}): "
                f"universal tokens read {supported} (and residual blocks of them)"
            )


def layer_types(layout: WeightLayout) -> list[str]:
    """The `LAYER_TYPES` name of every layer; raise naming the first layer of another type."""
    modules_with_stats = {
        _module_name(layer) for layer in layout.layers if layer.kind == "running_mean"
    }
    types = []
    for layer in layout.layers:
        weight = layer.parameters[0]
        if layer.kind in ("linear", "embedding") and len(weight.shape) == 2:
            is_embedding = layer.kind == "embedding" or "embed" in weight.key
            types.append("embedding" if is_embedding else "linear")
        elif layer.kind == "conv" and len(weight.shape) in (3, 4):
            types.append(f"conv{len(weight.shape) - 2}d")
        elif layer.kind == "norm":
            batchnorm = _module_name(layer) in modules_with_stats
            types.append("batchnorm" if batchnorm else "layernorm")
        elif layer.kind in ("running_mean", "running_var"):
            types.append(f"batchnorm_{layer.kind}")
        else:
            raise ValueError(
                f"unsupported layer {layer.name!r} ({layer.kind}, weight shape "
                f"{list(weight.shape)}): universal tokens read {', '.join(LAYER_TYPES)}"
            )
    return types


class UniversalTokenizer:
    """Tokenizes networks of any supported architecture under one `TokenScheme`, and back."""

    def __init__(self, scheme: TokenScheme):
        self.scheme = scheme
        self._rows = WeightTokenizer(scheme.tokensize, include_norm=True, dtype=torch.float32)

    def layout(self, weights: nn.Module | Mapping[str, Tensor]) -> WeightLayout:
        """The row layout of an architecture (a module or a state_dict of it)."""
        if isinstance(weights, nn.Module):
            check_supported_modules(weights)
        layout = self._rows.layout(sorted_state_dict(weights))
        layer_types(layout)
        return layout

    @torch.no_grad()
    def __call__(
        self,
        weights: nn.Module | Mapping[str, Tensor],
        spec: PermutationSpec | None = None,
    ) -> UniversalTokens:
        """Tokens of one network; ``spec`` is needed for ``alignment="canonical"``."""
        if isinstance(weights, nn.Module):
            check_supported_modules(weights)
        weights = sorted_state_dict(weights)
        if self.scheme.alignment == "canonical":
            if spec is None:
                raise ValueError("canonical alignment needs the architecture's PermutationSpec")
            weights = canonical_order(weights, spec)
        encoded = self._rows(weights)
        layout = encoded.layout
        types = layer_types(layout)
        scales = self._scales(encoded.tokens, layout)
        chunks, counts, positions = [], [], []
        depth = _depth_buckets(layout, self.scheme.depth_buckets)
        for index, layer in enumerate(layout.layers):
            values = _layer_values(encoded.tokens, layer, layout.tokensize) / scales[index]
            tokens, layer_counts = self._cut(values, layer)
            chunks.append(tokens)
            counts.append(layer_counts)
            layer_positions = torch.zeros(len(tokens), 3, dtype=torch.long)
            layer_positions[:, 0] = depth[index]
            layer_positions[:, 1] = LAYER_TYPES.index(types[index])
            layer_positions[:, 2] = torch.arange(len(tokens))
            positions.append(layer_positions)
        return UniversalTokens(
            torch.cat(chunks), torch.cat(counts), torch.cat(positions), scales, layout
        )

    tokenize = __call__

    def num_tokens(self, layout: WeightLayout) -> int:
        return sum(self._tokens_per_layer(layer) for layer in layout.layers)

    def decode(self, tokens: Tensor, layout: WeightLayout, scales: Tensor) -> dict[str, Tensor]:
        """The state_dict of ``layout``'s architecture from tokens ``[N, T]`` and per-layer
        ``scales`` (padding is ignored); exact for tokens made by this tokenizer."""
        expected = (self.num_tokens(layout), self.scheme.tokensize)
        if tokens.dim() != 2 or tuple(tokens.shape) != expected:
            raise ValueError(
                f"tokens have shape {list(tokens.shape)} but this architecture needs "
                f"{list(expected)} under the scheme {self.scheme.to_dict()}"
            )
        if len(scales) != layout.num_layers:
            raise ValueError(f"{len(scales)} scales for {layout.num_layers} layers")
        tokens = tokens.detach().float().cpu()
        rows = torch.zeros(layout.num_tokens, layout.tokensize)
        start = 0
        for index, layer in enumerate(layout.layers):
            size = self._tokens_per_layer(layer)
            values = self._join(tokens[start : start + size], layer) * scales[index].float()
            _layer_values(rows, layer, layout.tokensize).copy_(values)
            start += size
        return self._rows.decode(rows, layout)

    # -- scales and cuts ---------------------------------------------------------------------

    def _scales(self, row_tokens: Tensor, layout: WeightLayout) -> Tensor:
        """One power of two per layer (1 for ``scale="none"``)."""
        scales = []
        for layer in layout.layers:
            if self.scheme.scale == "fan_in" and layer.kind in ("linear", "conv", "embedding"):
                scale = layer.parameters[0].columns ** -0.5
            elif self.scheme.scale == "layer":
                values = _layer_values(row_tokens, layer, layout.tokensize).double()
                scale = values.square().mean().sqrt().item()
            else:
                scale = 1.0
            scales.append(_power_of_two(scale))
        return torch.tensor(scales, dtype=torch.float32)

    def _tokens_per_layer(self, layer: LayerSpec) -> int:
        if self.scheme.token_mode == "row":
            return layer.num_tokens
        return math.ceil(layer.rows * layer.row_length / self.scheme.tokensize)

    def _cut(self, values: Tensor, layer: LayerSpec) -> tuple[Tensor, Tensor]:
        """Tokens ``[n, T]`` and real values per token of a layer's ``[rows, row_length]``."""
        size = self.scheme.tokensize
        if self.scheme.token_mode == "row":
            per_row = layer.tokens_per_row
            padded = values.new_zeros(layer.rows, per_row * size)
            padded[:, : layer.row_length] = values
            chunk_counts = (layer.row_length - torch.arange(per_row) * size).clamp(max=size)
            return padded.view(-1, size), chunk_counts.repeat(layer.rows)
        flat = values.reshape(-1)
        count = self._tokens_per_layer(layer)
        padded = flat.new_zeros(count * size)
        padded[: flat.numel()] = flat
        chunk_counts = (flat.numel() - torch.arange(count) * size).clamp(max=size)
        return padded.view(count, size), chunk_counts

    def _join(self, tokens: Tensor, layer: LayerSpec) -> Tensor:
        """The inverse of `_cut`: ``[rows, row_length]``."""
        if self.scheme.token_mode == "row":
            rows = tokens.reshape(layer.rows, layer.tokens_per_row * self.scheme.tokensize)
            return rows[:, : layer.row_length]
        flat = tokens.reshape(-1)[: layer.rows * layer.row_length]
        return flat.view(layer.rows, layer.row_length)


def sorted_state_dict(weights: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors in sorted key order: the order every ``.safetensors`` file has, so a module,
    its state_dict and its saved file give the same tokens and positions."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    return {key: state[key] for key in sorted(state)}


def canonical_order(state_dict: Mapping[str, Tensor], spec: PermutationSpec) -> dict[str, Tensor]:
    """Sort the units of every permutation group by descending squared weight norm.

    The key of unit ``c`` sums the squares of every learned tensor slice the group moves with
    ``c`` (buffers left out, as in weight matching), so it is covariant: a permuted copy of a
    network gets the same canonical network (ties aside). No reference network is involved.
    """
    state = dict(state_dict)
    perms = {}
    for group, size in spec.groups.items():
        key = torch.zeros(size, dtype=torch.float64)
        for name, axis, block in spec.group_axes[group]:
            if name in spec.buffers:
                continue
            tensor = state[name].double().movedim(axis, 0).reshape(size, block, -1)
            key += tensor.square().sum(dim=(1, 2))
        perms[group] = torch.argsort(key, descending=True, stable=True)
    return apply_permutation(state, spec, perms)


def _module_name(layer: LayerSpec) -> str:
    return layer.parameters[0].key.rpartition(".")[0]


def _depth_buckets(layout: WeightLayout, buckets: int) -> list[int]:
    """Relative depth of every layer's module (modules in state_dict order), in ``buckets``."""
    modules = list(dict.fromkeys(_module_name(layer) for layer in layout.layers))
    last = max(len(modules) - 1, 1)
    index = {name: i for i, name in enumerate(modules)}
    return [round(index[_module_name(layer)] / last * (buckets - 1)) for layer in layout.layers]


def _layer_values(tokens: Tensor, layer: LayerSpec, tokensize: int) -> Tensor:
    """A view ``[rows, row_length]`` of a layer's real values in row tokens ``[N, T]``."""
    region = tokens[layer.token_offset : layer.token_offset + layer.num_tokens]
    return region.reshape(layer.rows, layer.tokens_per_row * tokensize)[:, : layer.row_length]


def _power_of_two(scale: float) -> float:
    """The power of two nearest ``scale`` in log space (1 for 0 or a non-finite scale)."""
    if not math.isfinite(scale) or scale <= 0:
        return 1.0
    return 2.0 ** round(math.log2(scale))


__all__ = [
    "TokenScheme",
    "UniversalTokenizer",
    "UniversalTokens",
    "canonical_order",
    "check_supported_modules",
    "layer_types",
    "sorted_state_dict",
]
