"""Zoo datasets: by-model split, training-only normalization, alignment, save/load and Hub round trips."""

import json
import random
import shutil

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sane_hf import WeightTokenizer, build_model
from sane_hf.cli import main
from sane_hf.hub import push_zoo_dataset
from sane_hf.weights.normalization import NormalizationStats
from sane_hf.zoo.card import build_zoo_dataset_card
from sane_hf.zoo.dataset import build_zoo_dataset, split_models
from sane_hf.zoo.formats import (
    checkpoint_file_name,
    write_checkpoint,
    write_zoo_info,
    write_zoo_metadata,
)
from sane_hf.zoo.metadata import zoo_metadata
from sane_hf.zoo.statistics import zoo_statistics
from sane_hf.zoo.storage import load_zoo_dataset, save_zoo_dataset

NUM_MODELS = 8
EPOCHS = (0, 1, 2)
HYPERPARAMETERS = {"activation": "tanh", "dropout": 0.0, "init": "uniform", "lr": 3e-4}


def checkpoint(model: int, epoch: int) -> dict[str, torch.Tensor]:
    """A CNN-s with random weights that drift per epoch, like a short training run."""
    torch.manual_seed(model)
    state_dict = build_model("cnn_s").state_dict()
    generator = torch.Generator().manual_seed(100 * model + epoch)
    return {
        key: value + 0.02 * epoch * torch.randn(value.shape, generator=generator)
        for key, value in state_dict.items()
    }


def write_raw_zoo(root) -> None:
    zoo = {"architecture": "cnn_s", "architecture_kwargs": {}, "dataset": "mnist", "kind": "seed"}
    write_zoo_info(root, zoo | {"epochs": list(EPOCHS)})
    lines = []
    for model in range(NUM_MODELS):
        for epoch in EPOCHS:
            file = write_checkpoint(root, f"model_{model:04d}", epoch, checkpoint(model, epoch))
            train_acc, test_acc = (
                0.3 + 0.2 * epoch + 0.01 * model,
                0.25 + 0.2 * epoch + 0.02 * model,
            )
            lines.append(
                {"file": file, "model_id": f"model_{model:04d}", "epoch": epoch, "seed": model,
                 "train_loss": 2.0 - epoch, "train_acc": train_acc, "val_loss": None,
                 "val_acc": None, "test_loss": 2.1 - epoch, "test_acc": test_acc,
                 "ggap": train_acc - test_acc, "hyperparameters": HYPERPARAMETERS}
            )  # fmt: skip
    write_zoo_metadata(root, lines)


@pytest.fixture(scope="module")
def raw_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "raw"
    write_raw_zoo(root)
    return root


@pytest.fixture(scope="module")
def built(raw_zoo):
    return build_zoo_dataset(raw_zoo, progress=False)


def copy_zoo(raw_zoo, destination):
    shutil.copytree(raw_zoo, destination)
    return destination


def test_split_models_is_by_model_seeded_and_independent_of_order():
    ids = [f"model_{i:02d}" for i in range(20)]
    split = split_models(ids, seed=3)
    assert split == split_models(reversed(ids), seed=3)
    assert [len(split[name]) for name in ("train", "validation", "test")] == [14, 3, 3]
    assert sorted(split["train"] + split["validation"] + split["test"]) == ids
    assert split != split_models(ids, seed=4)
    with pytest.raises(ValueError, match="summing to 1"):
        split_models(ids, fractions=(0.8, 0.15, 0.15))


def test_dataset_keeps_models_in_one_split_whatever_the_metadata_order(built, raw_zoo, tmp_path):
    model_sets = {name: set(split["model_id"]) for name, split in built.splits.items()}
    assert sum(len(ids) for ids in model_sets.values()) == NUM_MODELS
    assert set.union(*model_sets.values()) == {f"model_{i:04d}" for i in range(NUM_MODELS)}
    for split in built.splits.values():
        assert len(split) == len(EPOCHS) * len(set(split["model_id"]))  # all epochs of a model

    shuffled = copy_zoo(raw_zoo, tmp_path / "shuffled")
    lines = (shuffled / "metadata.jsonl").read_text().splitlines()
    random.Random(0).shuffle(lines)
    (shuffled / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    rebuilt = build_zoo_dataset(shuffled, progress=False)
    for name in built.splits:
        assert rebuilt.splits[name].data.table.equals(built.splits[name].data.table)
    assert zoo_metadata(rebuilt).to_dict() == zoo_metadata(built).to_dict()


def test_denormalize_inverts_normalize_on_state_dicts_and_tokens():
    state_dicts = [checkpoint(model, 2) for model in range(4)]
    stats = NormalizationStats.from_state_dicts(state_dicts, keys=list(state_dicts[0]))
    stacked = torch.cat([sd["12.weight"].flatten() for sd in state_dicts])
    assert stats.mean["12.weight"] == pytest.approx(stacked.double().mean().item())
    assert stats.std["12.weight"] == pytest.approx(stacked.double().std(unbiased=False).item())
    assert NormalizationStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats

    weights = state_dicts[0]
    normalized = stats.normalize(weights)
    assert abs(normalized["0.weight"].mean().item()) < 0.5
    for key, value in stats.denormalize(normalized).items():
        torch.testing.assert_close(value, weights[key], rtol=2e-7, atol=2e-8)

    tokenizer = WeightTokenizer(tokensize=289)
    encoded = tokenizer(weights)
    normalized_tokens = stats.normalize_tokens(encoded.tokens, encoded.layout)
    torch.testing.assert_close(normalized_tokens, tokenizer(normalized).tokens)
    assert not normalized_tokens[~encoded.mask].any()  # padding stays zero
    restored = stats.denormalize_tokens(normalized_tokens, encoded.layout)
    torch.testing.assert_close(restored, encoded.tokens, rtol=2e-7, atol=2e-8)


def test_normalization_statistics_come_from_the_training_split_only(built, raw_zoo, tmp_path):
    splits = zoo_metadata(built).split["models"]
    reference = zoo_metadata(build_zoo_dataset(raw_zoo, align=False, progress=False))

    def stats_after_scaling(model_id):
        zoo = copy_zoo(raw_zoo, tmp_path / model_id)
        for path in (zoo / "checkpoints").glob(f"{model_id}_*"):
            save_file({k: 10 * v + 3 for k, v in load_file(path).items()}, path)
        return zoo_metadata(build_zoo_dataset(zoo, align=False, progress=False)).normalization

    assert stats_after_scaling(splits["test"][0]) == reference.normalization
    assert stats_after_scaling(splits["train"][0]) != reference.normalization


def first_layer_row_order(aligned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Which original output channel each aligned channel of a conv weight is."""
    distances = torch.cdist(aligned.flatten(1), original.flatten(1))
    return distances.argmin(dim=1).tolist()


def test_rows_decode_to_aligned_weights_that_compute_the_same_function(built):
    metadata = zoo_metadata(built)
    reference_id = metadata.alignment["reference_model_id"]
    reference = checkpoint(int(reference_id.split("_")[1]), metadata.alignment["reference_epoch"])
    inputs = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    distance_before = distance_after = 0.0
    for split in built.splits.values():
        row_orders = {}
        for row in split.with_format("torch"):
            model_index = int(row["model_id"].split("_")[1])
            original = checkpoint(model_index, int(row["epoch"]))
            decoded = metadata.decode(row["tokens"])
            network = metadata.build_model(row["hyperparameters"]).eval()
            network.load_state_dict(original)
            expected = network(inputs)
            network.load_state_dict(decoded)
            torch.testing.assert_close(network(inputs), expected, rtol=1e-5, atol=1e-5)
            for key, value in decoded.items():  # a permutation of the same values
                torch.testing.assert_close(
                    value.flatten().sort()[0], original[key].flatten().sort()[0]
                )
            order = first_layer_row_order(decoded["0.weight"], original["0.weight"])
            assert (
                row_orders.setdefault(row["model_id"], order) == order
            )  # one permutation per model
            if row["model_id"] == reference_id:
                assert order == list(range(8))
            if row["epoch"] == 2:
                distance_before += sum((original[k] - reference[k]).norm() for k in reference)
                distance_after += sum((decoded[k] - reference[k]).norm() for k in reference)
    assert distance_after < 0.95 * distance_before


def test_batchnorm_residual_zoo_decodes_to_the_same_function(tmp_path):
    """BatchNorm running statistics and num_batches_tracked survive alignment and tokenization."""
    root = tmp_path / "resnet"
    kwargs = {"widths": [4, 8, 8, 8]}
    write_zoo_info(root, {"architecture": "resnet_bottleneck", "architecture_kwargs": kwargs})
    lines, inputs = [], torch.randn(2, 3, 8, 8)
    for model in range(7):
        torch.manual_seed(model)
        network = build_model("resnet_bottleneck", **kwargs)
        network(inputs)  # training-mode forward: running statistics move away from 0 and 1
        file = write_checkpoint(root, f"model_{model}", 0, network.state_dict())
        lines.append(
            {
                "file": file,
                "model_id": f"model_{model}",
                "epoch": 0,
                "seed": model,
                "train_loss": 1.0,
                "train_acc": 0.5,
                "test_loss": 1.0,
                "test_acc": 0.5,
            }
        )
    write_zoo_metadata(root, lines)

    dataset = build_zoo_dataset(root, tokensize=64, progress=False)
    metadata = zoo_metadata(dataset)
    network = metadata.build_model().eval()
    for split in dataset.splits.values():
        for row in split.with_format("torch"):
            network.load_state_dict(load_file(root / checkpoint_file_name(row["model_id"], 0)))
            expected = network(inputs)
            network.load_state_dict(metadata.decode(row["tokens"]))
            torch.testing.assert_close(network(inputs), expected, rtol=1e-5, atol=1e-5)


def test_save_and_load_round_trip_is_bit_exact(built, tmp_path):
    save_zoo_dataset(built, tmp_path / "saved")
    assert (tmp_path / "saved" / "sane_zoo.json").is_file()
    assert "Test accuracy per epoch" in (tmp_path / "saved" / "README.md").read_text()

    loaded = load_zoo_dataset(tmp_path / "saved")
    assert loaded.metadata.fingerprint.startswith("sha256-content:")
    fingerprint = {"fingerprint": loaded.metadata.fingerprint}
    assert loaded.metadata.to_dict() == zoo_metadata(built).to_dict() | fingerprint
    assert zoo_metadata(loaded.splits) == loaded.metadata
    for name in built.splits:
        assert loaded.splits[name].data.table.equals(built.splits[name].data.table)
        assert loaded.splits[name].features == built.splits[name].features


def test_push_to_fake_hub_then_load_dataset_is_bit_exact(built, fake_hub):
    """Checks our use of the Hub client against the in-memory fake Hub, not a real upload."""
    repo_id = "fake-user/cnn-s-zoo"
    push_zoo_dataset(built, repo_id)
    files = fake_hub.repo_files(repo_id, repo_type="dataset")
    assert {"README.md", "sane_zoo.json"} <= set(files)
    assert any(file.endswith(".parquet") for file in files)

    plain = datasets.load_dataset(repo_id)
    for name in built.splits:
        assert plain[name].features == built.splits[name].features
        assert np.array_equal(
            plain[name].with_format("numpy")["tokens"],
            built.splits[name].with_format("numpy")["tokens"],
        )
        assert plain[name].data.table.equals(built.splits[name].data.table)

    zoo = load_zoo_dataset(repo_id)
    assert zoo.metadata.to_dict() == zoo_metadata(built).to_dict()
    card = datasets.load_dataset_builder(repo_id).info
    assert (
        card.features == built.splits["train"].features
    )  # the card kept push_to_hub's dataset_info


def test_float16_tokens_and_an_epoch_subset(raw_zoo):
    dataset = build_zoo_dataset(
        raw_zoo, align=False, epochs=[0, 2], dtype="float16", progress=False
    )
    metadata = zoo_metadata(dataset)
    assert dataset.splits["train"].features["tokens"].dtype == "float16"
    assert set(dataset.splits["train"]["epoch"]) == {0, 2} and metadata.statistics["epochs"] == [
        0,
        2,
    ]
    assert metadata.zoo["epochs"] == [0, 2]  # the raw zoo.json lists [0, 1, 2]
    card = build_zoo_dataset_card(metadata).text
    assert "- epochs: `[0, 2]`" in card and "[0, 1, 2]" not in card
    row = dataset.splits["validation"].with_format("torch")[0]
    original = checkpoint(int(row["model_id"].split("_")[1]), int(row["epoch"]))
    for key, value in metadata.decode(row["tokens"]).items():
        torch.testing.assert_close(value, original[key], rtol=2e-3, atol=5e-4)


def test_alignment_epoch_chooses_the_checkpoint_that_is_matched(raw_zoo):
    dataset = build_zoo_dataset(raw_zoo, epochs=[0, 2], alignment_epoch=0, progress=False)
    alignment = zoo_metadata(dataset).alignment
    assert (alignment["reference_epoch"], alignment["alignment_epoch"]) == (0, 0)
    with pytest.raises(ValueError, match="has no checkpoint at alignment_epoch=1"):
        build_zoo_dataset(raw_zoo, epochs=[0, 2], alignment_epoch=1, progress=False)


def test_zoo_statistics_per_epoch_and_split():
    records = [
        {"model_id": model, "epoch": epoch, "train_acc": 0.5, "test_acc": acc}
        for model, epoch, acc in [("a", 0, 0.1), ("b", 0, 0.3), ("a", 1, 0.6), ("b", 1, 0.8)]
    ]
    statistics = zoo_statistics(records, {"train": ["a"], "validation": [], "test": ["b"]})
    assert statistics["splits"]["test"] == {"models": 1, "checkpoints": 2}
    assert statistics["per_epoch"][1]["test_acc"] == pytest.approx(
        {"mean": 0.7, "std": 0.1, "min": 0.6, "max": 0.8}
    )


def test_cli_build_and_info(raw_zoo, tmp_path, capsys, fake_hub):
    output, plot = tmp_path / "dataset", tmp_path / "accuracy.png"
    assert main(["zoo", "build", str(raw_zoo), "--output", str(output), "--no-align",
                 "--tokensize", "100", "--push-to-hub", "fake-user/cli-zoo", "--no-progress"]) == 0  # fmt: skip
    assert load_zoo_dataset(output).metadata.layout.tokensize == 100
    assert load_zoo_dataset("fake-user/cli-zoo").metadata == load_zoo_dataset(output).metadata
    assert "pushed to " in capsys.readouterr().out

    assert main(["zoo", "info", str(output), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "8 models, 24 checkpoints" in printed
    assert "train 5 models / 15 checkpoints" in printed
    assert "     2            8  0.7200" in printed  # epoch 2: mean test accuracy
    assert plot.read_bytes().startswith(b"\x89PNG")

    assert main(["zoo", "info", str(raw_zoo)]) == 0
    assert "not split yet" in capsys.readouterr().out
