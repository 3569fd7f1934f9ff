"""The fast paths compute what the plain ones do.

Training: the speed switches of the GPU step (no position range check, no attention mask for
batches without padding, SDPA instead of eager attention, fused AdamW, bf16 autocast without a
grad scaler) must not change what is learned: short runs of the tiny preset on real pipeline
batches (CNN-m windows, permutations, noise) give the same loss curve, and the bf16 curve stays
within the run-to-run noise of the float32 one. CPU only, compile off.

Sampling: (de-)normalization in place and networks built without copying the template.
"""

import functools

import pytest
import torch

from sane_hf import SaneConfig, SaneModel, SaneSampler, WeightTokenizer
from sane_hf.pretraining.augmentation import TokenPermutation, WindowSampler
from sane_hf.weights.alignment import PermutationSpec
from sane_hf.weights.normalization import (
    NormalizationStats,
    standardize_tokens,
    unstandardize_tokens,
)
from sane_hf.zoo.architectures import build_model

BATCH_SIZE = 4
NUM_BATCHES, PASSES = 3, 4  # a few batches seen repeatedly: their losses must fall


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny ops gain nothing from threads, and threads waiting on each other on a busy CPU
    make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def cnn_m_zoo(num_checkpoints: int = 6):
    """A CNN-m "zoo" (93 tokens, longer than the tiny window of 16): one random network plus
    small per-checkpoint deviations, so there is a shared structure to learn in a few steps."""
    model = build_model("cnn_m")
    encoded = WeightTokenizer(289)(model)
    generator = torch.Generator().manual_seed(0)
    base = encoded.tokens / encoded.tokens[encoded.mask].std()
    noise = torch.randn(num_checkpoints, *base.shape, generator=generator)
    tokens = torch.where(encoded.mask, base + 0.1 * noise, 0.0)
    layout = encoded.layout
    permutation = TokenPermutation.from_spec(PermutationSpec.from_model(model), layout)
    return tokens, layout.row_counts(), layout.positions(), permutation


def batches(data_seed: int = 0) -> list[dict]:
    """Model inputs of a few pipeline batches, repeated PASSES times."""
    tokens, counts, positions, permutation = cnn_m_zoo()
    sampler = WindowSampler(
        tokens, counts, positions, 16, BATCH_SIZE, "cpu", permutation, seed=data_seed
    )
    distinct = [sampler.train_batch(epoch=0, index=i).model_inputs() for i in range(NUM_BATCHES)]
    return distinct * PASSES


def learned(curve: list[float]) -> bool:
    """Every batch's loss on its last pass is below its loss on the first pass."""
    return all(last < first for first, last in zip(curve[:NUM_BATCHES], curve[-NUM_BATCHES:]))


def loss_curve(
    inputs: list[dict], fast: bool, dtype: torch.dtype = torch.float32, model_seed: int = 0
) -> list[float]:
    """Losses of AdamW steps on `inputs`; `fast` turns every speed switch on, else all off."""
    torch.manual_seed(model_seed)
    model = SaneModel(SaneConfig.from_preset("tiny")).train()
    model.set_attn_implementation("sdpa" if fast else "eager")
    model.set_position_checks(not fast)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fast, foreach=False)
    losses = []
    for batch in inputs:
        if not fast:  # the old pipeline: an all-True attention mask instead of None
            batch = {**batch, "attention_mask": torch.ones(batch["tokens"].shape[:2], dtype=bool)}
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses).tolist()


@pytest.fixture(scope="module")
def plain_curve() -> list[float]:
    return loss_curve(batches(), fast=False)


def test_pipeline_batches_of_long_sequences_have_no_attention_mask():
    inputs = batches()[0]
    assert inputs["attention_mask"] is None
    assert inputs["tokens"].shape == (2 * BATCH_SIZE, 16, 289)


def test_fast_path_reproduces_the_plain_loss_curve(plain_curve):
    fast = loss_curve(batches(), fast=True)
    assert learned(plain_curve)  # the model trains: the comparison means something
    assert fast == pytest.approx(plain_curve, rel=1e-4)


def test_bf16_curve_stays_within_run_to_run_noise(plain_curve):
    """bf16 autocast without a grad scaler vs float32: closer than two float32 runs that differ
    only in the model's initialization."""
    inputs = batches()
    bf16 = torch.tensor(loss_curve(inputs, fast=True, dtype=torch.bfloat16))
    plain = torch.tensor(plain_curve)
    other_init = torch.tensor(loss_curve(inputs, fast=False, model_seed=1))
    assert (bf16 - plain).abs().mean() < 0.5 * (other_init - plain).abs().mean()
    assert learned(bf16.tolist())


def test_position_checks_can_be_switched_off():
    torch.manual_seed(0)
    model = SaneModel(SaneConfig.from_preset("tiny")).eval()
    tokens = torch.randn(1, 2, 289)
    beyond = torch.tensor([[[1024, 0, 0], [1025, 0, 0]]])  # the global table has 1024 rows
    with pytest.raises(ValueError, match="global position index out of range"):
        model(tokens, beyond)
    model.set_position_checks(False)
    with pytest.raises(IndexError):  # no friendly check: the embedding lookup itself fails
        model(tokens, beyond)
    model.set_position_checks(True)
    with pytest.raises(ValueError, match="global position index out of range"):
        model(tokens, beyond)


def test_standardizing_in_place_leaves_the_input_alone():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    mean = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    std = torch.rand(5, 7, generator=generator, dtype=torch.float64) + 0.5
    original = tokens.clone()
    assert torch.equal(standardize_tokens(tokens, mean, std), (original - mean) / std)
    assert torch.equal(unstandardize_tokens(tokens, mean, std), original * std + mean)
    assert torch.equal(tokens, original)


def test_sampled_networks_own_their_weights():
    torch.manual_seed(0)
    template = build_model("cnn_s", in_channels=1)
    tokenizer = WeightTokenizer(289)
    keys = [spec.key for layer in tokenizer(template).layout.layers for spec in layer.parameters]
    normalization = NormalizationStats.from_state_dicts([template.state_dict()], keys)
    model = SaneModel(SaneConfig.from_preset("tiny")).eval()
    sampler = SaneSampler(model, template, normalization, tokenizer=tokenizer)
    before = {key: value.clone() for key, value in sampler.template.state_dict().items()}
    tokens = sampler.prompt_tokens([template])
    (network,) = sampler.build(tokens + 0.5)  # shifted: other weights than the template's
    built, kept = network.state_dict(), sampler.template.state_dict()
    assert all(torch.equal(kept[key], before[key]) for key in before)  # template untouched
    assert all(built[key].data_ptr() != kept[key].data_ptr() for key in before)
    assert all(parameter.requires_grad for parameter in network.parameters())
    expected = sampler.tokenizer.decode(
        unstandardize_tokens(tokens[0] + 0.5, *sampler.token_maps()), sampler.layout
    )
    assert all(torch.equal(built[key], expected[key]) for key in keys)
