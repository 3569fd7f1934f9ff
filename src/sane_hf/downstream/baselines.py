"""Memorization baselines: what SANE samples must beat to count as more than perturbed prompts.

Zeng et al. ("Generative Modeling of Weights: Generalization or Memorization?", CVPR 2026)
found that weight generators, hyper-representations included, do not beat two trivial ways of
making "new" networks from training checkpoints:

- **noise**: a prompt plus Gaussian noise. Here the noise lives in the zoo's normalized token
  space (where SANE's samples are compared) and its norm is set exactly, so a noisy prompt sits
  at a chosen distance from its prompt. One level is *matched* to a SANE method: the median
  distance of its samples to their nearest prompt, drawn around the same prompts. At the same
  distance, SANE is only better than noise if its samples are more accurate. A SANE method
  that *selects* its samples (subsampling: the best 10 of 25 candidates by accuracy on training
  images; bootstrapping: several such rounds) is also compared with matched noise *selected the
  same way*: as many noisy candidates, the same score, the same rounds. The unselected matched
  noise stays as a second row.
- **ensemble**: the average of two aligned prompts (a weight-space interpolation). Averaging
  normalized tokens is averaging raw weights, since normalization is affine per value.

Both are built like SANE's samples (de-normalized by the sampler, BatchNorm conditioned on the
same batches) and fine-tuned next to them by `evaluate_samples`; `novelty` measures every
network's distance to the nearest training checkpoint and the overlap of its mistakes with those
of the prompts and training networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sane_hf.downstream.novelty import (
    misclassified,
    misprediction_iou,
    nearest_neighbor_distances,
)
from sane_hf.downstream.sampling import SampledModels, SaneSampler, condition_batchnorm

NOISE = "noise"
ENSEMBLE = "ensemble"
SAMPLES = "samples"


def noise_tokens(
    prompt_tokens: torch.Tensor,
    mask: torch.Tensor,
    distance: float,
    prompt_indices: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[k, N, T]`` prompts ``prompt_indices`` plus Gaussian noise of L2 norm exactly ``distance``
    over the real values (padding stays untouched), in the normalized token space.

    A Gaussian direction with a fixed norm puts every noisy network at ``distance`` from its
    prompt: the comparison with SANE samples at the same distance is then exact, not on average.
    """
    if not distance >= 0:  # NaN too
        raise ValueError(f"noise distance must be >= 0, got {distance}")
    if prompt_tokens.shape[1:] != mask.shape:
        raise ValueError(
            f"prompt tokens {tuple(prompt_tokens.shape)} do not match the mask {tuple(mask.shape)}"
        )
    mask = mask.to(prompt_tokens.device)
    shape = (len(prompt_indices), *prompt_tokens.shape[1:])
    noise = torch.randn(shape, generator=generator).to(prompt_tokens) * mask
    norms = noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    noise = noise * (distance / norms)[:, None, None]
    return prompt_tokens[prompt_indices.to(prompt_tokens.device)] + noise


def prompt_pairs(
    num_prompts: int, num_pairs: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[num_pairs, 2]`` random pairs of two different prompts (seeded)."""
    if num_prompts < 2:
        raise ValueError(f"the ensemble baseline needs at least 2 prompts, got {num_prompts}")
    first = torch.randint(num_prompts, (num_pairs,), generator=generator)
    # an offset in 1..E-1 makes the second prompt always differ from the first
    second = (
        first + torch.randint(1, num_prompts, (num_pairs,), generator=generator)
    ) % num_prompts
    return torch.stack([first, second], dim=1)


def ensemble_tokens(prompt_tokens: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``[k, N, T]`` averages of the prompt pairs ``pairs`` ``[k, 2]`` (normalized tokens)."""
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be [k, 2], got {tuple(pairs.shape)}")
    return prompt_tokens[pairs.to(prompt_tokens.device)].mean(dim=1)


@dataclass
class TokenNetworks:
    """Networks and the normalized tokens ``[k, N, T]`` they were built from."""

    models: list[nn.Module]
    tokens: torch.Tensor


@dataclass
class BaselineGroups:
    """Every group to evaluate, in table order (each SANE group followed by its matched noise),
    with the role of each (``samples``, ``noise``, ``ensemble``) and ``matched[sane] = noise``."""

    groups: dict[str, Sequence[nn.Module]]
    tokens: dict[str, torch.Tensor]
    roles: dict[str, str] = field(default_factory=dict)
    matched: dict[str, str] = field(default_factory=dict)
    selected: dict[str, str] = field(default_factory=dict)  # SANE group -> selected matched noise


@dataclass
class MemorizationBaselines:
    """Noise and ensemble baselines around the prompts, and per-network novelty.

    Args:
        sampler: the sampler that drew the SANE samples (it de-normalizes and builds networks).
        prompt_tokens: ``[E, N, T]`` the prompts, normalized as SANE saw them.
        reference_chunks: returns the training checkpoints' normalized tokens chunk by chunk
            (e.g. ``lambda: split_token_chunks(zoo.splits["train"])``): the distance reference.
        reference_tokens: ``[R, N, T]`` tokens of training networks whose mistakes a network
            should not copy (the prompts are always added); e.g. the train split at the prompt
            epoch.
        noise_levels: noise norms of the noise curve, as fractions of the median distance
            between distinct prompts (the scale of "a different network").
        num_networks: networks per baseline group.
        seed: seeds the noise and the pairs.
        bn_batches: BatchNorm conditioning batches (the same the samples got), or None.
        score_fn: the score SANE's selecting methods rank candidates by (``model -> float``).
        num_candidates: candidates per selection round, as SANE's.
        selection_rounds: ``{SANE group: rounds}`` for the groups that were selected (1 for
            subsampling); each gets a matched-noise group selected the same way.
    """

    sampler: SaneSampler
    prompt_tokens: torch.Tensor
    reference_chunks: Callable[[], Iterable[torch.Tensor]]
    reference_tokens: torch.Tensor | None = None
    noise_levels: Sequence[float] = (0.25, 0.5, 1.0)
    num_networks: int = 5
    seed: int = 0
    bn_batches: Iterable | None = None
    score_fn: Callable[[nn.Module], float] | None = None
    num_candidates: int = 0
    selection_rounds: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        between, _ = nearest_neighbor_distances(
            self.prompt_tokens, self.prompt_tokens, self.mask, exclude_identical=True
        )
        #: median distance of a prompt to its nearest other prompt: the unit of noise_levels
        self.scale = float(between.median()) if len(self.prompt_tokens) > 1 else float("nan")

    @property
    def mask(self) -> torch.Tensor:
        return self.sampler.mask

    def _networks(self, tokens: torch.Tensor) -> TokenNetworks:
        models = self.sampler.build(tokens)
        if self.bn_batches is not None:
            for network in models:
                condition_batchnorm(network, self.bn_batches)
        return TokenNetworks(models, tokens)

    def noise(
        self, distance: float, prompt_indices: torch.Tensor | None = None, seed_offset: int = 0
    ) -> TokenNetworks:
        """``num_networks`` noisy prompts at ``distance`` (random prompts unless given)."""
        generator = torch.Generator().manual_seed(self.seed + 1000 + seed_offset)
        if prompt_indices is None:
            prompt_indices = torch.randint(
                len(self.prompt_tokens), (self.num_networks,), generator=generator
            )
        tokens = noise_tokens(self.prompt_tokens, self.mask, distance, prompt_indices, generator)
        return self._networks(tokens)

    def selected_noise(self, distance: float, rounds: int, seed_offset: int = 0) -> TokenNetworks:
        """Noise at ``distance`` selected like SANE's subsampling/bootstrapping: ``num_candidates``
        noisy prompts (random prompts), the ``num_networks`` best by ``score_fn``; each further
        round draws ``num_candidates`` at ``distance`` around the kept ones and keeps the best of
        both."""
        if self.score_fn is None or self.num_candidates < self.num_networks:
            raise ValueError(
                "selected noise needs a score_fn and num_candidates >= num_networks "
                f"(got {self.num_candidates} candidates for {self.num_networks} networks)"
            )
        generator = torch.Generator().manual_seed(self.seed + 3000 + seed_offset)
        parents = self.prompt_tokens
        kept_tokens, kept_scores = None, None
        for _ in range(rounds):
            indices = torch.randint(len(parents), (self.num_candidates,), generator=generator)
            tokens = noise_tokens(parents, self.mask, distance, indices, generator)
            scores = torch.tensor([float(self.score_fn(m)) for m in self._networks(tokens).models])
            if kept_tokens is not None:
                tokens, scores = torch.cat([kept_tokens, tokens]), torch.cat([kept_scores, scores])
            best = scores.topk(self.num_networks).indices
            kept_tokens, kept_scores = tokens[best], scores[best]
            parents = kept_tokens
        return self._networks(kept_tokens)

    def ensemble(self) -> TokenNetworks:
        """``num_networks`` averages of two different prompts."""
        generator = torch.Generator().manual_seed(self.seed + 2000)
        pairs = prompt_pairs(len(self.prompt_tokens), self.num_networks, generator)
        return self._networks(ensemble_tokens(self.prompt_tokens, pairs))

    def matched_distance(self, samples: SampledModels) -> float:
        """Median distance of ``samples`` to their nearest prompt."""
        distances, _ = nearest_neighbor_distances(samples.tokens, self.prompt_tokens, self.mask)
        return float(distances.median())

    def groups(self, sampled: Mapping[str, SampledModels]) -> BaselineGroups:
        """SANE groups, each followed by its matched-noise group, then the noise curve and the
        ensemble. Matched noise is drawn around the prompts the samples were drawn around
        (random prompts for the Gaussian prior); for a group in ``selection_rounds`` a second
        matched-noise group is selected the way the samples were (`selected_noise`)."""
        result = BaselineGroups({}, {})
        for offset, (name, samples) in enumerate(sampled.items()):
            result.groups[name], result.tokens[name] = samples.models, samples.tokens
            result.roles[name] = SAMPLES
            distance = self.matched_distance(samples)
            indices = None
            if samples.prompt_indices is not None:
                indices = samples.prompt_indices[:, 0].cpu()[: self.num_networks]
            noisy = self.noise(distance, indices, seed_offset=offset)
            noise_name = f"noise matched to {name}"
            self._add(result, noise_name, noisy, NOISE)
            result.matched[name] = noise_name
            if name in self.selection_rounds:
                rounds = self.selection_rounds[name]
                selected = self.selected_noise(distance, rounds, seed_offset=offset)
                selected_name = f"{noise_name}, selected"
                self._add(result, selected_name, selected, NOISE)
                result.selected[name] = selected_name
        if len(self.prompt_tokens) > 1:  # one prompt: no distance between prompts, no pairs
            for level in self.noise_levels:
                noisy = self.noise(level * self.scale, seed_offset=100 + len(result.groups))
                self._add(result, f"noise {level:g}x prompt distance", noisy, NOISE)
            self._add(result, "ensemble of 2 prompts", self.ensemble(), ENSEMBLE)
        return result

    @staticmethod
    def _add(result: BaselineGroups, name: str, networks: TokenNetworks, role: str) -> None:
        result.groups[name], result.tokens[name] = networks.models, networks.tokens
        result.roles[name] = role

    def novelty(
        self, built: BaselineGroups, inputs: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, dict[str, np.ndarray]]:
        """Per group of ``built`` and network: ``distance`` to the nearest training checkpoint
        (normalized tokens) and ``iou``, the largest overlap of its test mistakes with those of
        any prompt or reference training network (``inputs``/``labels``: the test split)."""
        names = list(built.tokens)
        queries = torch.cat([built.tokens[name].to(self.prompt_tokens) for name in names])
        distances, _ = nearest_neighbor_distances(queries, self.reference_chunks(), self.mask)
        reference = self.prompt_tokens
        if self.reference_tokens is not None:
            reference = torch.cat([reference, self.reference_tokens.to(reference)])
        reference_wrong = misclassified(self.sampler.build(reference), inputs, labels)
        members = [network for name in names for network in built.groups[name]]
        iou, _ = misprediction_iou(misclassified(members, inputs, labels), reference_wrong)
        result, start = {}, 0
        for name in names:
            stop = start + len(built.tokens[name])
            result[name] = {
                "distance": distances[start:stop].numpy(),
                "iou": iou[start:stop].numpy(),
            }
            start = stop
        return result
