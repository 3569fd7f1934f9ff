"""Memorization baselines (noise, ensemble) and per-network novelty in the sampling evaluation."""

import numpy as np
import pytest
import torch

from sane_hf.downstream.baselines import (
    MemorizationBaselines,
    ensemble_tokens,
    noise_tokens,
    prompt_pairs,
)
from sane_hf.downstream.evaluation import (
    SampleEvaluation,
    accuracy,
    evaluate_samples,
    load_task_dataset,
    scratch_models,
)
from sane_hf.downstream.novelty import (
    misclassified,
    misprediction_iou,
    nearest_neighbor_distances,
    split_token_chunks,
)
from sane_hf.downstream.sampling import SaneSampler, select_prompts
from sane_hf.zoo.metadata import zoo_metadata
from synthetic_zoo import template as synthetic_template


def test_noise_of_norm_zero_is_the_prompt_and_otherwise_exactly_the_distance():
    prompts = torch.randn(3, 4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[3, 2:] = False
    prompts[:, ~mask] = 0
    indices = torch.tensor([2, 0, 2])
    same = noise_tokens(prompts, mask, 0.0, indices, torch.Generator().manual_seed(0))
    assert torch.equal(same, prompts[indices])
    noisy = noise_tokens(prompts, mask, 1.5, indices, torch.Generator().manual_seed(0))
    distances = (noisy - prompts[indices]).flatten(1).norm(dim=1)
    torch.testing.assert_close(distances, torch.full((3,), 1.5))
    assert not noisy[:, ~mask].any()  # padding stays padding
    assert not torch.equal(noisy[0], noisy[2])  # same prompt, independent noise
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="distance must be >= 0"):
            noise_tokens(prompts, mask, bad, indices)


def test_ensemble_of_a_network_with_itself_is_that_network_and_pairs_differ():
    prompts = torch.randn(4, 3, 2)
    torch.testing.assert_close(ensemble_tokens(prompts, torch.tensor([[1, 1]])), prompts[1:2])
    torch.testing.assert_close(
        ensemble_tokens(prompts, torch.tensor([[0, 3]]))[0], (prompts[0] + prompts[3]) / 2
    )
    pairs = prompt_pairs(4, 200, torch.Generator().manual_seed(0))
    assert (pairs[:, 0] != pairs[:, 1]).all() and set(pairs.flatten().tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="at least 2 prompts"):
        prompt_pairs(1, 3)


def test_misprediction_iou():
    wrong = torch.tensor(
        [
            [1, 1, 0, 0],  # query 0: the same mistakes as reference 0
            [0, 1, 1, 0],  # query 1: IoU 1/3 with reference 0, 1/2 with reference 1
            [0, 0, 0, 0],  # query 2: no mistakes, like reference 2
        ],
        dtype=torch.bool,
    )
    reference = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    iou, index = misprediction_iou(wrong, reference)
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64))
    assert index.tolist() == [0, 1, 2]
    iou, _ = misprediction_iou(wrong[:1], reference, exclude_identical=True)
    assert iou.item() == pytest.approx(0.0)  # without itself: nothing overlaps
    with pytest.raises(ValueError, match="same examples"):
        misprediction_iou(wrong, reference[:, :3])


def test_misclassified_matches_each_network_on_its_own():
    task = load_task_dataset({"dataset": "digits", "input_shape": [1, 8, 8]})
    networks = scratch_models(synthetic_template(), 3, init="uniform", seed=0)
    networks += scratch_models(synthetic_template("relu"), 2, init="uniform", seed=1)
    inputs, labels = task.test
    wrong = misclassified(networks, inputs, labels, batch_size=50, networks_per_pass=2)
    assert wrong.shape == (5, len(labels))
    for network, row in zip(networks, wrong):
        assert 1 - row.double().mean().item() == pytest.approx(accuracy(network, inputs, labels))


@pytest.fixture(scope="module")
def sampler(zoo, synthetic_sane):
    return SaneSampler.from_zoo(
        synthetic_sane, zoo_metadata(zoo), hyperparameters={"activation": "tanh"}, window=8, halo=4
    )


@pytest.fixture(scope="module")
def prompt_tokens(zoo):
    rows = select_prompts(zoo["train"], 4, metric="train_acc")
    return zoo["train"].with_format("torch", columns=["tokens"])[rows]["tokens"]


def _baselines(zoo, sampler, prompt_tokens, **kwargs):
    return MemorizationBaselines(
        sampler, prompt_tokens, lambda: split_token_chunks(zoo["train"], chunk_size=16), **kwargs
    )


def test_zero_noise_reproduces_the_prompts_accuracy_and_is_no_novelty(zoo, sampler, prompt_tokens):
    task = load_task_dataset({"dataset": "digits", "input_shape": [1, 8, 8]})
    baselines = _baselines(zoo, sampler, prompt_tokens, noise_levels=(0.0,), num_networks=3)
    indices = torch.tensor([3, 1, 1])
    noisy = baselines.noise(0.0, indices)
    prompts = sampler.build(prompt_tokens)
    for network, index in zip(noisy.models, indices.tolist()):
        assert accuracy(network, *task.test) == accuracy(prompts[index], *task.test)
    assert baselines.scale > 0
    samples = sampler.sample(prompt_tokens, 3, generator=torch.Generator().manual_seed(0))
    built = baselines.groups({"SANE": samples})
    assert list(built.groups)[:2] == ["SANE", built.matched["SANE"]]
    novelty = baselines.novelty(built, *task.test)
    zero_noise = "noise 0x prompt distance"
    np.testing.assert_array_equal(novelty[zero_noise]["distance"], 0.0)  # prompts are training nets
    np.testing.assert_array_equal(novelty[zero_noise]["iou"], 1.0)
    assert (novelty["ensemble of 2 prompts"]["distance"] > 0).all()
    # matched noise sits at the SANE samples' median distance from the prompts they came from
    distance, _ = nearest_neighbor_distances(samples.tokens, prompt_tokens, sampler.mask)
    matched = built.tokens[built.matched["SANE"]]
    own_prompt = prompt_tokens[samples.prompt_indices[:, 0]]
    offsets = (matched - own_prompt)[:, sampler.mask].norm(dim=1)
    torch.testing.assert_close(offsets, torch.full((3,), float(distance.median())))


def test_evaluate_samples_with_baselines_tables_the_matched_noise_next_to_sane(
    zoo, sampler, prompt_tokens, tmp_path
):
    task = load_task_dataset({"dataset": "digits", "input_shape": [1, 8, 8]})
    samples = sampler.sample(prompt_tokens, 2, generator=torch.Generator().manual_seed(1))
    baselines = _baselines(zoo, sampler, prompt_tokens, noise_levels=(0.5,), num_networks=2)
    groups = {"SANE": samples, "from scratch": scratch_models(synthetic_template(), 2)}
    evaluation = evaluate_samples(
        groups, task, epochs=1, lr=1e-2, batch_size=64, progress=False, baselines=baselines
    )
    names = list(evaluation.accuracy)
    matched = evaluation.matched["SANE"]
    assert names[:2] == ["SANE", matched] and "from scratch" in names
    assert "ensemble of 2 prompts" in names and "noise 0.5x prompt distance" in names
    assert evaluation.roles == {
        "SANE": "samples",
        matched: "noise",
        "noise 0.5x prompt distance": "noise",
        "ensemble of 2 prompts": "ensemble",
    }
    lines = evaluation.table().splitlines()
    sane_row = next(i for i, line in enumerate(lines) if line.startswith("SANE "))
    assert lines[sane_row + 1].startswith(matched) and "IoU" in lines[0]
    assert lines[-1].startswith("from scratch") and lines[-1].rstrip().endswith("-")
    evaluation.plot_novelty(tmp_path / "novelty.png")
    assert (tmp_path / "novelty.png").stat().st_size > 0
    again = SampleEvaluation.from_dict(evaluation.to_dict())
    assert again.table() == evaluation.table()


def test_one_prompt_gets_matched_noise_but_no_curve_or_ensemble(zoo, sampler, prompt_tokens):
    baselines = _baselines(zoo, sampler, prompt_tokens[:1], num_networks=2)
    samples = sampler.sample(prompt_tokens[:1], 2, generator=torch.Generator().manual_seed(0))
    built = baselines.groups({"SANE": samples})
    assert list(built.groups) == ["SANE", "noise matched to SANE"]
    assert torch.isfinite(built.tokens["noise matched to SANE"]).all()


def test_selected_samples_get_matched_noise_selected_the_same_way(zoo, sampler, prompt_tokens):
    task = load_task_dataset({"dataset": "digits", "input_shape": [1, 8, 8]})
    inputs, labels = task.train

    def score(network):
        return accuracy(network, inputs[:200], labels[:200])

    samples = sampler.subsample(
        prompt_tokens, 2, 6, score, generator=torch.Generator().manual_seed(0)
    )
    baselines = _baselines(
        zoo,
        sampler,
        prompt_tokens,
        noise_levels=(),
        num_networks=2,
        score_fn=score,
        num_candidates=6,
        selection_rounds={"SANE": 1},
    )
    built = baselines.groups({"SANE": samples})
    unselected, selected = built.matched["SANE"], built.selected["SANE"]
    assert list(built.groups)[:3] == ["SANE", unselected, selected]
    assert selected == "noise matched to SANE, selected"
    # the same distance from the prompts as the unselected noise, ranked by the same score
    own = nearest_neighbor_distances(built.tokens[selected], prompt_tokens, sampler.mask)[0]
    other = nearest_neighbor_distances(built.tokens[unselected], prompt_tokens, sampler.mask)[0]
    torch.testing.assert_close(own.median(), other.median(), rtol=1e-4, atol=1e-4)
    # the kept noisy networks are the two best of the six candidates under the score
    generator = torch.Generator().manual_seed(3000)
    indices = torch.randint(len(prompt_tokens), (6,), generator=generator)
    distance = baselines.matched_distance(samples)
    tokens = noise_tokens(prompt_tokens, sampler.mask, distance, indices, generator)
    scores = sorted(score(m) for m in sampler.build(tokens))
    assert sorted(score(m) for m in built.groups[selected]) == pytest.approx(scores[-2:])
    with pytest.raises(ValueError, match="num_candidates >= num_networks"):
        _baselines(zoo, sampler, prompt_tokens, num_networks=3, score_fn=score).selected_noise(
            1.0, 1
        )
