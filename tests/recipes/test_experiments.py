"""Experiment stages: aligning foreign prompts to a zoo, sampling results and their table."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from sane_hf.downstream.evaluation import SampleEvaluation
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.recipes.experiments import ExperimentSpec, build_dataset_stage, pretrain_stage
from sane_hf.recipes.sampling import (
    SamplingResults,
    aligned_to_zoo,
    prompt_networks,
    zoo_reference_network,
)
from sane_hf.recipes.settings import SamplingMethod
from sane_hf.utils.config import preset_names
from sane_hf.weights.alignment import PermutationSpec, apply_permutation, random_permutation
from synthetic_zoo import TOKENSIZE, write_raw_zoo


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    raw = write_raw_zoo(root / "raw", num_models=10)
    build_dataset_stage(raw, root / "dataset", tokensize=TOKENSIZE, progress=False)
    assert not (root / "dataset.partial").exists()
    return root / "dataset"


@pytest.fixture(scope="module")
def zoo(dataset_dir):
    return build_dataset_stage("unused: the dataset is finished", dataset_dir)


def test_build_dataset_stage_loads_a_finished_dataset_instead_of_rebuilding(zoo, dataset_dir):
    tokens = zoo.splits["test"].with_format("numpy")["tokens"]
    assert zoo.metadata.split["models"]["test"] == sorted(set(zoo.splits["test"]["model_id"]))
    reloaded = build_dataset_stage("/no/raw/zoo/here", dataset_dir)
    assert np.array_equal(reloaded.splits["test"].with_format("numpy")["tokens"], tokens)


def test_a_permuted_reference_is_aligned_back_onto_the_reference(zoo):
    reference = zoo_reference_network(zoo)
    alignment = zoo.metadata.alignment
    assert alignment["aligned"]
    spec = PermutationSpec.from_model(reference)
    generator = torch.Generator().manual_seed(0)
    permuted = copy.deepcopy(reference)
    permuted.load_state_dict(
        apply_permutation(reference.state_dict(), spec, random_permutation(spec, generator))
    )
    inputs = torch.randn(5, 64)
    assert not torch.equal(permuted.state_dict()["1.weight"], reference.state_dict()["1.weight"])

    (aligned,) = aligned_to_zoo([permuted], zoo)

    for name, value in reference.state_dict().items():
        assert torch.allclose(aligned.state_dict()[name], value), name
    assert torch.allclose(aligned(inputs), permuted(inputs), atol=1e-6)


def test_prompt_networks_decode_rows_with_their_own_hyperparameters(zoo):
    split = zoo.splits["train"]
    activations = [split[row]["hyperparameters"]["activation"] for row in (0, 5)]
    networks = prompt_networks(zoo, [0, 5])
    assert [type(network[2]).__name__.lower() for network in networks] == activations
    decoded = zoo.metadata.decode(split.with_format("torch")[5]["tokens"])
    for name, value in decoded.items():
        assert torch.equal(networks[1].state_dict()[name], value), name


def sampling_results() -> SamplingResults:
    accuracy = {
        "SANE kde (shared)": np.array([[0.8, 0.9], [0.6, 0.7]]),
        "from scratch": np.array([[0.1, 0.5], [0.1, 0.3]]),
    }
    novelty = {"SANE kde (shared)": {"relative": 0.25}}
    return SamplingResults(SampleEvaluation([0, 1], accuracy), novelty)


def test_sampling_results_round_trip_and_table():
    results = sampling_results()
    restored = SamplingResults.from_dict(results.to_dict())
    assert restored.novelty == results.novelty
    for group, values in results.evaluation.accuracy.items():
        assert np.array_equal(restored.evaluation.accuracy[group], values)

    lines = results.table().splitlines()
    assert lines[2].split() == [
        *("SANE", "kde", "(shared)", "2"),
        *("70.0", "±", "10.0", "80.0", "±", "10.0", "-", "0.25", "-"),
    ]  # results without per-network novelty: only the relative distance is known
    assert lines[3].endswith("-")  # from-scratch networks are not sampled: no novelty
    assert "epoch 1" not in results.table(epochs=[0])
    with pytest.raises(ValueError, match="epochs \\[5\\] were not evaluated"):
        results.table(epochs=[5])


def test_sampling_method_names_and_validation():
    assert SamplingMethod("subsampled", "joint").name == "SANE subsampled (joint)"
    assert SamplingMethod("prior").name == "SANE prior"
    with pytest.raises(ValueError, match="sampling kind"):
        SamplingMethod("mcmc")


def test_pretrain_stage_refuses_a_folder_trained_with_another_config(tmp_path):
    saved = PretrainingConfig.from_dict({"dataset": "zoo", "output_dir": str(tmp_path)})
    saved.save(tmp_path / "pretraining_config.yaml")
    moved = dataclasses.replace(saved, dataset="elsewhere/zoo", resume_from_checkpoint="latest")
    changed = dataclasses.replace(saved, learning_rate=3e-3, model={"preset": "cnn"})
    with pytest.raises(ValueError, match=r"fields \['learning_rate', 'model'\] differ"):
        pretrain_stage(changed)
    with pytest.raises(FileNotFoundError):  # same config: on to training, which needs the zoo
        pretrain_stage(moved)


@pytest.mark.parametrize("name", preset_names("experiment"))
def test_every_experiment_preset_loads_with_its_sampling_runs(name):
    spec = ExperimentSpec.load(name)
    assert spec.sampling_runs or spec.probing is not None  # it measures something
    for run in spec.sampling_runs:
        settings = spec.run_settings(run)
        assert all(getattr(settings, key) == value for key, value in run.changes.items())


def test_a_sampling_run_with_a_bad_change_is_refused_when_the_spec_is_loaded():
    run = {"name": "modes", "methods": [{"kind": "kde"}], "changes": {"num_sample": 3}}
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['num_sample'\] in sampling run 'modes'"
    ):
        ExperimentSpec.from_dict({"sampling_runs": [run]})
    with pytest.raises(ValueError, match="epoch_range must be"):
        ExperimentSpec.from_dict({"dataset": {"epoch_range": [5, 1]}})


def test_new_task_shares_the_mnist_stages_it_samples_with():
    for scale in ("cpu", "gpu"):
        mnist, new_task = (
            ExperimentSpec.load(f"mnist-{scale}"),
            ExperimentSpec.load(f"new_task-{scale}"),
        )
        assert (new_task.zoo, new_task.dataset) == (mnist.zoo, mnist.dataset)
        assert new_task.pretraining == mnist.pretraining  # its SANE is the mnist experiment's
        assert new_task.probing is None and new_task.prompt_zoo.dataset == "digits"
