import functools

import pytest
import torch

from sane_hf.pretraining.augmentation import (
    TokenPermutation,
    WindowSampler,
    multiplicative_noise,
    random_erasing,
)
from sane_hf.weights.alignment import PermutationSpec, apply_permutation
from sane_hf.weights.layout import real_entry_mask
from sane_hf.weights.tokenization import WeightTokenizer
from sane_hf.zoo.architectures import build_model


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state_dict with distinct random values (BatchNorm statistics included)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in model.state_dict().items()
    }


@functools.cache
def cnn_zoo(num_checkpoints: int, tokensize: int = 289):
    """Tokens [M, N, T], counts, positions and the permutation of a few random CNN-s."""
    model = build_model("cnn_s", in_channels=1)
    tokenizer = WeightTokenizer(tokensize)
    encoded = [tokenizer(random_state_dict(model, seed)) for seed in range(num_checkpoints)]
    layout = encoded[0].layout
    permutation = TokenPermutation.from_spec(PermutationSpec.from_model(model), layout)
    tokens = torch.stack([e.tokens for e in encoded])
    return tokens, layout.row_counts(), layout.positions(), permutation


@pytest.mark.parametrize(
    ("name", "kwargs", "tokensize"),
    [
        ("cnn_s", {"in_channels": 1}, 289),  # conv -> flatten -> linear: blocks of 3x3 inputs
        ("resnet_bottleneck", {}, 64),  # residual groups, BatchNorm, rows split into chunks
        ("mlp", {"hidden": (30, 20)}, 7),  # many chunks per row, padding in the last one
    ],
)
def test_token_permutation_equals_tokenizing_the_permuted_network(name, kwargs, tokensize):
    model = build_model(name, **kwargs)
    spec = PermutationSpec.from_model(model)
    state_dict = random_state_dict(model, seed=0)
    tokenizer = WeightTokenizer(tokensize)
    encoded = tokenizer(state_dict)
    permutation = TokenPermutation.from_spec(spec, encoded.layout)

    generator = torch.Generator().manual_seed(1)
    permutations = permutation.random(3, generator)
    window = min(16, len(encoded))
    starts = torch.randint(len(encoded) - window + 1, (3,), generator=generator)
    token_index = starts[:, None] + torch.arange(window)
    entries = permutation.source_entries(token_index, permutations)
    for sample in range(3):
        group_perms = {
            group: permutations[sample, g, :size]
            for g, (group, size) in enumerate(spec.groups.items())
        }
        expected = tokenizer(apply_permutation(state_dict, spec, group_perms)).tokens
        permuted_window = encoded.tokens.flatten()[entries[sample]]
        assert torch.equal(permuted_window, expected[token_index[sample]])
    full = permutation.source_entries(torch.arange(len(encoded))[None], permutations[:1])
    assert not torch.equal(encoded.tokens.flatten()[full[0]], encoded.tokens)


def test_token_permutation_rejects_axis_that_does_not_fit_its_group():
    with pytest.raises(ValueError, match="axis 0 of parameter 0"):
        TokenPermutation(torch.zeros(2, 3, dtype=torch.long), [(4, 3)], [[(0, 1), None]], [5])


def test_windows_of_short_sequences_are_padded():
    tokens, counts, positions, _ = cnn_zoo(2)
    short = 5
    sampler = WindowSampler(
        tokens[:, :short],
        counts[:short],
        positions[:short],
        window_size=8,
        batch_size=4,
        device="cpu",
    )
    batch = sampler.train_batch(epoch=0, index=0)
    assert batch.views.shape == (2, 4, 8, 289)
    assert batch.attention_mask.tolist() == [[True] * short + [False] * 3] * 4
    assert not batch.token_mask[:, short:].any()
    assert (batch.views[:, :, short:] == 0).all() and (batch.targets[:, :, short:] == 0).all()
    assert torch.equal(
        batch.token_mask[:, :short], real_entry_mask(counts[:short], 289).expand(4, -1, -1)
    )


def test_window_starts_cover_the_sequence():
    tokens, counts, positions, _ = cnn_zoo(2)
    sampler = WindowSampler(tokens, counts, positions, window_size=16, batch_size=64, device="cpu")
    starts = torch.cat([sampler.train_batch(epoch=0, index=i).positions[:, 0, 0] for i in range(4)])
    assert set(starts.tolist()) == set(range(len(counts) - 16 + 1))


def test_noise_and_erasing_only_touch_real_entries():
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 11, (2, 16), generator=generator)
    real = real_entry_mask(counts, 10)
    padding_value = 7.0  # a sentinel: padding must come back untouched
    tokens = torch.where(real, torch.randn(2, 16, 10, generator=generator), padding_value)

    noisy = multiplicative_noise(tokens, real, sigma=0.1, generator=generator)
    assert (noisy[~real] == padding_value).all()
    assert (noisy[real] != tokens[real]).all()
    relative = noisy[real] / tokens[real] - 1
    assert 0.08 < relative.std() < 0.12

    erased = random_erasing(tokens, real, probability=1.0, generator=generator)
    assert (erased[~real] == padding_value).all()
    changed = erased != tokens
    assert changed.any(dim=(1, 2)).all()  # every window got its rectangle
    assert (erased[changed] == 0).all()


def test_batches_depend_only_on_seed_epoch_index_and_rank():
    tokens, counts, positions, permutation = cnn_zoo(4)

    def make_sampler():
        return WindowSampler(
            tokens, counts, positions, 16, 4, "cpu", permutation, erase_probability=0.5, seed=3
        )

    first = make_sampler().train_batch(epoch=2, index=1, rank=0, num_processes=2)
    again = make_sampler().train_batch(epoch=2, index=1, rank=0, num_processes=2)
    other_rank = make_sampler().train_batch(epoch=2, index=1, rank=1, num_processes=2)
    assert torch.equal(first.views, again.views) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.views, other_rank.views)
    assert not torch.equal(first.views[0], first.views[1])  # two different views
    assert not torch.equal(first.targets[0], first.targets[1])  # permuted differently


def test_an_epoch_visits_every_checkpoint_equally_often_across_processes():
    tokens, counts, positions, _ = cnn_zoo(5)
    sampler = WindowSampler(tokens, counts, positions, window_size=16, batch_size=3, device="cpu")
    assert sampler.epoch_size == 5 * 3  # 48 tokens: three windows of 16 per checkpoint
    batches = sampler.batches_per_epoch(num_processes=2)
    seen = torch.cat(
        [
            sampler.train_batch(0, index, rank, num_processes=2).checkpoint_index
            for index in range(batches)
            for rank in range(2)
        ]
    )[: sampler.epoch_size]
    assert torch.bincount(seen).tolist() == [3] * 5


def test_eval_batches_cover_every_window_once_across_processes():
    tokens, counts, positions, _ = cnn_zoo(3)
    sampler = WindowSampler(tokens, counts, positions, window_size=20, batch_size=4, device="cpu")
    windows, batches_per_rank = [], []
    for rank in range(2):
        batches = list(sampler.eval_batches(rank, num_processes=2))
        batches_per_rank.append(len(batches))
        for batch in batches:
            assert batch.num_views == 1 and torch.equal(batch.views, batch.targets)
            counted = batch.token_mask.any(dim=(1, 2))
            starts = batch.positions[:, 0, 0]
            windows += zip(batch.checkpoint_index[counted].tolist(), starts[counted].tolist())
    assert batches_per_rank == [2, 2]  # 9 windows in batches of 4: equal counts, 7 slots repeat
    assert sorted(windows) == [(c, s) for c in range(3) for s in (0, 20, 40)]
