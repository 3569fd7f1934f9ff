import numpy as np
import pytest
import torch

from sane_hf.downstream.embedding import (
    decode_latents,
    default_window_and_halo,
    embed,
    encode_tokens,
    halo_windows,
    pool_latents,
)
from sane_hf.models.sane.configuration_sane import SaneConfig
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.models.sane.processing_sane import SaneProcessor
from sane_hf.zoo.metadata import zoo_metadata
from synthetic_zoo import template as synthetic_template

NUM_TOKENS = 37


@pytest.fixture(scope="module")
def sane():
    torch.manual_seed(0)
    return SaneModel(SaneConfig.from_preset("tiny", tokensize=5)).eval()


@pytest.fixture(scope="module")
def sequences():
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, NUM_TOKENS, 5, generator=generator)
    index = torch.arange(NUM_TOKENS)
    positions = torch.stack([index, index // 8, index % 8], dim=-1)
    return tokens, positions


def test_halo_windows_cover_every_token_once_with_context_on_both_sides():
    index, content = halo_windows(23, window=4, halo=3)
    assert index.shape == (6, 10)
    covered = index[content]
    assert torch.equal(covered.sort().values, torch.arange(23))
    for row, keep in zip(index, content):
        first, last = row[keep].min().item(), row[keep].max().item()
        # at least `halo` context tokens wherever the sequence continues
        assert row.min() <= max(first - 3, 0) and row.max() >= min(last + 3, 22)
        assert torch.equal(
            row, torch.arange(row[0], row[0] + 10)
        )  # contiguous, inside the sequence


def test_halo_windows_reject_bad_sizes():
    with pytest.raises(ValueError, match="window must be >= 1"):
        halo_windows(10, window=0, halo=2)


def test_default_window_fills_the_training_window():
    window, halo = default_window_and_halo(64)
    assert (window, halo) == (32, 16)
    assert window + 2 * halo == 64


def test_window_covering_the_sequence_equals_plain_encoding(sane, sequences):
    tokens, positions = sequences
    plain = sane.encode(tokens, positions.expand(3, -1, -1))
    halo = encode_tokens(sane, tokens, positions, window=NUM_TOKENS, halo=8)
    torch.testing.assert_close(halo, plain)


def test_halo_context_changes_latents_and_batch_size_does_not(sane, sequences):
    tokens, positions = sequences
    plain = sane.encode(tokens, positions.expand(3, -1, -1))
    one_by_one = encode_tokens(sane, tokens, positions, window=5, halo=4, batch_size=1)
    all_at_once = encode_tokens(sane, tokens, positions, window=5, halo=4, batch_size=1000)
    torch.testing.assert_close(one_by_one, all_at_once, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(one_by_one, plain, atol=1e-4)  # windows see less context
    # a single sequence gives the rows of the batched result
    single = encode_tokens(sane, tokens[1], positions, window=5, halo=4, batch_size=7)
    torch.testing.assert_close(single, all_at_once[1], rtol=1e-5, atol=1e-5)


def test_halo_decoding_matches_plain_decoding_and_ignores_batch_size(sane, sequences):
    tokens, positions = sequences
    latents = encode_tokens(sane, tokens, positions, window=NUM_TOKENS, halo=0)
    plain = sane.decode(latents, positions.expand(3, -1, -1))
    torch.testing.assert_close(decode_latents(sane, latents, positions, NUM_TOKENS, 3), plain)
    small = decode_latents(sane, latents, positions, window=6, halo=2, batch_size=2)
    large = decode_latents(sane, latents, positions, window=6, halo=2, batch_size=64)
    torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-5)
    assert small.shape == tokens.shape


def test_encoding_leaves_the_training_mode_alone(sane, sequences):
    tokens, positions = sequences
    sane.train()
    try:
        encode_tokens(sane, tokens, positions, window=8, halo=2)
        assert sane.encoder.training
    finally:
        sane.eval()


def test_pool_latents_means_over_all_tokens_and_per_layer():
    latents = torch.arange(12.0).view(1, 6, 2)
    positions = torch.tensor([[0, 0, 0], [1, 0, 1], [2, 3, 0], [3, 3, 1], [4, 3, 2], [5, 7, 0]])
    mean, layer_means = pool_latents(latents, positions)
    torch.testing.assert_close(mean, latents.mean(1))
    expected = torch.stack(
        [latents[0, :2].mean(0), latents[0, 2:5].mean(0), latents[0, 5:].mean(0)]
    )
    torch.testing.assert_close(layer_means[0], expected)
    single_mean, single_layers = pool_latents(latents[0], positions)
    torch.testing.assert_close(single_layers, layer_means[0])
    torch.testing.assert_close(single_mean, mean[0])


@pytest.fixture(scope="module")
def zoo_sane(synthetic_sane):
    return synthetic_sane  # the zoo's token size (this module's `sane` has token size 5)


def test_zoo_split_embeddings_match_embedding_each_network(zoo, zoo_sane):
    split = zoo["validation"]
    embeddings = embed(zoo_sane, split, window=8, halo=4, models_per_chunk=4, progress=False)
    assert embeddings.mean.shape == (len(split), zoo_sane.config.latent_dim)
    assert embeddings.token_latents is None  # not kept for zoos unless asked for
    np.testing.assert_array_equal(embeddings.properties["epoch"], split["epoch"])
    assert embeddings.properties["activation"].tolist() == [
        row["activation"] for row in split["hyperparameters"]
    ]
    assert np.isnan(embeddings.properties["val_acc"]).all()  # missing values stay visible

    # a network given as raw weights goes through the zoo's processor (layout, statistics)
    metadata = zoo_metadata(zoo)
    processor = SaneProcessor.from_zoo_metadata(metadata, config=zoo_sane.config)
    row = 5
    state_dict = metadata.decode(split[row]["tokens"])
    single = embed(
        zoo_sane,
        state_dict,
        processor=processor,
        window=8,
        halo=4,
        return_token_latents=True,
        progress=False,
    )
    torch.testing.assert_close(single.mean[0], embeddings.mean[row], rtol=1e-4, atol=1e-5)
    assert single.token_latents.shape == (1, len(split[row]["tokens"]), zoo_sane.config.latent_dim)


def test_embedding_raw_weights_without_a_processor_is_an_error(zoo_sane):
    with pytest.raises(TypeError, match=r"pass processor=SaneProcessor\.from_pretrained"):
        embed(zoo_sane, synthetic_template())
