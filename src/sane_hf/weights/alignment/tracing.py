"""Deriving a permutation spec: channel-group propagation over a ``torch.fx`` graph.

Returns plain data (group sizes, per-key ``(group, block)`` axis entries, buffer keys) that
``PermutationSpec.from_model`` wraps, so this module does not depend on the spec class.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

_FIXED = 0  # the union-find id of "never permuted"

_ELEMENTWISE_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
)

_POOL_MODULES = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}

_POOL_FUNCTIONS = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}

_ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.pow,
    operator.neg,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.pow,
    torch.neg,
    torch.abs,
    torch.exp,
    torch.sqrt,
    torch.erf,
    torch.tanh,
    torch.sigmoid,
    torch.relu,
    torch.clamp,
    torch.maximum,
    torch.minimum,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.sigmoid,
    F.tanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
}

_ELEMENTWISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "pow",
    "neg",
    "abs",
    "exp",
    "sqrt",
    "erf",
    "tanh",
    "sigmoid",
    "relu",
    "clamp",
    "add_",
    "sub_",
    "mul_",
    "div_",
    "relu_",
    "tanh_",
    "sigmoid_",
    "clamp_",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "bfloat16",
}

_SHAPE_METHODS = {"size", "dim", "numel"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
_PYTHON_MODULES = {"_operator", "operator", "math", "builtins"}
_BATCH_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_BATCH_NORM_RANKS = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}  # BatchNorm1d takes [N, C] or [N, C, L]
_BATCH_NORM_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class _Channels:
    """The one permuted axis of a traced tensor: counted from the end, so broadcasting aligns it.

    ``block`` is ``None`` after a flatten of unknown inner size; the consuming layer resolves it
    from its feature count (its input length divided by the group size).
    """

    group: int
    axis: int
    block: int | None


@dataclass(frozen=True)
class _Value:
    """What the propagation knows about a traced value.

    ``shape_only`` marks Python values computed from shapes alone (``x.size(-1) ** -0.5``): they
    cannot change under a permutation, so combining them with a permuted tensor is safe.
    """

    channels: _Channels | None = None
    rank: int | None = None
    shape_only: bool = False


class _UnionFind:
    """Channel groups joined by residual additions; joining a group with ``_FIXED`` fixes it."""

    def __init__(self):
        self.parent = [_FIXED]
        self.sizes = [0]
        self.names = ["<fixed>"]

    def new(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        self.names.append(name)
        return len(self.parent) - 1

    def find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def union(self, a: int, b: int) -> None:
        """Join two groups; groups of different sizes cannot be one permutation: fix both."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if _FIXED not in (a, b) and self.sizes[a] != self.sizes[b]:
            self.parent[a] = self.parent[b] = _FIXED
            return
        self.parent[max(a, b)] = min(a, b)  # the earliest group names the union; _FIXED wins

    def fix(self, group: int) -> None:
        self.union(_FIXED, group)

    def is_fixed(self, group: int) -> bool:
        return self.find(group) == _FIXED


class _LayerTracer(torch.fx.Tracer):
    """Keeps the layers the propagation understands (incl. transformers' Conv1D) as graph leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_transformers_conv1d(m) or super().is_leaf_module(m, module_qualified_name)


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (a linear layer with weight ``[in, out]``), without importing transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and type(module) is pytorch_utils.Conv1D  # not subclasses


def _try_trace(module: nn.Module) -> torch.fx.Graph | None:
    try:
        return _LayerTracer().trace(module)
    except Exception:  # any failure only means: split the module into its children
        return None


def _flatten_dims(value: _Value, start: int, end: int) -> _Value:
    """``flatten(start, end)``: the channel survives if it is outside the range or its outermost dim."""
    if value.rank is None:  # flatten(start, -1) of anything has rank start + 1
        return _Value(rank=start + 1 if start >= 0 and end == -1 else None)
    rank = value.rank
    start, end = start % rank, end % rank
    new_rank = rank - (end - start)
    channels = value.channels
    if channels is None:
        return _Value(rank=new_rank)
    position = rank + channels.axis
    if position < start:
        return _Value(_Channels(channels.group, position - new_rank, channels.block), new_rank)
    if position > end:
        return _Value(channels, new_rank)
    if position == start:
        block = channels.block if start == end else None
        return _Value(_Channels(channels.group, start - new_rank, block), new_rank)
    return _Value(rank=new_rank)


def _single_input(node: torch.fx.Node, values: dict) -> _Value | None:
    """The value a layer-like call reads, or None unless it reads exactly one traced value.

    Layers, flatten and pooling are only understood when every other argument is a literal.
    """
    inputs = node.all_input_nodes
    return values[inputs[0]] if len(inputs) == 1 else None


def _arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    """A call's argument by position or keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class _SpecBuilder:
    """Propagates channel groups through the traced graphs of ``module`` and collects a spec."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.groups = _UnionFind()
        state = module.state_dict()
        self.key_axes: dict[str, list[tuple[int, int] | None]] = {
            key: [None] * t.dim() for key, t in state.items()
        }
        self.opaque: set[str] = set()
        self.buffers = frozenset(name for name, _ in module.named_buffers()) & set(state)

    def build(self) -> dict[str, Any]:
        self._visit(self.module, "")
        self._join_shared_parameters()
        for key in self.opaque:
            for entry in self.key_axes[key]:
                if entry is not None:
                    self.groups.fix(entry[0])
        return self._spec()

    def _visit(self, module: nn.Module, prefix: str) -> None:
        """Trace ``module`` as a whole, or else each child on its own (with fixed boundaries)."""
        graph = _try_trace(module)
        if graph is None:
            for name, child in module.named_children():
                self._visit(child, f"{prefix}{name}.")
            return
        values: dict[torch.fx.Node, _Value] = {}
        for node in graph.nodes:
            values[node] = self._propagate(node, module, prefix, values)

    def _propagate(self, node: torch.fx.Node, root: nn.Module, prefix: str, values: dict) -> _Value:
        if node.op == "placeholder":
            return _Value()
        if node.op == "get_attr":  # a parameter used outside its layer: never permute it
            self._mark_opaque(prefix + node.target)
            return _Value()
        if node.op == "call_module":
            return self._call_module(
                node, root.get_submodule(node.target), prefix + node.target, values
            )
        if node.op in ("call_function", "call_method"):
            return self._call_function(node, values)
        return self._unknown(node, values)  # output: the network's outputs are never permuted

    def _call_module(
        self, node: torch.fx.Node, module: nn.Module, name: str, values: dict
    ) -> _Value:
        value = _single_input(node, values)
        if value is None:
            self._mark_opaque(name)
            return self._unknown(node, values)
        if isinstance(module, nn.Linear):
            return self._dense(
                name, value, module.in_features, module.out_features, 0, -1, value.rank
            )
        if _is_transformers_conv1d(module):
            return self._dense(name, value, module.nx, module.nf, 1, -1, value.rank)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and module.groups == 1:
            dims = len(module.kernel_size)
            return self._dense(
                name, value, module.in_channels, module.out_channels, 0, -dims - 1, dims + 2
            )
        if isinstance(module, _BATCH_NORM_MODULES):
            rank = value.rank or _BATCH_NORM_RANKS.get(type(module))
            if rank is None:
                return self._unknown(node, values)
            return self._affine(
                name, value, _BATCH_NORM_KEYS, 0, module.num_features, 1 - rank, rank
            )
        if isinstance(module, nn.LayerNorm):
            dims = len(module.normalized_shape)
            channels = value.channels
            axis = channels.axis if channels is not None and channels.axis >= -dims else -1
            features = module.normalized_shape[dims + axis]
            return self._affine(
                name, value, ("weight", "bias"), dims + axis, features, axis, value.rank
            )
        if isinstance(module, nn.Flatten):
            return self._flatten(node, value, module.start_dim, module.end_dim, values)
        if type(module) in _POOL_MODULES and not getattr(module, "return_indices", False):
            return self._pool(node, value, _POOL_MODULES[type(module)], values)
        if isinstance(module, _ELEMENTWISE_MODULES):
            return self._elementwise(node, values)
        self._mark_opaque(name)
        return self._unknown(node, values)

    def _call_function(self, node: torch.fx.Node, values: dict) -> _Value:
        target = node.target
        operands = [values[n] for n in node.all_input_nodes]
        value = _single_input(node, values)
        if node.op == "call_method":
            if target in _SHAPE_METHODS:
                return _Value(shape_only=True)
            if target == "flatten" and value is not None:
                return self._flatten(
                    node, value, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), values
                )
            if target in _ELEMENTWISE_METHODS:
                return self._elementwise(node, values)
            return self._unknown(node, values)
        if target is getattr and node.args[1] in _SHAPE_ATTRIBUTES:
            return _Value(shape_only=True)
        if getattr(target, "__module__", None) in _PYTHON_MODULES and all(
            v.shape_only for v in operands
        ):
            return _Value(shape_only=True)
        if target in _ELEMENTWISE_FUNCTIONS:
            return self._elementwise(node, values)
        if target is torch.flatten and value is not None:
            return self._flatten(
                node, value, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), values
            )
        if (
            target in _POOL_FUNCTIONS
            and value is not None
            and not node.kwargs.get("return_indices", False)
        ):
            return self._pool(node, value, _POOL_FUNCTIONS[target], values)
        return self._unknown(node, values)

    def _dense(
        self,
        name: str,
        value: _Value,
        in_features: int,
        out_features: int,
        weight_out_axis: int,
        channel_axis: int,
        rank: int | None,
    ) -> _Value:
        """Linear/conv layer: its input axis joins the incoming group, its output starts a new one."""
        self._consume(f"{name}.weight", 1 - weight_out_axis, value, in_features, channel_axis)
        group = self.groups.new(name, out_features)
        self._assign(f"{name}.weight", weight_out_axis, group, 1)
        self._assign(f"{name}.bias", 0, group, 1)
        return _Value(_Channels(group, channel_axis, 1), rank)

    def _affine(
        self,
        name: str,
        value: _Value,
        keys: Sequence[str],
        param_axis: int,
        features: int,
        channel_axis: int,
        rank: int | None,
    ) -> _Value:
        """Normalization layer: its parameters and buffers follow the channel they scale."""
        block = self._block(value.channels, channel_axis, features)
        if block is None:
            for key in keys:
                self._consume(f"{name}.{key}", param_axis, value, features, channel_axis)
            return _Value(rank=rank)
        for key in keys:
            self._assign(f"{name}.{key}", param_axis, value.channels.group, block)
        return _Value(_Channels(value.channels.group, channel_axis, block), rank)

    def _flatten(
        self, node: torch.fx.Node, value: _Value, start: int, end: int, values: dict
    ) -> _Value:
        result = _flatten_dims(value, start, end)
        if value.channels is not None and result.channels is None:
            self._unknown(node, values)
        return result

    def _pool(self, node: torch.fx.Node, value: _Value, dims: int, values: dict) -> _Value:
        """Pooling works per channel over the last ``dims`` axes."""
        if value.channels is not None and value.channels.axis >= -dims:
            return self._unknown(node, values)
        return _Value(value.channels, value.rank)

    def _elementwise(self, node: torch.fx.Node, values: dict) -> _Value:
        """Elementwise/broadcasting op: permuted operands must agree (a residual sum joins groups)."""
        tensors = [values[n] for n in node.all_input_nodes if not values[n].shape_only]
        if not tensors:
            return _Value(shape_only=True)
        ranks = {v.rank for v in tensors}
        rank = ranks.pop() if len(ranks) == 1 else None
        channels = [v.channels for v in tensors if v.channels is not None]
        if not channels:
            return _Value(rank=rank)
        blocks = {c.block for c in channels if c.block is not None}
        if len(channels) < len(tensors) or len({c.axis for c in channels}) > 1 or len(blocks) > 1:
            return self._unknown(node, values)  # an unpermuted tensor meets a permuted one
        for other in channels[1:]:
            self.groups.union(channels[0].group, other.group)
        block = blocks.pop() if blocks else None
        return _Value(_Channels(channels[0].group, channels[0].axis, block), rank)

    def _unknown(self, node: torch.fx.Node, values: dict) -> _Value:
        """An op the propagation does not understand: fix every group that flows into it."""
        for input_node in node.all_input_nodes:
            channels = values[input_node].channels
            if channels is not None:
                self.groups.fix(channels.group)
        return _Value()

    def _block(self, channels: _Channels | None, channel_axis: int, features: int) -> int | None:
        """Block size with which ``channels`` fill an axis of ``features`` elements, or None."""
        if (
            channels is None
            or channels.axis != channel_axis
            or self.groups.is_fixed(channels.group)
        ):
            return None
        size = self.groups.sizes[self.groups.find(channels.group)]
        if channels.block is None:
            return features // size if features % size == 0 else None
        return channels.block if channels.block * size == features else None

    def _consume(
        self, key: str, axis: int, value: _Value, features: int, channel_axis: int
    ) -> None:
        """Tie ``key``'s input ``axis`` to the incoming group, or fix both if they do not fit."""
        block = self._block(value.channels, channel_axis, features)
        if block is None:
            if value.channels is not None:
                self.groups.fix(value.channels.group)
            self._assign(key, axis, _FIXED, 1)
        else:
            self._assign(key, axis, value.channels.group, block)

    def _assign(self, key: str, axis: int, group: int, block: int) -> None:
        """Record that ``key``'s ``axis`` moves with ``group``; a second use must agree with the first."""
        if key not in self.key_axes:  # e.g. a layer without bias
            return
        previous = self.key_axes[key][axis]
        if previous is None:
            self.key_axes[key][axis] = (group, block)
        elif previous[1] == block:
            self.groups.union(previous[0], group)
        else:
            self.groups.fix(previous[0])
            self.groups.fix(group)

    def _mark_opaque(self, name: str) -> None:
        self.opaque.update(k for k in self.key_axes if k == name or k.startswith(f"{name}."))

    def _join_shared_parameters(self) -> None:
        """Keys of one shared tensor must be permuted alike; any disagreement fixes the groups."""
        keys_by_tensor: dict[int, list[str]] = {}
        for key, tensor in self.module.state_dict(keep_vars=True).items():
            keys_by_tensor.setdefault(id(tensor), []).append(key)
        for keys in keys_by_tensor.values():
            for key in keys[1:]:
                for axis, (first, other) in enumerate(
                    zip(self.key_axes[keys[0]], self.key_axes[key])
                ):
                    if first is None or other is None or first[1] != other[1]:
                        for entry in (first, other):
                            if entry is not None:
                                self.groups.fix(entry[0])
                    else:
                        self.groups.union(first[0], other[0])
                    self.key_axes[key][axis] = self.key_axes[keys[0]][axis]

    def _spec(self) -> dict[str, Any]:
        names: dict[int, str] = {}
        for entries in self.key_axes.values():
            for entry in entries:
                root = None if entry is None else self.groups.find(entry[0])
                if root not in (None, _FIXED) and root not in names:
                    names[root] = self._unique_name(self.groups.names[root], names.values())
        axes = {
            key: tuple(
                None
                if entry is None or self.groups.is_fixed(entry[0])
                else (names[self.groups.find(entry[0])], entry[1])
                for entry in entries
            )
            for key, entries in self.key_axes.items()
        }
        groups = {names[root]: self.groups.sizes[root] for root in sorted(names)}
        return {"groups": groups, "axes": axes, "buffers": self.buffers}

    @staticmethod
    def _unique_name(name: str, taken: Any) -> str:
        taken = set(taken)
        candidate, index = name, 1
        while candidate in taken:
            candidate, index = f"{name}#{index}", index + 1
        return candidate


def derive_permutation_groups(module: nn.Module) -> dict[str, Any]:
    """``PermutationSpec`` fields of ``module`` (groups, axes as ``(group, block)`` pairs, buffers)."""
    return _SpecBuilder(module).build()
