"""The layout of a tokenized network: which tensor went to which rows and tokens, and back.

A ``WeightLayout`` is what makes decoding exact without a reference checkpoint (keys, shapes,
dtypes, how each tensor maps onto rows, token offsets). It is JSON, so it travels with zoos,
checkpoints and processors; ``WeightTokenizer`` (``tokenization``) computes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

LAYOUT_FORMAT = "sane_hf.WeightLayout"
LAYOUT_VERSION = 1


def real_entry_mask(counts: Tensor, tokensize: int) -> Tensor:
    """Bool mask ``[..., tokensize]`` of real entries from the number of real values per token.

    Tokens hold their real values first and zero padding after them, so a per-token count is
    all a zoo dataset stores; this is the one place that turns counts back into a mask.
    """
    counts = torch.as_tensor(counts)
    if counts.numel() and (counts.min() < 0 or counts.max() > tokensize):
        raise ValueError(
            f"counts must lie in [0, tokensize={tokensize}], got [{counts.min()}, {counts.max()}]"
        )
    return torch.arange(tokensize, device=counts.device) < counts.unsqueeze(-1)


@dataclass(frozen=True)
class TensorSpec:
    """A state_dict entry: its key, shape and dtype (e.g. ``"float32"``)."""

    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ParameterSpec(TensorSpec):
    """A tensor of a layer and the columns it fills in each of the layer's rows.

    ``transform`` says how the tensor maps onto ``[rows, columns]``: ``"rows"`` reads it
    output-first along dim 0, ``"transpose"`` swaps a ``[in, out]`` matrix (GPT-2's Conv1D), and
    ``"conv_transpose"`` regroups a ``[in, out/groups, k...]`` ConvTranspose weight per output
    channel.
    """

    transform: str = "rows"
    groups: int = 1
    column_offset: int = 0
    columns: int = 0


@dataclass(frozen=True)
class KeptTensor(TensorSpec):
    """A non-float tensor (e.g. ``num_batches_tracked``), stored by value so decoding restores it."""

    values: tuple = ()


@dataclass(frozen=True)
class LayerSpec:
    """One tokenized layer: ``rows`` rows of ``row_length`` values, each cut into tokens."""

    name: str
    kind: str
    parameters: tuple[ParameterSpec, ...]
    rows: int
    row_length: int
    tokens_per_row: int
    token_offset: int

    @property
    def num_tokens(self) -> int:
        return self.rows * self.tokens_per_row


@dataclass(frozen=True, repr=False)
class WeightLayout:
    """Everything needed to turn tokens back into a state_dict, JSON-serializable.

    ``keys`` is the order of the source state_dict; ``kept`` holds non-float tensors by value;
    ``skipped`` lists normalization tensors left out with ``include_norm=False`` (decode restores
    them only from ``fill_from``).
    """

    tokensize: int
    layers: tuple[LayerSpec, ...]
    keys: tuple[str, ...]
    kept: tuple[KeptTensor, ...] = ()
    skipped: tuple[TensorSpec, ...] = ()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_tokens={self.num_tokens}, tokensize={self.tokensize}, "
            f"num_layers={self.num_layers}, kept={len(self.kept)}, skipped={len(self.skipped)})"
        )

    @property
    def num_tokens(self) -> int:
        last = self.layers[-1]
        return last.token_offset + last.num_tokens

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def skipped_keys(self) -> list[str]:
        return [spec.key for spec in self.skipped]

    def row_counts(self) -> Tensor:
        """Number of real (unpadded) values in every token: long tensor ``[N]``."""
        table = _token_table(self)
        return (table["row_length"] - table["chunk"] * self.tokensize).clamp_(max=self.tokensize)

    def mask(self) -> Tensor:
        """Bool tensor ``[N, T]``, True on real values: the tokens' mask, without any weights."""
        return real_entry_mask(self.row_counts(), self.tokensize)

    def positions(self) -> Tensor:
        """Long tensor ``[N, 3]`` of (global index, layer index, row index), without any weights."""
        table = _token_table(self)
        return torch.stack([table["token"], table["layer"], table["row"]], dim=1)

    def check_compatible(self, weights: nn.Module | Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` unless ``weights`` has exactly this layout's keys and shapes.

        Use it before loading decoded weights into a model: a layout from another architecture
        is reported with the missing / unexpected keys and the shapes expected vs found.
        """
        state = weights.state_dict() if isinstance(weights, nn.Module) else weights
        expected = {spec.key: spec.shape for spec in self._tensor_specs()}
        found = {key: tuple(value.shape) for key, value in state.items()}
        problems = []
        if missing := [key for key in expected if key not in found]:
            problems.append(f"missing keys {missing}")
        if unexpected := [key for key in found if key not in expected]:
            problems.append(f"unexpected keys {unexpected}")
        problems += [
            f"{key!r} has shape {list(found[key])}, layout expects {list(shape)}"
            for key, shape in expected.items()
            if key in found and found[key] != shape
        ]
        if problems:
            raise ValueError("weights do not match the layout: " + "; ".join(problems))

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(key, shape)`` of every tensor of the source state_dict, in its order."""
        shapes = {spec.key: tuple(spec.shape) for spec in self._tensor_specs()}
        return [(key, shapes[key]) for key in self.keys]

    def _tensor_specs(self) -> list[TensorSpec]:
        tokenized = [spec for layer in self.layers for spec in layer.parameters]
        return [*tokenized, *self.kept, *self.skipped]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; ``WeightLayout.from_dict`` is the inverse."""
        return {
            "format": LAYOUT_FORMAT,
            "version": LAYOUT_VERSION,
            **dataclasses.asdict(self),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightLayout:
        if data.get("format") != LAYOUT_FORMAT or data.get("version") != LAYOUT_VERSION:
            raise ValueError(
                f"not a {LAYOUT_FORMAT} version {LAYOUT_VERSION} dict: "
                f"got format={data.get('format')!r}, version={data.get('version')!r}"
            )
        layers = tuple(
            LayerSpec(
                **{
                    **layer,
                    "parameters": tuple(_spec(ParameterSpec, p) for p in layer["parameters"]),
                }
            )
            for layer in data["layers"]
        )
        layout = cls(
            tokensize=data["tokensize"],
            layers=layers,
            keys=tuple(data["keys"]),
            kept=tuple(_spec(KeptTensor, kept) for kept in data["kept"]),
            skipped=tuple(_spec(TensorSpec, skipped) for skipped in data["skipped"]),
        )
        layout._check_consistent()
        return layout

    def _check_consistent(self) -> None:
        """Catch edited or corrupted layouts before they decode into garbage."""
        if not self.layers:
            raise ValueError("layout has no layers")
        offset = 0
        for layer in self.layers:
            where = f"layout layer {layer.name!r}"
            if layer.token_offset != offset:
                raise ValueError(f"{where} starts at token {layer.token_offset}, expected {offset}")
            if layer.row_length != sum(spec.columns for spec in layer.parameters):
                raise ValueError(f"{where}: row_length differs from its parameters' columns")
            if layer.tokens_per_row != math.ceil(layer.row_length / self.tokensize):
                raise ValueError(f"{where}: tokens_per_row does not fit tokensize {self.tokensize}")
            for spec in layer.parameters:
                if layer.rows * spec.columns != math.prod(spec.shape):
                    raise ValueError(
                        f"{where}: {spec.key!r} of shape {list(spec.shape)} does not "
                        f"fill {layer.rows} rows of {spec.columns} columns"
                    )
            offset += layer.num_tokens

    def save(self, path: str | PathLike) -> None:
        with open(path, "w") as file:
            json.dump(self.to_dict(), file)

    @classmethod
    def load(cls, path: str | PathLike) -> WeightLayout:
        with open(path) as file:
            return cls.from_dict(json.load(file))


def _spec(spec_class: type, data: Mapping[str, Any]):
    """Rebuild a spec dataclass from JSON, where tuples came back as lists."""
    data = {**data, "shape": tuple(data["shape"])}
    if "values" in data:
        data["values"] = tuple(data["values"])
    return spec_class(**data)


def _token_table(layout: WeightLayout) -> dict[str, Tensor]:
    """Per-token layer index, row index, chunk index within the row and row length."""
    layers = layout.layers
    tokens_per_layer = torch.tensor([layer.num_tokens for layer in layers])
    layer = torch.repeat_interleave(torch.arange(len(layers)), tokens_per_layer)
    offset = torch.tensor([spec.token_offset for spec in layers])[layer]
    tokens_per_row = torch.tensor([spec.tokens_per_row for spec in layers])[layer]
    token = torch.arange(layout.num_tokens)
    index_in_layer = token - offset
    return {
        "token": token,
        "layer": layer,
        "row": index_in_layer // tokens_per_row,
        "chunk": index_in_layer % tokens_per_row,
        "row_length": torch.tensor([spec.row_length for spec in layers])[layer],
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in layout")
    return dtype
