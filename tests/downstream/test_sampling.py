import copy
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sane_hf import build_model
from sane_hf.cli import main
from sane_hf.downstream.evaluation import (
    accuracy,
    accuracy_score,
    evaluate_samples,
    load_task_dataset,
    random_batches,
    scratch_models,
)
from sane_hf.downstream.novelty import (
    model_groups,
    nearest_neighbor_distances,
    novelty_report,
    split_token_chunks,
)
from sane_hf.downstream.sampling import (
    SaneSampler,
    condition_batchnorm,
    draw_latents,
    gaussian_prior_latents,
    select_prompts,
)
from sane_hf.weights.alignment import PermutationSpec, apply_permutation, random_permutation
from sane_hf.zoo.dataset import build_zoo_dataset
from sane_hf.zoo.metadata import zoo_metadata
from sane_hf.zoo.population import data_order
from sane_hf.zoo.storage import save_zoo_dataset
from sane_hf.zoo.tasks import dataset_from_tensors
from sane_hf.zoo.training import fine_tune_population
from synthetic_zoo import TOKENSIZE, write_raw_zoo
from synthetic_zoo import template as synthetic_template


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


@pytest.fixture(scope="module")
def sampler(zoo, sane):
    return SaneSampler.from_zoo(sane, zoo_metadata(zoo), window=8, halo=4)


@pytest.fixture(scope="module")
def prompt_tokens(zoo):
    rows = select_prompts(zoo["train"], 3, metric="train_acc")
    return zoo["train"].with_format("torch", columns=["tokens"])[rows]["tokens"]


def test_samples_load_strictly_into_the_network_and_run(sampler, prompt_tokens):
    samples = sampler.sample(prompt_tokens, 4, generator=torch.Generator().manual_seed(0))
    assert len(samples) == 4 and samples.tokens.shape == (4, *prompt_tokens.shape[1:])
    inputs = torch.randn(5, 1, 8, 8)
    for network, state_dict in zip(samples.models, samples.state_dicts):
        synthetic_template().load_state_dict(state_dict, strict=True)
        assert torch.isfinite(network(inputs)).all()
    assert not samples.tokens[:, ~sampler.mask].any()  # padding is zeroed


@pytest.mark.parametrize("mode", ["shared", "joint"])
def test_zero_bandwidth_sampling_reproduces_the_prompt_autoencoded(sampler, prompt_tokens, mode):
    samples = sampler.sample(
        prompt_tokens, 5, mode=mode, bandwidth=0.0, generator=torch.Generator().manual_seed(1)
    )
    reconstructed = sampler.decode(sampler.encode(prompt_tokens))
    chosen = samples.prompt_indices[:, 0]
    torch.testing.assert_close(samples.tokens, reconstructed[chosen])
    # ... and the networks hold exactly those tokens, de-normalized
    metadata_weights = sampler.normalization.denormalize_tokens(reconstructed, sampler.layout)
    expected = sampler.tokenizer.decode(metadata_weights[chosen[0]], sampler.layout)
    for key, value in samples.models[0].state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_seeded_sampling_is_reproducible(sampler, prompt_tokens):
    first = sampler.sample(
        prompt_tokens, 3, mode="token", generator=torch.Generator().manual_seed(2)
    )
    second = sampler.sample(
        prompt_tokens, 3, mode="token", generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(first.tokens, second.tokens)


def test_subsampling_keeps_the_best_candidates(sampler, prompt_tokens):
    seen = []

    def score(network):  # any deterministic function of the weights
        seen.append(network[1].weight.sum().item())
        return seen[-1]

    best = sampler.subsample(
        prompt_tokens, 3, 8, score, bandwidth=0.5, generator=torch.Generator().manual_seed(3)
    )
    assert len(seen) == 8 and len(best) == 3
    assert best.scores.tolist() == pytest.approx(sorted(seen, reverse=True)[:3])
    assert [score(network) for network in best.models] == pytest.approx(best.scores.tolist())


def test_bootstrapping_from_the_gaussian_prior_never_loses_its_best(sampler):
    def score(network):
        return -network[1].weight.abs().mean().item()

    generator = torch.Generator().manual_seed(4)
    first = sampler.bootstrap(None, 2, 6, score, rounds=1, prior_sigma=1.0, generator=generator)
    generator = torch.Generator().manual_seed(4)
    more = sampler.bootstrap(None, 2, 6, score, rounds=3, prior_sigma=1.0, generator=generator)
    assert first.prompt_indices is None and more.prompt_indices is None
    # the same first round, then the kept models compete with the new candidates
    assert (more.scores >= first.scores).all()
    assert more.scores.tolist() == pytest.approx([score(net) for net in more.models])


def test_sampling_a_wider_variant_with_another_number_of_classes(zoo, sane):
    metadata = zoo_metadata(zoo)
    with pytest.warns(UserWarning, match="row index up to 11"):
        wide = SaneSampler.from_zoo(
            sane, metadata, architecture_kwargs={"hidden": [12], "num_classes": 4}, window=8, halo=4
        )
    samples = wide.bootstrap(
        None, 2, 3, lambda net: 0.0, rounds=1, generator=torch.Generator().manual_seed(0)
    )
    assert samples.models[0][1].weight.shape == (12, 64)
    assert samples.models[0](torch.randn(2, 1, 8, 8)).shape == (2, 4)
    prompts = [synthetic_template()]
    with pytest.raises(ValueError, match="prompts must have the target architecture"):
        wide.prompt_tokens(prompts)


def test_target_layers_beyond_the_position_tables_are_a_clear_error(zoo, sane):
    too_deep = build_model("mlp", in_features=64, hidden=[2] * 70, num_classes=10)
    with pytest.raises(ValueError, match=r"does not fit SANE's position tables.*layer position"):
        SaneSampler(sane, too_deep, zoo_metadata(zoo).normalization)
    deeper = build_model("mlp", in_features=64, hidden=[6, 6], num_classes=10)
    with pytest.raises(ValueError, match="normalization statistics do not cover"):
        SaneSampler(sane, deeper, zoo_metadata(zoo).normalization)


def test_novelty_of_zoo_members_is_zero_and_prompts_skip_their_own_model(
    zoo, sampler, prompt_tokens
):
    train = zoo["train"]
    samples = sampler.sample(prompt_tokens, 2, generator=torch.Generator().manual_seed(5))
    rows = select_prompts(train, 3, metric="train_acc")
    groups = model_groups(train)
    report = novelty_report(
        torch.cat([prompt_tokens[:2], samples.tokens]),
        split_token_chunks(train, chunk_size=16),
        sampler.mask,
        prompt_tokens,
        prompt_groups=groups[rows],
        reference_groups=groups,
    )
    assert report.sample_distances[:2].tolist() == [0.0, 0.0]  # copies of training models
    assert (report.sample_distances[2:] > 0).all()

    everything = train.with_format("torch", columns=["tokens"])[:]["tokens"][:, sampler.mask]
    distances = torch.cdist(prompt_tokens[:, sampler.mask].double(), everything.double())
    distances[groups[rows][:, None] == groups[None, :]] = float("inf")  # other epochs too
    torch.testing.assert_close(report.prompt_distances, distances.min(1).values)
    identity_only = novelty_report(
        samples.tokens, split_token_chunks(train), sampler.mask, prompt_tokens
    )
    assert (identity_only.prompt_distances <= report.prompt_distances).all()


def test_select_prompts_takes_the_best_of_one_epoch(zoo):
    split = zoo["train"]
    rows = select_prompts(split, 4, epoch=3, metric="train_acc")
    chosen = split.select(rows)
    assert set(chosen["epoch"]) == {3}
    others = [r["train_acc"] for r in split if r["epoch"] == 3 and r["train_acc"] is not None]
    assert sorted(chosen["train_acc"], reverse=True) == sorted(others, reverse=True)[:4]
    with pytest.raises(ValueError, match="missing values"):
        select_prompts(split, 4, metric="val_acc")


def test_cli_sample_writes_networks_novelty_and_evaluation(zoo, sane, tmp_path, capsys):
    sane.save_pretrained(tmp_path / "sane")
    save_zoo_dataset(zoo, tmp_path / "zoo")
    output = tmp_path / "out"
    argv = ["sample", "--model", str(tmp_path / "sane"), "--dataset", str(tmp_path / "zoo")]
    argv += ["--output-dir", str(output), "--num-samples", "2", "--num-candidates", "3"]
    argv += ["--num-prompts", "3", "--prompt-metric", "train_acc", "--finetune-epochs", "1"]
    argv += ["--window", "8", "--halo", "4", "--score-samples", "50"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "from scratch" in printed and "IoU" in printed  # novelty columns
    assert "noise matched to SANE" in printed and "ensemble of 2 prompts" in printed
    results = json.loads((output / "sampling.json").read_text())
    assert results["evaluation"]["epochs"] == [0, 1]
    groups = ["SANE kde (shared)", "SANE subsampled (shared)", "from scratch"]
    assert set(groups) <= set(results["evaluation"]["accuracy"])
    assert any("noise matched to SANE" in name for name in results["evaluation"]["accuracy"])
    assert set(results["novelty"]) == set(groups[:2])  # the same numbers as the demo's
    for method in ("sane-kde-shared", "sane-subsampled-shared"):
        files = sorted((output / "samples" / method).iterdir())
        assert len(files) == 2
        synthetic_template().load_state_dict(load_file(files[0]), strict=True)
    assert (output / "sampling.png").stat().st_size > 0
    assert (output / "novelty.png").stat().st_size > 0


def test_cli_sample_with_more_prompts_than_the_zoo_has_uses_all_and_says_so(
    zoo, sane, tmp_path, capsys
):
    sane.save_pretrained(tmp_path / "sane")
    save_zoo_dataset(zoo, tmp_path / "zoo")
    available = sum(1 for epoch in zoo["train"]["epoch"] if epoch == max(zoo["train"]["epoch"]))
    argv = ["sample", "--model", str(tmp_path / "sane"), "--dataset", str(tmp_path / "zoo")]
    argv += ["--output-dir", str(tmp_path / "out"), "--num-samples", "1", "--methods", "kde"]
    argv += ["--prompt-metric", "train_acc", "--finetune-epochs", "0", "--num-prompts", "500"]
    assert main(argv) == 0
    assert f"500 prompts asked for, the train split has {available}" in capsys.readouterr().out


def write_permuted_copy(raw_zoo, root):
    """The raw zoo with every checkpoint's hidden units in another (random) order."""
    shutil.copytree(raw_zoo, root)
    spec = PermutationSpec.from_model(synthetic_template())
    generator = torch.Generator().manual_seed(0)
    for file in sorted((root / "checkpoints").iterdir()):
        permutation = random_permutation(spec, generator)
        save_file(apply_permutation(load_file(file), spec, permutation), file)
    return root


def test_cli_sample_aligns_prompts_from_another_zoo_to_the_training_zoo(sane, tmp_path):
    raw = write_raw_zoo(tmp_path / "raw", num_models=10)
    save_zoo_dataset(build_zoo_dataset(raw, tokensize=TOKENSIZE, progress=False), tmp_path / "zoo")
    permuted = write_permuted_copy(raw, tmp_path / "raw_permuted")
    foreign = build_zoo_dataset(permuted, tokensize=TOKENSIZE, align=False, progress=False)
    save_zoo_dataset(foreign, tmp_path / "foreign")
    sane.save_pretrained(tmp_path / "sane")

    def sample(output_dir, *prompt_dataset):
        argv = ["sample", "--model", str(tmp_path / "sane"), "--dataset", str(tmp_path / "zoo")]
        argv += ["--output-dir", str(output_dir), "--num-samples", "3", "--bandwidth", "0"]
        argv += ["--num-prompts", "2", "--prompt-metric", "train_acc", "--finetune-epochs", "0"]
        argv += ["--methods", "kde"]
        assert main([*argv, *prompt_dataset]) == 0
        folder = output_dir / "samples" / "sane-kde-shared"
        return [load_file(file) for file in sorted(folder.iterdir())]

    # The same networks in another unit order, from a zoo normalized with its own statistics,
    # are aligned to the training zoo's reference: the same prompts as the zoo's own rows.
    own = sample(tmp_path / "own")
    from_foreign = sample(tmp_path / "foreign_out", "--prompt-dataset", str(tmp_path / "foreign"))
    for expected, actual in zip(own, from_foreign, strict=True):
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5)


def test_evaluate_samples_fine_tunes_copies_and_reports_table3(tmp_path):
    task = load_task_dataset({"dataset": "digits", "input_shape": [1, 8, 8]})
    scratch = scratch_models(synthetic_template(), 2, init="uniform", seed=0)
    before = [network.state_dict()["1.weight"].clone() for network in scratch]
    evaluation = evaluate_samples(
        {"from scratch": scratch}, task, epochs=2, lr=1e-2, batch_size=32, progress=False
    )
    accuracy = evaluation.accuracy["from scratch"]
    assert accuracy.shape == (2, 3) and evaluation.epochs == [0, 1, 2]
    assert accuracy[:, 2].mean() > accuracy[:, 0].mean() + 0.3  # 10 classes: chance is 0.1
    for network, weight in zip(scratch, before):
        assert torch.equal(network.state_dict()["1.weight"], weight)  # copies were trained
    table = evaluation.table([0, 2])
    assert "epoch 0" in table and "epoch 2" in table and "from scratch" in table
    evaluation.plot(tmp_path / "evaluation.png")
    assert (tmp_path / "evaluation.png").stat().st_size > 0
    with pytest.raises(ValueError, match="not evaluated"):
        evaluation.table([5])


class ConstantClassifier(nn.Module):
    """Predicts class 0 for every input."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0] + [0.0] * 9))

    def forward(self, inputs):
        return self.bias.expand(len(inputs), -1)


def test_candidate_scores_and_batches_come_from_all_classes():
    labels = torch.arange(10).repeat_interleave(60)
    task = dataset_from_tensors(torch.randn(600, 4), labels)
    x, y = task.train
    order = torch.argsort(y, stable=True)  # a user's split may well be ordered by class
    task = dataclasses.replace(task, train=(x[order], y[order]))
    assert (task.train[1][:42] == 0).all()
    score = accuracy_score(task, num_samples=300)
    assert score(ConstantClassifier()) == pytest.approx(0.1, abs=0.05)
    batches = random_batches(task, num_batches=3, batch_size=50)
    assert [len(batch) for batch in batches] == [50, 50, 50]
    first_rows = {tuple(x.tolist()) for x in task.train[0][:150]}
    assert sum(tuple(x.tolist()) in first_rows for x in torch.cat(batches)) < 100


def test_evaluate_samples_matches_fine_tuning_each_network_alone():
    """Networks of two structures (tanh and relu) are fine-tuned as two vmapped populations;
    each must end where a plain torch.optim loop on the same batches ends."""
    task = load_task_dataset({"dataset": "digits", "input_shape": [1, 8, 8]})

    def mlp(activation):
        return build_model("mlp", in_features=64, hidden=[16], activation=activation)

    groups = {
        "tanh": scratch_models(mlp("tanh"), 2, seed=0),
        "relu": scratch_models(mlp("relu"), 1, seed=1),
    }
    evaluation = evaluate_samples(
        groups, task, epochs=1, lr=1e-2, batch_size=64, seed=3, progress=False
    )
    x, y = task.train
    for group, networks in groups.items():
        for index, network in enumerate(networks):
            alone = copy.deepcopy(network)
            optimizer = torch.optim.Adam(alone.parameters(), lr=1e-2)
            before = accuracy(alone, *task.test)
            alone.train()
            for batch in torch.from_numpy(data_order(3 + index, 1, len(y))).split(64):
                optimizer.zero_grad()
                F.cross_entropy(alone(x[batch]), y[batch]).backward()
                optimizer.step()
            expected = [before, accuracy(alone, *task.test)]
            tolerance = 1.5 / len(task.test[1])  # one test sample may flip on rounding
            assert evaluation.accuracy[group][index] == pytest.approx(expected, abs=tolerance)
    assert evaluation.accuracy["tanh"][:, 1].mean() > evaluation.accuracy["tanh"][:, 0].mean()


def test_fine_tune_population_refuses_networks_of_different_structures():
    task = load_task_dataset({"dataset": "digits", "input_shape": [1, 8, 8]})
    networks = [
        build_model("mlp", in_features=64, hidden=[16]),
        build_model("mlp", in_features=64, hidden=[8]),
    ]
    with pytest.raises(ValueError, match="network 1 differs"):
        fine_tune_population(networks, task, 1, seeds=[0, 1], progress=False)
    with pytest.raises(ValueError, match="2 seeds for 1 networks"):
        fine_tune_population(networks[:1], task, 1, seeds=[0, 1], progress=False)
