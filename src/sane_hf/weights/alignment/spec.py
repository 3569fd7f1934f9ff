"""The permutation spec (which axis of which tensor moves with which channel group) and how to
draw, invert and apply permutations. Deriving a spec from a module lives in ``tracing``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch import nn

from sane_hf.weights.alignment.tracing import derive_permutation_groups

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
        """Derive the permutation groups of ``module`` by tracing it (see ``sane_hf.weights.alignment``)."""
        spec = cls(**derive_permutation_groups(module))
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
