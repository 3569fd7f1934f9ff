"""Weight matching (Git Re-Basin): permute a network's hidden units onto a reference network."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from sane_hf.weights.alignment.spec import (
    PermutationSpec,
    StateDict,
    apply_permutation,
    axis_permutation_index,
)


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
