"""Weight tokenization: cut a network's parameters into fixed-size tokens, and back.

    tokenizer = WeightTokenizer(tokensize=288)
    encoded = tokenizer(model)  # or a state_dict: tokens [N, T], mask, positions, layout
    state_dict = tokenizer.decode(encoded.tokens, encoded.layout)  # bit-exact

SANE reads a network as a sequence of weight tokens (Schürholt et al., ICML 2024):

- Every weight-bearing layer becomes rows, one per output channel / neuron: a conv kernel
  ``[out, in, kh, kw]`` gives rows of ``in*kh*kw`` values, a linear weight ``[out, in]`` rows of
  ``in``; the layer's bias is appended to each row as one more column.
- Normalization layers give per-channel rows. A BatchNorm contributes three layers (the
  reference's sequence lengths depend on it): its affine parameters (one row of ``[weight, bias]``
  per channel), its running means and its running variances (one value per channel each).
- A row longer than the token size ``T`` is split into ``ceil(len / T)`` consecutive tokens; the
  last one is zero-padded. ``mask`` marks the real values.
- Every token has a position ``(global index, layer index, row index)``; the chunks of one row
  share layer and row index.

The cut is driven by module type when an ``nn.Module`` is given (see ``_MODULE_RULES``), which gets
the rows right where the weight is not stored output-first: ``ConvTranspose`` weights are
``[in, out/groups, k...]`` and GPT-2's ``Conv1D`` weights are ``[in, out]``. A plain state_dict
is cut by shape alone (``_rules_by_shape``): there every weight is read output-first along dim 0.
Tensors no rule knows are still tokenized (``_generic_layers``): a tensor with two or more
dimensions as rows along dim 0 of ``flatten(1)``; a vector or scalar as one row, because nothing
says its entries are per-channel and one row wastes no padding. No floating-point tensor is ever
dropped: non-float buffers (``num_batches_tracked``) are stored by value in the layout, and
normalization tensors left out with ``include_norm=False`` are listed in it. Tied parameters
(GPT-2's ``lm_head`` and ``wte``) are tokenized under each of their keys, as ``state_dict()``
lists them.

The ``WeightLayout`` records everything decoding needs (keys, shapes, dtypes, how each tensor
maps onto rows, token offsets), so ``WeightTokenizer.decode`` is the exact inverse without any
reference checkpoint. Layouts are computed once per architecture and cached; tokenizing then
copies every tensor straight into its slice of one preallocated ``[N, T]`` buffer.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch
from torch import Tensor, nn

from sane_hf.weights.layout import (
    KeptTensor,
    LayerSpec,
    ParameterSpec,
    TensorSpec,
    WeightLayout,
    dtype_from_name,
    dtype_name,
)

__all__ = [
    "TokenizedWeights",
    "WeightTokenizer",
]

TOKEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NORM_KINDS = ("norm", "running_mean", "running_var")
MAX_CACHED_PLANS = 16  # architectures a tokenizer remembers (a ResNet-18 plan holds a 15 MB mask)


@dataclass(eq=False)
class TokenizedWeights:
    """The tokens of one network with their mask, positions and layout."""

    tokens: Tensor  # float [N, T]
    mask: Tensor  # bool [N, T], True on real values
    positions: Tensor  # long [N, 3]: (global index, layer index, row index)
    layout: WeightLayout

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> TokenizedWeights:
        return TokenizedWeights(
            self.tokens.to(device), self.mask.to(device), self.positions.to(device), self.layout
        )


# ----------------------------------------------------------------------------------------------
# Rules: which tensors of a module form a layer, and how they map onto rows


@dataclass
class _Layer:
    """A layer before placement: its tensors (local names) and the transform of each."""

    name: str
    kind: str
    rows: int
    members: list[tuple[str, str]]  # (local name, transform)
    groups: int = 1


_Rule = Callable[[nn.Module | None, dict[str, Tensor]], list[_Layer]]


def _output_rows(
    tensors: dict[str, Tensor],
    weight: str,
    kind: str,
    transform: str = "rows",
    groups: int = 1,
) -> list[_Layer]:
    """A weight read as one row per output unit, with its bias (``weight`` -> ``bias``,
    ``in_proj_weight`` -> ``in_proj_bias``) appended when there is one of matching length."""
    if weight not in tensors:
        return []
    shape = tensors[weight].shape
    rows = {"rows": shape[0], "transpose": shape[-1], "conv_transpose": shape[1] * groups}[
        transform
    ]
    members = [(weight, transform)]
    bias = weight.removesuffix("weight") + "bias"
    if bias in tensors and tensors[bias].shape == (rows,):
        members.append((bias, "rows"))
    name = weight.removesuffix("weight").rstrip("_")
    return [_Layer(name, kind, rows, members, groups)]


def _norm_layers(tensors: dict[str, Tensor]) -> list[_Layer]:
    """Affine parameters as one per-channel row, each running statistic as its own layer."""
    layers = []
    affine = [name for name in ("weight", "bias") if name in tensors]
    if affine:
        channels = tensors[affine[0]].numel()
        layers.append(_Layer("", "norm", channels, [(name, "rows") for name in affine]))
    for stat in ("running_mean", "running_var"):
        if stat in tensors:
            layers.append(_Layer(stat, stat, tensors[stat].numel(), [(stat, "rows")]))
    return layers


def _generic_layers(tensors: dict[str, Tensor]) -> list[_Layer]:
    """One layer per tensor: rows along dim 0 of ``flatten(1)``, or one row for a vector/scalar."""
    return [
        _Layer(name, "tensor", tensor.shape[0] if tensor.dim() >= 2 else 1, [(name, "rows")])
        for name, tensor in tensors.items()
    ]


def _rules_by_shape(module: nn.Module | None, tensors: dict[str, Tensor]) -> list[_Layer]:
    """Rules for plain state_dicts and unknown modules: every ``*weight`` with >= 2 dims (plus its
    ``*bias``) gives rows along dim 0; a 1-D ``weight`` is a normalization layer."""
    layers = []
    for name, tensor in tensors.items():
        if name.endswith("weight") and tensor.dim() >= 2:
            layers += _output_rows(tensors, name, "linear" if tensor.dim() == 2 else "conv")
    if "weight" in tensors and tensors["weight"].dim() == 1:
        layers += _norm_layers(tensors)
    return layers


def _weight_rule(kind: str) -> _Rule:
    return lambda module, tensors: _output_rows(tensors, "weight", kind)


def _conv_transpose(module: nn.Module, tensors: dict[str, Tensor]) -> list[_Layer]:
    return _output_rows(tensors, "weight", "conv_transpose", "conv_transpose", module.groups)


def _transposed_linear(module: nn.Module, tensors: dict[str, Tensor]) -> list[_Layer]:
    return _output_rows(tensors, "weight", "linear", "transpose")


def _normalization(module: nn.Module, tensors: dict[str, Tensor]) -> list[_Layer]:
    return _norm_layers(tensors)


def _multihead_attention(module: nn.Module, tensors: dict[str, Tensor]) -> list[_Layer]:
    """Packed ``in_proj_weight`` with ``in_proj_bias`` as one layer of 3*E rows. With separate
    q/k/v weights (kdim or vdim != embed_dim) the rows differ in length, so each projection is its
    own layer and ``in_proj_bias`` one more layer of 3*E one-value rows. ``out_proj`` is a Linear."""
    if "in_proj_weight" in tensors:
        return _output_rows(tensors, "in_proj_weight", "attention")
    layers = []
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        layers.append(_Layer(name, "attention", tensors[name].shape[0], [(name, "rows")]))
    if "in_proj_bias" in tensors:
        bias = tensors["in_proj_bias"]
        layers.append(_Layer("in_proj_bias", "bias", bias.numel(), [("in_proj_bias", "rows")]))
    return layers


_MODULE_RULES: dict[type[nn.Module], _Rule] = {
    nn.Linear: _weight_rule("linear"),
    nn.Bilinear: _weight_rule("linear"),
    nn.Conv1d: _weight_rule("conv"),
    nn.Conv2d: _weight_rule("conv"),
    nn.Conv3d: _weight_rule("conv"),
    nn.ConvTranspose1d: _conv_transpose,
    nn.ConvTranspose2d: _conv_transpose,
    nn.ConvTranspose3d: _conv_transpose,
    nn.Embedding: _weight_rule("embedding"),
    nn.EmbeddingBag: _weight_rule("embedding"),
    nn.modules.batchnorm._NormBase: _normalization,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm: _normalization,
    nn.GroupNorm: _normalization,
    nn.RMSNorm: _normalization,
    nn.MultiheadAttention: _multihead_attention,
}


def _rule_for(module: nn.Module | None) -> _Rule:
    """The rule of the module's class or its closest registered base class."""
    if module is None:
        return _rules_by_shape
    # GPT-2's Conv1D stores [in, out]. If transformers is not imported, no module can be one.
    transformers_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(transformers_utils, "Conv1D", None)
    for cls in type(module).__mro__:
        if cls is conv1d:
            return _transposed_linear
        if cls in _MODULE_RULES:
            return _MODULE_RULES[cls]
    return _rules_by_shape


# ----------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True, eq=False)
class _Plan:
    """What tokenizing one architecture needs besides the weights (see ``WeightTokenizer._plan``)."""

    layout: WeightLayout  # without kept values: those differ between checkpoints
    positions: Tensor
    mask: Tensor  # copying it is ~10x cheaper than comparing row counts with arange(T) again


@dataclass
class _Source:
    """The tensors of a network grouped into layers, before placement."""

    tensors: dict[str, Tensor]
    layers: list[_Layer] = field(default_factory=list)  # names and members are full keys here
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# Values per token of the CNN zoos (32 * 9 + 1: a 3x3 kernel row of 32 channels and a bias), the
# default of every tokenizer and zoo build. `SaneConfig` repeats it (its file is self-contained);
# tests/test_config.py checks that the two agree.
DEFAULT_TOKENSIZE = 289


class WeightTokenizer:
    """Turns a network (``nn.Module`` or state_dict) into ``TokenizedWeights`` and back.

    Args:
        tokensize: values per token ``T``; ``None`` picks the longest row of each network.
        include_norm: tokenize normalization layers; when False their tensors are listed in the
            layout's ``skipped`` and ``decode`` only returns them from ``fill_from``.
        dtype: dtype of the tokens; float64 keeps every float32/float16 value exactly, float16 and
            bfloat16 round float32 weights.
    """

    def __init__(
        self,
        tokensize: int | None = DEFAULT_TOKENSIZE,
        include_norm: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        if tokensize is not None and (not isinstance(tokensize, int) or tokensize < 1):
            raise ValueError(f"tokensize must be a positive int or None, got {tokensize!r}")
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {TOKEN_DTYPES}, got {dtype}")
        self.tokensize = tokensize
        self.include_norm = include_norm
        self.dtype = dtype
        self._plans: dict[tuple, _Plan] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokensize={self.tokensize}, "
            f"include_norm={self.include_norm}, dtype={self.dtype})"
        )

    def layout(self, weights: nn.Module | Mapping[str, Tensor]) -> WeightLayout:
        """The layout of ``weights`` without tokenizing them (e.g. to sample a new architecture)."""
        source = self._collect(weights)
        return _with_kept_values(self._plan(source).layout, source)

    @torch.no_grad()
    def __call__(self, weights: nn.Module | Mapping[str, Tensor]) -> TokenizedWeights:
        source = self._collect(weights)
        plan = self._plan(source)
        tokens = self._fill(source.tensors, plan.layout)
        mask = _allocate(plan.mask.shape, torch.bool, tokens.device).copy_(plan.mask)
        positions = plan.positions.to(tokens.device, copy=True)
        return TokenizedWeights(tokens, mask, positions, _with_kept_values(plan.layout, source))

    tokenize = __call__

    def decode(
        self,
        tokens: Tensor,
        layout: WeightLayout,
        fill_from: nn.Module | Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Exact inverse of tokenizing: a state_dict in the source's key order and dtypes.

        Padding values are ignored. Tensors the layout skipped (``include_norm=False``) are taken
        from ``fill_from`` (a module or state_dict, e.g. a freshly initialized model); without it
        they are left out of the result with a warning, so load it with ``strict=False``.
        """
        expected = (layout.num_tokens, layout.tokensize)
        if tokens.dim() != 2 or tuple(tokens.shape) != expected:
            raise ValueError(
                f"tokens have shape {list(tokens.shape)} but the layout expects {list(expected)} "
                "(num_tokens, tokensize): are they from another architecture or token size?"
            )
        if not tokens.is_floating_point():
            raise ValueError(f"tokens must be floating point, got {tokens.dtype}")
        tokens = tokens.detach().contiguous()
        state = {}
        for layer in layout.layers:
            region = _layer_region(tokens, layer, layout.tokensize)
            for spec in layer.parameters:
                view = _parameter_view(region, spec)
                value = _allocate(spec.shape, dtype_from_name(spec.dtype), tokens.device)
                value.view(view.shape).copy_(view)
                state[spec.key] = value
        for kept in layout.kept:
            values = torch.tensor(
                kept.values, dtype=dtype_from_name(kept.dtype), device=tokens.device
            )
            state[kept.key] = values.view(kept.shape)
        if layout.skipped:
            state.update(_skipped_tensors(layout, fill_from, tokens.device))
        return {key: state[key] for key in layout.keys if key in state}

    # -- building the layout ---------------------------------------------------------------

    def _collect(self, weights: nn.Module | Mapping[str, Tensor]) -> _Source:
        """Group the tensors of ``weights`` into layers by module type (or by shape)."""
        if isinstance(weights, nn.Module):
            state = weights.state_dict()
            modules = dict(weights.named_modules(remove_duplicate=False))
        elif isinstance(weights, Mapping):
            state, modules = dict(weights), {}
        else:
            raise TypeError(f"expected an nn.Module or a state_dict, got {type(weights).__name__}")
        source = _Source(state)
        for prefix, names in _group_by_prefix(state).items():
            module = modules.get(prefix)
            tensors = {}
            for name in names:
                key = f"{prefix}.{name}" if prefix else name
                value = state[key]
                if _is_kept(key, name, value, module):
                    source.kept.append(key)
                else:
                    tensors[name] = value
            if tensors:
                self._add_layers(source, prefix, tensors, _rule_for(module)(module, tensors))
        if not source.layers:
            raise ValueError(
                "nothing to tokenize: no floating-point parameters"
                + ("" if self.include_norm else " outside normalization layers")
            )
        return source

    def _add_layers(
        self, source: _Source, prefix: str, tensors: dict[str, Tensor], layers: list[_Layer]
    ) -> None:
        claimed = {name for layer in layers for name, _ in layer.members}
        layers += _generic_layers({n: t for n, t in tensors.items() if n not in claimed})
        for layer in layers:
            keys = [f"{prefix}.{name}" if prefix else name for name, _ in layer.members]
            if layer.kind in NORM_KINDS and not self.include_norm:
                source.skipped += keys
                continue
            name = ".".join(part for part in (prefix, layer.name) if part) or keys[0]
            members = [(key, transform) for key, (_, transform) in zip(keys, layer.members)]
            source.layers.append(_Layer(name, layer.kind, layer.rows, members, layer.groups))

    def _plan(self, source: _Source) -> _Plan:
        """The layout of this architecture with its positions and row counts, computed once."""
        signature = (
            tuple(
                (layer.name, layer.kind, layer.rows, layer.groups, tuple(layer.members))
                for layer in source.layers
            ),
            tuple((key, tuple(value.shape), value.dtype) for key, value in source.tensors.items()),
            tuple(source.skipped),
        )
        plan = self._plans.get(signature)
        if plan is None:
            if len(self._plans) >= MAX_CACHED_PLANS:
                self._plans.pop(next(iter(self._plans)))  # forget the oldest architecture
            layout = self._place(source)
            plan = self._plans[signature] = _Plan(layout, layout.positions(), layout.mask())
        return plan

    def _place(self, source: _Source) -> WeightLayout:
        """Lay the layers out one after the other; each tensor fills a run of columns of its rows."""
        tensors = source.tensors
        columns = {
            key: tensors[key].numel() // layer.rows
            for layer in source.layers
            for key, _ in layer.members
        }
        row_lengths = [sum(columns[key] for key, _ in layer.members) for layer in source.layers]
        tokensize = self.tokensize or max(row_lengths)
        layers, token_offset = [], 0
        for layer, row_length in zip(source.layers, row_lengths):
            parameters, column_offset = [], 0
            for key, transform in layer.members:
                parameters.append(
                    ParameterSpec(
                        key=key,
                        shape=tuple(tensors[key].shape),
                        dtype=dtype_name(tensors[key].dtype),
                        transform=transform,
                        groups=layer.groups,
                        column_offset=column_offset,
                        columns=columns[key],
                    )
                )
                column_offset += columns[key]
            spec = LayerSpec(
                name=layer.name,
                kind=layer.kind,
                parameters=tuple(parameters),
                rows=layer.rows,
                row_length=row_length,
                tokens_per_row=math.ceil(row_length / tokensize),
                token_offset=token_offset,
            )
            layers.append(spec)
            token_offset += spec.num_tokens
        skipped = tuple(
            TensorSpec(key, tuple(tensors[key].shape), dtype_name(tensors[key].dtype))
            for key in source.skipped
        )
        return WeightLayout(tokensize, tuple(layers), keys=tuple(tensors), skipped=skipped)

    # -- copying -----------------------------------------------------------------------------

    def _fill(self, tensors: dict[str, Tensor], layout: WeightLayout) -> Tensor:
        """Copy every tensor into its slice of one zeroed ``[N, T]`` buffer (zeros = padding)."""
        device = tensors[layout.layers[0].parameters[0].key].device
        tokens = _allocate((layout.num_tokens, layout.tokensize), self.dtype, device, zeros=True)
        for layer in layout.layers:
            region = _layer_region(tokens, layer, layout.tokensize)
            for spec in layer.parameters:
                view = _parameter_view(region, spec)
                view.copy_(tensors[spec.key].reshape(view.shape))
        _check_finite(tokens, tensors, layout)
        return tokens


def _skipped_tensors(
    layout: WeightLayout, fill_from: nn.Module | Mapping[str, Tensor] | None, device: torch.device
) -> dict[str, Tensor]:
    """Copies of the skipped normalization tensors from ``fill_from``; warn if there is none."""
    if fill_from is None:
        warnings.warn(
            f"the layout skipped {len(layout.skipped)} normalization tensors "
            f"({layout.skipped_keys[:3]}...); they are not in the decoded state_dict. Pass "
            "fill_from=<module or state_dict> to take them from there.",
            stacklevel=3,
        )
        return {}
    source = fill_from.state_dict() if isinstance(fill_from, nn.Module) else fill_from
    if missing := [key for key in layout.skipped_keys if key not in source]:
        raise KeyError(f"fill_from lacks the skipped tensors {missing}")
    return {key: source[key].to(device, copy=True) for key in layout.skipped_keys}


def _with_kept_values(layout: WeightLayout, source: _Source) -> WeightLayout:
    """The layout with this checkpoint's non-float tensors (e.g. ``num_batches_tracked``)."""
    if not source.kept:
        return layout
    kept = []
    for key in source.kept:
        value = source.tensors[key]
        if value.is_meta:
            raise ValueError(f"{key!r} is on the meta device: the layout must store its value")
        values = tuple(value.flatten().tolist())
        kept.append(KeptTensor(key, tuple(value.shape), dtype_name(value.dtype), values))
    return dataclasses.replace(layout, kept=tuple(kept))


def _group_by_prefix(state: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{"layer1.0.bn1": ["weight", "bias", ...]}`` in state_dict order (module pre-order)."""
    groups: dict[str, list[str]] = {}
    for key in state:
        prefix, _, name = key.rpartition(".")
        groups.setdefault(prefix, []).append(name)
    return groups


def _is_kept(key: str, name: str, value: Any, module: nn.Module | None) -> bool:
    """True for tensors stored by value instead of tokenized: non-float buffers and empty tensors.

    Raise for anything that cannot be a weight.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    if value.is_floating_point():
        return value.numel() == 0
    is_parameter = (
        name in module._parameters if module is not None else name.endswith(("weight", "bias"))
    )
    if is_parameter or value.is_complex():
        raise ValueError(f"float weights expected: {key!r} has dtype {value.dtype}")
    return True


def _layer_region(tokens: Tensor, layer: LayerSpec, tokensize: int) -> Tensor:
    """The layer's tokens viewed as its rows: ``[rows, tokens_per_row * T]``."""
    region = tokens[layer.token_offset : layer.token_offset + layer.num_tokens]
    return region.view(layer.rows, layer.tokens_per_row * tokensize)


def _parameter_view(region: Tensor, spec: ParameterSpec) -> Tensor:
    """A view of the parameter's columns, shaped so that it lines up with the parameter.

    The result has the parameter's shape, except for ``conv_transpose`` where both are seen as
    ``[groups, in/groups, out/groups, k...]``.
    """
    block = region[:, spec.column_offset : spec.column_offset + spec.columns]
    if spec.transform == "rows":
        return block.view(spec.shape)
    if spec.transform == "transpose":
        return block.t()
    in_channels, out_per_group, *kernel = spec.shape
    groups = spec.groups
    block = block.view(groups, out_per_group, in_channels // groups, *kernel)
    return block.transpose(1, 2)


def _check_finite(tokens: Tensor, tensors: dict[str, Tensor], layout: WeightLayout) -> None:
    """One reduction over all tokens; only if it is not finite, find and name the culprit."""
    if torch.isfinite(tokens.sum(dtype=torch.float32)):
        return
    for layer in layout.layers:
        region = _layer_region(tokens, layer, layout.tokensize)
        for spec in layer.parameters:
            if torch.isfinite(_parameter_view(region, spec)).all():
                continue
            if not torch.isfinite(tensors[spec.key]).all():
                raise ValueError(f"parameter {spec.key!r} contains NaN or Inf values")
            raise ValueError(
                f"parameter {spec.key!r} overflows the token dtype {tokens.dtype} "
                f"(largest magnitude {tensors[spec.key].abs().max().item():.3g})"
            )
    # The sum overflowed although every value is finite: nothing to report.


def _allocate(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, zeros: bool = False
) -> Tensor:
    """``torch.empty`` / ``torch.zeros``, but CPU memory comes from NumPy.

    Writing fresh memory the first time faults in every 4 KiB page: for ResNet-18's 62 MB of
    tokens that cost more than all the copying. NumPy asks the kernel for huge pages on large
    allocations (``madvise``), which makes the first touch 2-3x cheaper, and its ``zeros`` gets
    pages the kernel already zeroed (``calloc``), so padding costs nothing.
    """
    if device.type != "cpu":
        return (torch.zeros if zeros else torch.empty)(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    array = (numpy.zeros if zeros else numpy.empty)(nbytes, dtype=numpy.uint8)
    return torch.from_numpy(array).view(dtype).view(shape)
