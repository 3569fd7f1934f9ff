import pytest
import torch
from torch import nn

from sane_hf.sampling import (
    condition_batchnorm,
    draw_latents,
    gaussian_prior_latents,
    nearest_neighbor_distances,
    novelty_report,
)


def _prompts(num_prompts=4, num_tokens=12, latent_dim=3):
    # prompt e has every latent equal to e, so a latent reveals which prompt it came from
    return torch.arange(num_prompts, dtype=torch.float32)[:, None, None].expand(
        num_prompts, num_tokens, latent_dim
    )


@pytest.mark.parametrize("mode", ["joint", "shared"])
def test_zero_bandwidth_one_prompt_modes_reproduce_prompts_exactly(mode):
    prompts = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(0))
    draw = draw_latents(
        prompts, 6, mode=mode, bandwidth=0.0, generator=torch.Generator().manual_seed(1)
    )
    chosen = draw.prompt_indices[:, 0]
    assert torch.equal(draw.latents, prompts[chosen])


def test_token_mode_mixes_prompts_across_tokens_one_prompt_modes_do_not():
    prompts = _prompts()
    for mode in ("token", "joint", "shared"):
        draw = draw_latents(
            prompts, 8, mode=mode, bandwidth=0.0, generator=torch.Generator().manual_seed(0)
        )
        # with zero bandwidth the latent value is the prompt index it was taken from
        assert torch.equal(draw.latents[..., 0].long(), draw.prompt_indices)
        prompts_per_sample = [len(row.unique()) for row in draw.prompt_indices]
        if mode == "token":
            assert all(n > 1 for n in prompts_per_sample)
        else:
            assert all(n == 1 for n in prompts_per_sample)


def test_shared_mode_adds_one_noise_vector_per_sample_joint_mode_one_per_token():
    prompts = torch.zeros(1, 5, 3)
    shared = draw_latents(prompts, 4, "shared", 0.2, torch.Generator().manual_seed(0)).latents
    joint = draw_latents(prompts, 4, "joint", 0.2, torch.Generator().manual_seed(0)).latents
    assert torch.equal(shared, shared[:, :1].expand_as(shared))
    assert not torch.equal(joint, joint[:, :1].expand_as(joint))
    assert shared.abs().max() > 0


def test_bandwidth_scales_the_noise():
    prompts = torch.zeros(2, 50, 16)
    draw = draw_latents(prompts, 40, "joint", 0.2, torch.Generator().manual_seed(0))
    assert draw.latents.std().item() == pytest.approx(0.2, rel=0.05)


def test_seeded_draws_are_reproducible():
    prompts = torch.randn(5, 7, 3)
    first = draw_latents(prompts, 4, "token", 0.2, torch.Generator().manual_seed(3))
    second = draw_latents(prompts, 4, "token", 0.2, torch.Generator().manual_seed(3))
    other = draw_latents(prompts, 4, "token", 0.2, torch.Generator().manual_seed(4))
    assert torch.equal(first.latents, second.latents)
    assert torch.equal(first.prompt_indices, second.prompt_indices)
    assert not torch.equal(first.latents, other.latents)


def test_draw_latents_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown KDE mode"):
        draw_latents(torch.zeros(1, 2, 3), 1, mode="per_token")
    with pytest.raises(ValueError, match=r"\[E, N, D\]"):
        draw_latents(torch.zeros(2, 3), 1)


def test_gaussian_prior_latents_are_seeded_and_scaled():
    first = gaussian_prior_latents(8, 20, 16, sigma=0.5, generator=torch.Generator().manual_seed(0))
    second = gaussian_prior_latents(
        8, 20, 16, sigma=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(first, second)
    assert first.shape == (8, 20, 16)
    assert first.std().item() == pytest.approx(0.5, rel=0.1)


def test_condition_batchnorm_matches_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))
    model[1].running_mean.fill_(5.0)  # stale statistics, as decoded by a sampler
    model[1].running_var.fill_(9.0)
    data = torch.randn(64, 4) * 3 + 1
    batches = [(chunk, torch.zeros(len(chunk))) for chunk in data.split(16)]
    weights = [p.clone() for p in model.parameters()]
    condition_batchnorm(model, batches)

    hidden = model[0](data).detach()
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0))
    # per-batch unbiased variances, averaged over the equally sized batches
    expected_var = torch.stack([h.var(0) for h in hidden.split(16)]).mean(0)
    torch.testing.assert_close(model[1].running_var, expected_var)
    assert model[1].momentum == 0.1
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_condition_batchnorm_without_batches_is_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="no batches"):
        condition_batchnorm(model, [])


def test_novelty_of_an_exact_copy_is_zero_and_prompts_exclude_themselves():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(30, 6, 5, generator=generator)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[-1, 3:] = False
    copy = reference[7:8].clone()
    copy[0, -1, 3:] = 123.0  # differences in padding do not count
    new = torch.randn(1, 6, 5, generator=generator) * 10
    report = novelty_report(
        torch.cat([copy, new]), reference.split(8), mask, prompt_tokens=reference[:3]
    )

    assert report.sample_distances[0].item() == 0.0
    assert report.sample_nearest[0].item() == 7
    assert report.sample_distances[1] > 10
    # a prompt's nearest neighbour is another model, not itself
    values = reference[:, mask].double()
    expected = torch.cdist(values[:3], values)
    expected[torch.arange(3), torch.arange(3)] = float("inf")
    torch.testing.assert_close(report.prompt_distances, expected.min(1).values)
    assert "samples" in report.summary() and "prompts" in report.summary()


def test_nearest_neighbor_distances_rejects_layout_mismatch():
    with pytest.raises(ValueError, match="share one layout"):
        nearest_neighbor_distances(torch.zeros(1, 2, 3), torch.zeros(4, 3, 3))
