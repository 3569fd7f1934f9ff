"""Pretraining data of mixed zoos: windows drawn across networks of different lengths.

A mixed dataset (`sane_hf.zoo.mixed`) holds networks of several architectures in universal
tokens, so sequences differ in length and every checkpoint has its own positions and counts.
They are padded to the longest sequence (counts 0 past a sequence's end) and each window starts
inside its own sequence; tokens past the end are padding (``attention_mask`` False). Every
architecture is drawn equally often per epoch as its share of checkpoints. Permutation
augmentation is per architecture and not used here; noise and erasing are as for one zoo.
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from torch import Tensor

from sane_hf.pretraining.augmentation import (
    WindowBatch,
    WindowSampler,
    gather_rows,
    real_entry_mask,
    seeded_generator,
)
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.zoo.mixed import padded_split


def mixed_sampler(
    split: Dataset, config: PretrainingConfig, window_size: int, device: torch.device, seed: int
) -> MixedWindowSampler:
    """The window sampler of one mixed split, its tokens in host memory."""
    tokens, counts, positions, lengths = padded_split(split)
    return MixedWindowSampler(
        tokens,
        counts,
        positions,
        lengths,
        window_size=window_size,
        batch_size=config.batch_size,
        device=device,
        noise_sigma=config.noise_sigma,
        erase_probability=config.erase_probability,
        seed=seed,
        epoch_size=config.epoch_size,
    )


class MixedWindowSampler(WindowSampler):
    """`WindowSampler` over checkpoints of different lengths (see the module docstring).

    ``counts`` and ``positions`` are per checkpoint (``[C, N]``, ``[C, N, 3]``) and ``lengths``
    ``[C]`` says where each sequence ends.
    """

    def __init__(
        self,
        tokens: Tensor,
        counts: Tensor,
        positions: Tensor,
        lengths: Tensor,
        window_size: int,
        batch_size: int,
        device: torch.device | str,
        noise_sigma: float = 0.1,
        erase_probability: float = 0.0,
        seed: int = 0,
        epoch_size: int | None = None,
    ):
        super().__init__(
            tokens,
            counts[0],
            positions[0],
            window_size,
            batch_size,
            device,
            None,
            noise_sigma,
            erase_probability,
            seed,
            epoch_size,
        )
        self.lengths = lengths.to(self.data_device)
        self.real_mask = real_entry_mask(counts.to(self.device), self.tokensize).flatten(0, 1)
        self.positions = positions.to(self.device).long().flatten(0, 1)
        mean_windows = lengths.double().div(window_size).ceil().mean().item()
        self.epoch_size = epoch_size or math.ceil(self.num_checkpoints * mean_windows)

    def train_batch(
        self, epoch: int, index: int, rank: int = 0, num_processes: int = 1
    ) -> WindowBatch:
        order = self.epoch_order(epoch)
        first = (index * num_processes + rank) * self.batch_size
        slots = torch.arange(first, first + self.batch_size, device=self.data_device)
        checkpoints = order[slots % self.epoch_size]
        generator = seeded_generator(self.data_device, self.seed, 1, epoch, index, rank)
        room = (self.lengths[checkpoints] - self.window_size).clamp_min(0) + 1
        uniform = torch.rand(self.batch_size, generator=generator, device=self.data_device)
        starts = (uniform * room).long().clamp_max(room - 1)
        clean = self.gather_windows(checkpoints, starts)
        clean.targets = clean.views = clean.views.expand(2, -1, -1, -1)
        augment_generator = seeded_generator(self.device, self.seed, 2, epoch, index, rank)
        return self.augment(clean, augment_generator)

    def gather_windows(
        self, checkpoints: Tensor, starts: Tensor, permutations: Tensor | None = None
    ) -> WindowBatch:
        """Clean windows of ``checkpoints`` at ``starts`` (one view); past a sequence's end the
        tokens are padding."""
        offsets = torch.arange(self.window_size, device=starts.device)
        index = starts[:, None] + offsets
        valid = index < self.lengths[checkpoints][:, None]
        index = index.clamp_max(self.num_tokens - 1)
        flat = checkpoints[:, None] * self.num_tokens + index
        entries = flat.unsqueeze(-1) * self.tokensize + torch.arange(
            self.tokensize, device=index.device
        )
        windows = self._to_device(gather_rows(self.tokens.view(-1), entries.unsqueeze(0))).float()
        flat, valid = self._to_device(flat), self._to_device(valid)
        token_mask = gather_rows(self.real_mask, flat) & valid.unsqueeze(-1)
        return WindowBatch(
            views=windows.masked_fill(~token_mask, 0.0),
            targets=windows.masked_fill(~token_mask, 0.0),
            positions=gather_rows(self.positions, flat),
            token_mask=token_mask,
            attention_mask=valid,
            checkpoint_index=self._to_device(checkpoints),
        )


__all__ = [
    "MixedWindowSampler",
    "mixed_sampler",
]
