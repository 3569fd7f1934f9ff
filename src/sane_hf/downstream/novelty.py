"""Are sampled networks new? Distances in weight space and overlap of mistakes.

Zeng et al. ("Generative Modeling of Weights: Generalization or Memorization?", CVPR 2026) show
that weight generators often reproduce or interpolate their training checkpoints. Two figures
per network tell a copy from a new network:

- the L2 distance to the nearest training checkpoint, in the zoo's normalized (and aligned)
  token space, next to the distance between distinct trained networks for scale;
- the largest IoU of its set of misclassified test examples with that of any prompt or training
  network: a copy makes the same mistakes (IoU near 1), a new network its own.

Both run as tensor operations over all networks at once (``cdist``, one matmul of mistake
masks, a vmapped forward pass), never as a Python loop per network.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.func import functional_call, stack_module_state

from sane_hf.zoo.training import network_structure


def _real_values(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[M, N, T]`` tokens -> ``[M, V]`` real values (padding excluded when a mask is given)."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [M, N, T], got {tuple(tokens.shape)}")
    if mask is None:
        return tokens.flatten(1)
    return tokens[:, mask.to(tokens.device)]


def nearest_neighbor_distances(
    queries: torch.Tensor,
    reference: torch.Tensor | Iterable[torch.Tensor],
    mask: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    reference_groups: torch.Tensor | None = None,
    exclude_identical: bool | torch.Tensor = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distance of every query model to its nearest reference model, over real token values.

    Args:
        queries: ``[k, N, T]`` tokens (normalized space).
        reference: ``[R, N, T]`` tokens, or an iterable of such chunks (to stream a large zoo;
            it is consumed once).
        mask: ``[N, T]`` bool, True on real values; padding entries are ignored.
        query_groups, reference_groups: ``[k]`` and ``[R]`` integer ids (e.g. of the model a
            checkpoint belongs to); a query never matches a reference of its own group. Use
            ``-1`` for queries without a group.
        exclude_identical: for all queries (bool) or per query (``[k]`` bool): skip reference
            models identical to the query (distance exactly 0), i.e. the query itself.
        chunk_size: reference models compared at once when ``reference`` is one tensor.

    Returns:
        ``(distances [k], indices [k])``; indices count over the concatenated reference.
    """
    if (query_groups is None) != (reference_groups is None):
        raise ValueError("pass both query_groups and reference_groups, or neither")
    query_values = _real_values(queries, mask).double()
    exclude = torch.as_tensor(exclude_identical, device=queries.device).expand(len(queries))
    if isinstance(reference, torch.Tensor):
        reference = reference.split(chunk_size)
    best = torch.full((len(query_values),), float("inf"), dtype=torch.float64)
    best_index = torch.full((len(query_values),), -1, dtype=torch.long)
    offset = 0
    for chunk in reference:
        values = _real_values(chunk.to(queries.device), mask).double()
        if values.shape[1] != query_values.shape[1]:
            raise ValueError(
                f"reference models have {values.shape[1]} real values, queries "
                f"{query_values.shape[1]}: they must share one layout"
            )
        # the direct (non-matmul) kernel returns exactly 0 for identical models
        distances = torch.cdist(query_values, values, compute_mode="donot_use_mm_for_euclid_dist")
        distances = distances.masked_fill(exclude[:, None] & (distances == 0), float("inf"))
        if query_groups is not None:
            groups = reference_groups[offset : offset + len(values)].to(distances.device)
            own_group = query_groups.to(distances.device)[:, None] == groups[None, :]
            distances = distances.masked_fill(own_group, float("inf"))
        chunk_best, chunk_index = distances.min(dim=1)
        chunk_best, chunk_index = chunk_best.cpu(), chunk_index.cpu()
        improved = chunk_best < best
        best = torch.where(improved, chunk_best, best)
        best_index = torch.where(improved, chunk_index + offset, best_index)
        offset += len(values)
    if offset == 0:
        raise ValueError("the reference set is empty")
    if reference_groups is not None and offset != len(reference_groups):
        raise ValueError(
            f"reference_groups has {len(reference_groups)} entries for {offset} reference models"
        )
    return best, best_index


@dataclass
class NoveltyReport:
    """Are samples new networks or copies of training models?

    ``sample_distances[i]`` is the distance of sample ``i`` to its nearest reference (training)
    model. ``prompt_distances`` gives the scale: how far the prompts - real, distinct networks -
    are from the nearest reference checkpoint of *another* model. Samples much closer to a
    training model than that are copies of it.
    """

    sample_distances: torch.Tensor
    sample_nearest: torch.Tensor
    prompt_distances: torch.Tensor | None = None

    def to_dict(self) -> dict:
        result = {
            "sample_distances": self.sample_distances.tolist(),
            "sample_nearest": self.sample_nearest.tolist(),
        }
        if self.prompt_distances is not None:
            result["prompt_distances"] = self.prompt_distances.tolist()
        return result

    def summary(self) -> str:
        rows = [("samples", self.sample_distances)]
        if self.prompt_distances is not None:
            rows.append(("prompts", self.prompt_distances))
        lines = ["nearest-neighbour L2 distance to the reference set (normalized token space)"]
        for name, distances in rows:
            lines.append(
                f"  {name:<8} min {distances.min():.4f}  median {distances.median():.4f}  "
                f"mean {distances.mean():.4f}  max {distances.max():.4f}"
            )
        return "\n".join(lines)


def novelty_report(
    sample_tokens: torch.Tensor,
    reference_tokens: torch.Tensor | Iterable[torch.Tensor],
    mask: torch.Tensor | None = None,
    prompt_tokens: torch.Tensor | None = None,
    prompt_groups: torch.Tensor | None = None,
    reference_groups: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> NoveltyReport:
    """Distances of samples, and of prompts to models other than themselves, to the nearest
    reference model (e.g. every checkpoint of the training split).

    All tokens must be in the normalized space of the zoo and share one layout. Samples and
    prompts are compared in one pass over ``reference_tokens``, so it may be a one-shot iterable
    of chunks. ``prompt_groups``/``reference_groups`` (integer model ids) exclude every checkpoint
    of a prompt's own model: other epochs of the same run are not "other networks". Without
    them a prompt only skips reference models identical to it.
    """
    if (prompt_groups is None) != (reference_groups is None):
        raise ValueError("pass both prompt_groups and reference_groups, or neither")
    num_samples = len(sample_tokens)
    queries, exclude, query_groups = sample_tokens, torch.zeros(num_samples, dtype=torch.bool), None
    if prompt_tokens is not None:
        queries = torch.cat([sample_tokens, prompt_tokens.to(sample_tokens)])
        exclude = torch.cat([exclude, torch.ones(len(prompt_tokens), dtype=torch.bool)])
    if prompt_groups is not None:
        no_group = torch.full((num_samples,), -1, dtype=torch.long)
        query_groups = torch.cat([no_group, torch.as_tensor(prompt_groups).long().cpu()])
    distances, nearest = nearest_neighbor_distances(
        queries,
        reference_tokens,
        mask,
        query_groups,
        reference_groups,
        exclude.to(queries.device),
        chunk_size,
    )
    prompt_distances = distances[num_samples:] if prompt_tokens is not None else None
    return NoveltyReport(distances[:num_samples], nearest[:num_samples], prompt_distances)


def split_token_chunks(split: Dataset, chunk_size: int = 1024) -> Iterable[torch.Tensor]:
    """The normalized tokens ``[chunk, N, T]`` of a zoo split, chunk by chunk (e.g. as the
    reference set of ``novelty_report`` without holding the whole zoo in memory)."""
    rows = split.with_format("torch", columns=["tokens"])
    for start in range(0, len(split), chunk_size):
        yield rows[start : start + chunk_size]["tokens"].float()


def model_groups(split: Dataset) -> torch.Tensor:
    """``[rows]`` integer id of the model each row of a zoo split belongs to (all epochs of a
    model share one id): the ``reference_groups``/``prompt_groups`` of ``novelty_report``."""
    model_ids = split.select_columns(["model_id"]).to_dict()["model_id"]
    _, groups = np.unique(np.array(model_ids), return_inverse=True)
    return torch.from_numpy(groups).long()


@torch.no_grad()
def misclassified(
    networks: Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1024,
    networks_per_pass: int = 64,
) -> torch.Tensor:
    """``[M, n]`` bool: which of the ``n`` examples each network gets wrong (eval mode).

    Networks of one structure run as one vmapped forward pass over stacked weights (chunks of
    ``networks_per_pass``); the networks themselves are not modified.
    """
    if not networks:
        raise ValueError("misclassified got no networks")
    device = next(networks[0].parameters()).device
    wrong = torch.empty(len(networks), len(labels), dtype=torch.bool)
    by_structure: dict[str, list[int]] = {}
    for index, network in enumerate(networks):
        by_structure.setdefault(network_structure(network), []).append(index)
    for indices in by_structure.values():
        base = copy.deepcopy(networks[indices[0]]).eval().to("meta")

        def logits(params, buffers, x, base=base):
            return functional_call(base, (params, buffers), (x,))

        forward = torch.vmap(logits, in_dims=(0, 0, None))
        for start in range(0, len(indices), networks_per_pass):
            chunk = indices[start : start + networks_per_pass]
            params, buffers = stack_module_state([networks[i].eval() for i in chunk])
            for first in range(0, len(labels), batch_size):
                x = inputs[first : first + batch_size].to(device)
                y = labels[first : first + batch_size].to(device)
                predicted = forward(params, buffers, x).argmax(-1)  # [m, b]
                wrong[chunk, first : first + len(y)] = (predicted != y).cpu()
    return wrong


def misprediction_iou(
    queries: torch.Tensor,
    reference: torch.Tensor,
    exclude_identical: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest IoU of every query's mistakes with any reference network's mistakes.

    Args:
        queries: ``[k, n]`` bool, True where query network ``i`` misclassifies example ``j``.
        reference: ``[R, n]`` bool, the same for the reference (prompts, training networks).
        exclude_identical: skip reference rows with exactly the query's mistakes (the query
            itself, when it is part of the reference).

    Returns:
        ``(iou [k], index [k])``. Two networks without any mistake have IoU 1 (same behaviour).
    """
    if queries.shape[1:] != reference.shape[1:] or queries.dim() != 2:
        raise ValueError(
            f"mistake masks must be [k, n] and [R, n] over the same examples, got "
            f"{tuple(queries.shape)} and {tuple(reference.shape)}"
        )
    if len(reference) == 0:
        raise ValueError("the reference set is empty")
    q, r = queries.double(), reference.double()
    intersection = q @ r.T
    union = q.sum(1, keepdim=True) + r.sum(1)[None] - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
    if exclude_identical:
        iou = iou.masked_fill(union == intersection, -1.0)
    return iou.max(dim=1)
