"""Permutation symmetries of networks: derive them, sample them, apply them, align networks.

Hidden units of a network can be reordered without changing the function it computes: permute
the output channels of a layer and the input channels of every layer reading them, and the
network is the same function. SANE uses this twice: every model of a zoo is mapped to a
canonical ordering by *weight matching* against a reference model (Git Re-Basin, Ainsworth et
al. 2023), which halves the reconstruction loss, and random function-preserving permutations
are a training augmentation.

Everything here rests on a :class:`PermutationSpec`, which says which axis of which
``state_dict`` tensor moves with which *permutation group* (a set of channels that must be
reordered together). :meth:`PermutationSpec.from_model` derives it from the network itself by
tracing it with ``torch.fx`` and propagating channel groups through the graph; residual
additions join groups (union-find), BatchNorm parameters and buffers follow their convolution,
a ``Flatten`` between a convolution and a linear layer makes each channel a block of ``H*W``
input features, and the network's own inputs and outputs are never permuted. Anything the
propagation does not understand (a ``view``, indexing, concatenation, an unknown layer, a
parameter used outside its layer) makes the channel groups it touches *fixed*: a spec may miss
a symmetry, it must never claim a wrong one. Modules that cannot be traced as a whole (most
Hugging Face models) are split into their largest traceable submodules, whose inputs and
outputs are then fixed; this still finds the hidden dimension of transformer MLP blocks
(GPT-2's ``c_fc``/``c_proj``, ViT's ``fc1``/``fc2``).

Assumptions of the derivation: convolution and BatchNorm inputs carry a batch dimension (how
``nn.Module`` layers are called in a zoo); a parameter of a traced module is not used by code
outside it (shared parameters are detected and joined); and a submodule traced on its own
because its parent could not be traced is used through its ``forward``.
"""

from __future__ import annotations

import operator
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

StateDict = Mapping[str, torch.Tensor]


class PermutedAxis(NamedTuple):
    """One tensor axis that moves with permutation group ``group``.

    The axis has ``groups[group] * block`` elements: element ``c * block + j`` belongs to channel
    ``c`` (``0 <= j < block``). ``block`` is 1 for ordinary channels and ``H * W`` for the input
    axis of a linear layer that reads a flattened ``[C, H, W]`` feature map.
    """

    group: str
    block: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """Which axis of which ``state_dict`` tensor is permuted by which permutation group.

    Attributes:
        groups: group name -> number of channels it permutes. Only groups that really may be
            permuted are listed; fixed channels (network inputs/outputs, anything the tracer
            could not prove safe) simply have no group.
        axes: for *every* ``state_dict`` key (parameters and buffers), one entry per tensor
            axis: ``None`` (the axis is never permuted) or a :class:`PermutedAxis`
            ``(group, block)``.
        buffers: keys that are buffers (BatchNorm running statistics). They are permuted like
            everything else but do not enter the similarity of :func:`align`, following weight
            matching, which compares learned weights and biases only.

    Convention for a permutation ``perm`` of a group (a ``LongTensor`` of length
    ``groups[group]``): the permuted network's channel ``i`` is the original network's channel
    ``perm[i]``, so a tensor is permuted by gathering along each of its axes with
    ``axis_permutation_index(perm, block)``:
    ``permuted = tensor.index_select(axis, axis_permutation_index(perm, block))``.

    Example (CNN-s, ``PermutationSpec.from_model(build_model("cnn_s")).to_dict()``, abridged)::

        {"groups": {"0": 8, "4": 6, "8": 4, "12": 20},
         "axes": {"0.weight": [["0", 1], null, null, null],    # [8, 1, 5, 5]: input fixed
                  "4.weight": [["4", 1], ["0", 1], null, null],
                  "12.weight": [["12", 1], ["8", 9]],           # [20, 36]: 4 channels x 3*3
                  "15.weight": [null, ["12", 1]], "15.bias": [null], ...},
         "buffers": []}

    Other layouts of the same weights (a flat parameter vector, weight tokens) are permuted
    with a flat gather index per tensor: ``apply_permutation`` applied to
    ``{key: torch.arange(t.numel()).view(t.shape)}`` yields it, for a batch of permutations
    at once if they are batched.
    """

    groups: dict[str, int]
    axes: dict[str, tuple[PermutedAxis | None, ...]]
    buffers: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self):
        axes = {
            key: tuple(_parse_axis(key, entry) for entry in entries)
            for key, entries in self.axes.items()
        }
        for key, entries in axes.items():
            for axis, entry in enumerate(entries):
                if entry is not None and entry.group not in self.groups:
                    raise ValueError(
                        f"axis {axis} of {key!r} refers to group {entry.group!r}, which is not "
                        f"in groups {sorted(self.groups)}"
                    )
        unknown_buffers = set(self.buffers) - set(axes)
        if unknown_buffers:
            raise ValueError(f"buffers {sorted(unknown_buffers)} are not keys of axes")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "buffers", frozenset(self.buffers))

    @classmethod
    def from_model(cls, module: nn.Module) -> PermutationSpec:
        """Derive the permutation groups of ``module`` by tracing it (see the module docstring)."""
        spec = _SpecBuilder(module).build()
        spec.check_state_dict(module.state_dict())
        return spec

    @cached_property
    def group_axes(self) -> dict[str, list[tuple[str, int, int]]]:
        """group -> every ``(key, axis, block)`` it permutes, for weight matching and index maps."""
        members: dict[str, list[tuple[str, int, int]]] = {group: [] for group in self.groups}
        for key, entries in self.axes.items():
            for axis, entry in enumerate(entries):
                if entry is not None:
                    members[entry.group].append((key, axis, entry.block))
        return members

    def check_state_dict(self, state_dict: StateDict, name: str = "state_dict") -> None:
        """Raise a ``ValueError`` naming the key if ``state_dict`` does not fit this spec."""
        missing = [key for key in self.axes if key not in state_dict]
        unexpected = [key for key in state_dict if key not in self.axes]
        if missing or unexpected:
            raise ValueError(
                f"{name} does not match the permutation spec: missing keys {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                f"{'...' if len(unexpected) > 5 else ''}"
            )
        for key, entries in self.axes.items():
            shape = tuple(state_dict[key].shape)
            if len(entries) != len(shape):
                raise ValueError(
                    f"{name}[{key!r}] has shape {shape}, but the spec describes {len(entries)} axes"
                )
            for axis, entry in enumerate(entries):
                if entry is not None and shape[axis] != self.groups[entry.group] * entry.block:
                    raise ValueError(
                        f"{name}[{key!r}] axis {axis} has {shape[axis]} elements, but group "
                        f"{entry.group!r} ({self.groups[entry.group]} channels) with block "
                        f"{entry.block} needs {self.groups[entry.group] * entry.block}"
                    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form; :meth:`from_dict` inverts it."""
        return {
            "groups": dict(self.groups),
            "axes": {
                key: [None if entry is None else [entry.group, entry.block] for entry in entries]
                for key, entries in self.axes.items()
            },
            "buffers": sorted(self.buffers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermutationSpec:
        """Rebuild a spec from :meth:`to_dict` output (e.g. loaded from JSON or written by hand)."""
        missing = {"groups", "axes"} - set(data)
        if missing:
            raise ValueError(
                f"permutation spec dict lacks {sorted(missing)}; got keys {sorted(data)}"
            )
        return cls(
            groups={str(name): int(size) for name, size in data["groups"].items()},
            axes={key: tuple(entries) for key, entries in data["axes"].items()},
            buffers=frozenset(data.get("buffers", ())),
        )


def _parse_axis(key: str, entry: Any) -> PermutedAxis | None:
    """Accept ``None``, ``PermutedAxis`` or a ``[group, block]`` pair (JSON) for one axis."""
    if entry is None:
        return None
    if isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
        group, block = entry
        if isinstance(group, str) and isinstance(block, int) and block >= 1:
            return PermutedAxis(group, block)
    raise ValueError(
        f"axis entry of {key!r} must be None or (group name, block >= 1), got {entry!r}"
    )


def axis_permutation_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Expand a group permutation ``[..., size]`` to a gather index ``[..., size * block]``.

    Blocks of ``block`` contiguous elements move together, so channel ``c`` becomes the
    elements ``perm[c] * block + arange(block)``.
    """
    if block == 1:
        return perm
    offsets = torch.arange(block, device=perm.device)
    return (perm.unsqueeze(-1) * block + offsets).flatten(-2)


def random_permutation(
    spec: PermutationSpec, generator: torch.Generator | None = None, num: int | None = None
) -> dict[str, torch.Tensor]:
    """Draw a uniformly random permutation per group: ``LongTensor [size]`` (or ``[num, size]``).

    Applied with :func:`apply_permutation`, it gives a different network computing the same
    function (SANE's permutation augmentation).
    """
    if num is None:
        return {
            group: torch.randperm(size, generator=generator) for group, size in spec.groups.items()
        }
    return {
        group: torch.rand(num, size, generator=generator).argsort(dim=-1)
        for group, size in spec.groups.items()
    }


def invert_permutation(perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse permutations: applying ``perms`` and then the result gives back the original."""
    return {group: perm.argsort(dim=-1) for group, perm in perms.items()}


def apply_permutation(
    state_dict: StateDict, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Permute every tensor of ``state_dict`` along its spec'd axes (see :class:`PermutationSpec`).

    With batched permutations (``[num, size]`` per group, e.g. from
    ``random_permutation(spec, num=num)``) every returned tensor gains a leading ``num`` axis.
    """
    spec.check_state_dict(state_dict)
    batch_shape = _check_permutations(spec, perms)
    device = next(iter(state_dict.values())).device if state_dict else torch.device("cpu")
    perms = {group: perm.to(device) for group, perm in perms.items()}
    return {
        key: _permute_tensor(tensor, spec.axes[key], perms, batch_shape)
        for key, tensor in state_dict.items()
    }


def _check_permutations(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> torch.Size:
    """Check that ``perms`` has one integer permutation per group; return their batch shape."""
    if set(perms) != set(spec.groups):
        raise ValueError(
            f"permutations must cover exactly the spec's groups: missing "
            f"{sorted(set(spec.groups) - set(perms))}, unexpected {sorted(set(perms) - set(spec.groups))}"
        )
    batch_shapes = set()
    for group, perm in perms.items():
        if (
            perm.dtype != torch.long
            or perm.dim() not in (1, 2)
            or perm.shape[-1] != spec.groups[group]
        ):
            raise ValueError(
                f"permutation of group {group!r} must be a LongTensor [{spec.groups[group]}] or "
                f"[num, {spec.groups[group]}], got {perm.dtype} {tuple(perm.shape)}"
            )
        batch_shapes.add(perm.shape[:-1])
    if len(batch_shapes) > 1:
        raise ValueError(f"permutations mix batch shapes {sorted(map(tuple, batch_shapes))}")
    return batch_shapes.pop() if batch_shapes else torch.Size()


def _permute_tensor(
    tensor: torch.Tensor,
    entries: tuple[PermutedAxis | None, ...],
    perms: Mapping[str, torch.Tensor],
    batch_shape: torch.Size,
) -> torch.Tensor:
    """Gather ``tensor`` along each permuted axis; batched permutations add a leading axis."""
    if not batch_shape:
        for axis, entry in enumerate(entries):
            if entry is not None:
                tensor = tensor.index_select(
                    axis, axis_permutation_index(perms[entry.group], entry.block)
                )
        return tensor
    tensor = tensor.expand(*batch_shape, *tensor.shape)
    for axis, entry in enumerate(entries):
        if entry is not None:
            index = axis_permutation_index(perms[entry.group], entry.block)
            view = [batch_shape[0]] + [1] * len(entries)
            view[axis + 1] = index.shape[-1]
            tensor = torch.gather(tensor, axis + 1, index.view(view).expand_as(tensor))
    return tensor


@dataclass
class AlignmentResult:
    """Outcome of :func:`align`.

    Attributes:
        state_dict: the aligned model, ``apply_permutation(model_state_dict, spec, permutations)``.
        permutations: group -> permutation that maps the model onto the reference ordering.
        spec: the permutation spec used.
        distance_before / distance_after: L2 distance to the reference over the tensors that
            enter the similarity (all non-buffer floating tensors with a permuted axis).
        num_sweeps: coordinate-descent sweeps over all groups that were run.
        converged: whether the last sweep improved no group (a local optimum was reached).
    """

    state_dict: dict[str, torch.Tensor]
    permutations: dict[str, torch.Tensor]
    spec: PermutationSpec
    distance_before: float
    distance_after: float
    num_sweeps: int
    converged: bool


def align(
    model_or_state_dict: nn.Module | StateDict,
    reference: nn.Module | StateDict,
    spec: PermutationSpec | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> AlignmentResult:
    """Permute a model's hidden units to match ``reference`` by weight matching (Git Re-Basin).

    Per group, the permutation that maximizes the summed inner product of the group's incoming
    and outgoing weights with the reference (given the other groups' current permutations) is a
    linear assignment problem. Groups are solved one at a time in random order, sweep after
    sweep, until no group improves or ``max_iter`` sweeps ran. Similarities use weights and
    biases (BatchNorm affine parameters included); BatchNorm running statistics are permuted
    along but do not vote (they are data statistics, not learned weights).

    Args:
        model_or_state_dict: the model to permute (a module or its ``state_dict``).
        reference: the model whose ordering is the target (a module or its ``state_dict``).
        spec: the permutation spec; derived from whichever argument is a module when omitted.
        max_iter: maximum number of sweeps over all groups.
        seed: seeds the order in which groups are visited.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if spec is None:
        module = next(
            (m for m in (model_or_state_dict, reference) if isinstance(m, nn.Module)), None
        )
        if module is None:
            raise ValueError(
                "align() got two state_dicts and no spec: a PermutationSpec can only be derived "
                "from a module. Pass spec=PermutationSpec.from_model(model) or pass a module."
            )
        spec = PermutationSpec.from_model(module)
    model_state = _as_state_dict(model_or_state_dict)
    reference_state = _as_state_dict(reference)
    spec.check_state_dict(model_state, "model state_dict")
    spec.check_state_dict(reference_state, "reference state_dict")

    keys = [
        key
        for key, entries in spec.axes.items()
        if key not in spec.buffers and model_state[key].is_floating_point() and any(entries)
    ]
    matcher = _WeightMatcher(
        spec, {k: model_state[k] for k in keys}, {k: reference_state[k] for k in keys}
    )
    distance_before = matcher.distance()
    num_sweeps, converged = matcher.run(max_iter, random.Random(seed))
    return AlignmentResult(
        state_dict=apply_permutation(model_state, spec, matcher.perms),
        permutations=matcher.perms,
        spec=spec,
        distance_before=distance_before,
        distance_after=matcher.distance(),
        num_sweeps=num_sweeps,
        converged=converged,
    )


def _as_state_dict(model: nn.Module | StateDict) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {key: tensor.detach() for key, tensor in model.state_dict().items()}
    return dict(model)


class _WeightMatcher:
    """Coordinate descent over groups; keeps the model's tensors permuted by the current solution.

    The similarity of group ``g`` is ``sum over its (key, axis) of R @ M.T`` with ``R`` and ``M``
    the reference and current model tensors flattened to ``[channels, -1]`` along that axis
    (one matmul per (key, axis); the reference views are computed once). Because ``M`` is
    already permuted by ``perms[g]``, the assignment found is relative to it and is composed in.
    Each (key, axis) term is cached: permuting its own axis only reorders its columns, so it is
    recomputed only after another axis of the same tensor moved. This makes the last sweep,
    which merely confirms convergence, nearly free.
    """

    def __init__(self, spec: PermutationSpec, model: StateDict, reference: StateDict):
        self.spec = spec
        dtype = (
            torch.float64
            if any(t.dtype == torch.float64 for t in model.values())
            else torch.float32
        )
        self.current = {key: tensor.to(dtype) for key, tensor in model.items()}
        device = next(iter(model.values())).device if model else torch.device("cpu")
        self.reference = {key: tensor.to(device, dtype) for key, tensor in reference.items()}
        self.members = {
            group: [(key, axis, block) for key, axis, block in members if key in model]
            for group, members in spec.group_axes.items()
        }
        self.reference_rows = {
            (key, axis): _channel_rows(self.reference[key], axis, spec.groups[group])
            for group, members in self.members.items()
            for key, axis, _ in members
        }
        self.perms = {
            group: torch.arange(size, device=device) for group, size in spec.groups.items()
        }
        self.similarities: dict[tuple[str, int], torch.Tensor] = {}

    def run(self, max_iter: int, rng: random.Random) -> tuple[int, bool]:
        groups = [group for group, members in self.members.items() if members]
        for sweep in range(1, max_iter + 1):
            rng.shuffle(groups)
            improved = [self._solve(group) for group in groups]
            if not any(improved):
                return sweep, True
        return max_iter, False

    def _solve(self, group: str) -> bool:
        """Re-solve one group's assignment; apply it and return True if it strictly improves."""
        size = self.spec.groups[group]
        similarity = sum(self._similarity(key, axis, size) for key, axis, _ in self.members[group])
        similarity = similarity.double().cpu().numpy()
        _, assignment = linear_sum_assignment(similarity, maximize=True)
        gain = similarity[np.arange(size), assignment].sum() - np.trace(similarity)
        if gain <= 1e-9 * np.abs(similarity).max(initial=0.0) * size:
            return False
        assignment = torch.from_numpy(assignment).to(self.perms[group].device)
        self.perms[group] = self.perms[group][assignment]
        for key, axis, block in self.members[group]:
            self.current[key] = self.current[key].index_select(
                axis, axis_permutation_index(assignment, block)
            )
            for other_axis in range(self.current[key].dim()):
                if other_axis != axis:
                    self.similarities.pop((key, other_axis), None)
            if (key, axis) in self.similarities:
                self.similarities[key, axis] = self.similarities[key, axis][:, assignment]
        return True

    def _similarity(self, key: str, axis: int, size: int) -> torch.Tensor:
        """``[size, size]`` inner products of reference channels (rows) with model channels."""
        if (key, axis) not in self.similarities:
            model_rows = _channel_rows(self.current[key], axis, size)
            self.similarities[key, axis] = self.reference_rows[key, axis] @ model_rows.T
        return self.similarities[key, axis]

    def distance(self) -> float:
        squared = sum(
            ((self.current[k] - self.reference[k]) ** 2).sum().item() for k in self.current
        )
        return float(squared) ** 0.5


def _channel_rows(tensor: torch.Tensor, axis: int, channels: int) -> torch.Tensor:
    """View ``tensor`` as ``[channels, -1]`` along ``axis``: one row per channel (with its block)."""
    return tensor.movedim(axis, 0).reshape(channels, -1)


# ---------------------------------------------------------------------------------------------
# Deriving a spec: channel-group propagation over a torch.fx graph.
# ---------------------------------------------------------------------------------------------

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

    def build(self) -> PermutationSpec:
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

    def _spec(self) -> PermutationSpec:
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
                else PermutedAxis(names[self.groups.find(entry[0])], entry[1])
                for entry in entries
            )
            for key, entries in self.key_axes.items()
        }
        groups = {names[root]: self.groups.sizes[root] for root in sorted(names)}
        return PermutationSpec(groups=groups, axes=axes, buffers=self.buffers)

    @staticmethod
    def _unique_name(name: str, taken: Any) -> str:
        taken = set(taken)
        candidate, index = name, 1
        while candidate in taken:
            candidate, index = f"{name}#{index}", index + 1
        return candidate
