"""SaneProcessor with the released checkpoint: the user's own CNN-s networks in, embeddings and
predicted properties out; other architectures refused; save/load and the Hub round trip."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file
from transformers import AutoFeatureExtractor, AutoProcessor

from sane_hf import (
    ProbeHeads,
    SaneModel,
    SaneProcessor,
    build_model,
    embed,
    predict_networks,
    push_model_to_hub,
)
from sane_hf.cli import main
from sane_hf.downstream.probe_heads import head_inputs
from sane_hf.models.sane.processing_sane import _check_layout
from sane_hf.weights.alignment import apply_permutation, random_permutation
from synthetic_zoo import write_raw_zoo

RELEASED = Path(__file__).parents[2] / "checkpoints" / "sane-cnn-mnist"


@pytest.fixture(scope="module")
def released():
    model = SaneModel.from_pretrained(RELEASED).float().eval()
    return model, SaneProcessor.from_pretrained(RELEASED)


def _cnns(count: int = 3) -> list[torch.nn.Module]:
    networks = []
    for seed in range(count):
        torch.manual_seed(seed)
        networks.append(build_model("cnn_s", in_channels=1, num_classes=10))
    return networks


def test_released_processor_holds_zoo_layout_statistics_and_reference(released):
    model, processor = released
    assert processor.architecture == "cnn_s"
    assert processor.tokensize == model.config.tokensize
    assert processor.reference is not None and processor.permutation_spec is not None
    assert processor.max_positions == list(model.config.max_positions)
    assert processor.zoo_dataset == model.config.zoo_dataset


def test_embed_own_networks_as_list_and_as_folder(released, tmp_path):
    model, processor = released
    networks = _cnns()
    features = processor(networks)
    assert features["tokens"].shape == (3, processor.layout.num_tokens, processor.tokensize)
    assert features["positions"].shape == (3, processor.layout.num_tokens, 3)
    assert features["attention_mask"].all()
    assert features["network_ids"] == ["network_0", "network_1", "network_2"]

    from_list = embed(model, features, progress=False)
    assert from_list.mean.shape == (3, model.config.latent_dim)
    assert from_list.layer_means.shape[:2] == (3, processor.layout.num_layers)
    assert not torch.allclose(from_list.mean[0], from_list.mean[1])

    folder = tmp_path / "my_nets"
    folder.mkdir()
    for index, network in enumerate(networks):
        save_file(network.state_dict(), folder / f"net_{index}.safetensors")
    from_folder = embed(model, folder, processor=processor, progress=False)
    assert from_folder.ids == ["net_0", "net_1", "net_2"]
    torch.testing.assert_close(from_folder.mean, from_list.mean)


def test_alignment_undoes_a_permutation_of_a_zoo_like_network(released):
    """A network near the zoo's reference and a permuted copy of it are aligned onto the same
    ordering, so they embed alike; without alignment they do not. (A random network has no
    clear match: weight matching may end in different local optima for the two copies.)"""
    model, processor = released
    generator = torch.Generator().manual_seed(0)
    network = {
        key: value + 0.02 * torch.randn(value.shape, generator=generator)
        for key, value in processor.reference.items()
    }
    permuted = apply_permutation(
        network,
        processor.permutation_spec,
        random_permutation(processor.permutation_spec, generator),
    )
    aligned = processor([network, permuted])
    torch.testing.assert_close(aligned["tokens"][0], aligned["tokens"][1])
    embeddings = embed(model, aligned, progress=False).mean
    torch.testing.assert_close(embeddings[0], embeddings[1])
    unaligned = processor([network, permuted], align_networks=False)["tokens"]
    assert not torch.allclose(unaligned[0], unaligned[1], atol=1e-3)


def test_an_mlp_is_refused_naming_the_parameter(released):
    _, processor = released
    mlp = build_model("mlp", in_features=784, hidden=[8], num_classes=10)
    with pytest.raises(ValueError) as error:
        processor([mlp])
    message = str(error.value)
    assert "\n" not in message
    assert "parameter 0 expected '0.weight' [8, 1, 5, 5], got '1.weight' [8, 784]" in message
    state = mlp.state_dict()
    with pytest.raises(ValueError, match=r"'0\.weight' expected shape \[8, 1, 5, 5\], got \[8\]"):
        processor([{**_cnns(1)[0].state_dict(), "0.weight": state["1.bias"]}])


def test_a_renamed_or_missing_parameter_is_refused():
    processor = SaneProcessor.from_pretrained(RELEASED)
    state = _cnns(1)[0].state_dict()
    renamed = {("conv0.weight" if key == "0.weight" else key): v for key, v in state.items()}
    with pytest.raises(
        ValueError, match=r"parameter 0 expected '0\.weight' \[8, 1, 5, 5\], got 'conv0\.weight'"
    ):
        _check_layout(processor.layout, renamed, "renamed", "the processor's")
    shorter = dict(list(state.items())[:-1])
    with pytest.raises(ValueError, match=r"parameter 9 expected '15\.bias' \[10\], got nothing"):
        processor(shorter)


def test_decode_inverts_the_processor(released):
    _, processor = released
    networks = _cnns(2)
    features = processor(networks, align_networks=False)
    decoded = processor.decode(features)
    for network, state_dict in zip(networks, decoded):
        for key, value in network.state_dict().items():
            torch.testing.assert_close(state_dict[key], value, atol=1e-6, rtol=1e-5)
    modules = processor.decode(features["tokens"][0], as_modules=True)
    assert isinstance(modules[0], torch.nn.Module)


def test_longer_networks_than_the_position_tables_are_refused(released):
    _, processor = released
    small = SaneProcessor(
        processor.tokensize,
        processor.layout,
        processor.normalization,
        architecture="cnn_s",
        architecture_kwargs=processor.architecture_kwargs,
        max_positions=[16, 64, 256],
    )
    with pytest.raises(
        ValueError, match=r"global position table has 16 entries .* larger max_positions"
    ):
        small(_cnns(1))


def test_out_of_distribution_processor_fits_statistics_on_the_networks(released):
    model, processor = released
    mlps = [build_model("mlp", in_features=16, hidden=[8], num_classes=4) for _ in range(2)]
    ood = processor.for_networks(mlps)
    assert ood.reference is None and "out of distribution" in ood.zoo_dataset
    features = ood(mlps)
    assert features["tokens"].shape[:2] == (2, ood.layout.num_tokens)
    assert embed(model, features, progress=False).mean.shape == (2, model.config.latent_dim)


def test_processor_save_load_and_auto_classes(released, tmp_path):
    _, processor = released
    processor.save_pretrained(tmp_path)
    assert {"preprocessor_config.json", "alignment_reference.safetensors"} <= {
        p.name for p in tmp_path.iterdir()
    }
    for loaded in (
        SaneProcessor.from_pretrained(tmp_path),
        AutoProcessor.from_pretrained(tmp_path),
    ):
        assert isinstance(loaded, SaneProcessor)
        for key, value in processor.reference.items():
            assert torch.equal(loaded.reference[key], value)
        assert loaded.normalization == processor.normalization
        assert loaded.layout == processor.layout
        torch.testing.assert_close(loaded(_cnns(1))["tokens"], processor(_cnns(1))["tokens"])
    with pytest.raises(ValueError, match=r"unknown SaneProcessor settings \['tokensise'\]"):
        SaneProcessor.from_dict({**processor.to_dict(), "tokensise": 288})
    # AutoFeatureExtractor reads the JSON only: it says so instead of skipping the alignment
    json_only = AutoFeatureExtractor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="was not loaded"):
        json_only(_cnns(1))
    assert json_only(_cnns(1), align_networks=False)["tokens"].shape[0] == 1


def test_model_and_processor_push_in_one_commit_and_load_offline(
    released, fake_hub, hf_offline, tmp_path
):
    model, processor = released
    push_model_to_hub(model, "fake-user/sane-cnn", processor=processor)
    files = fake_hub.repo_files("fake-user/sane-cnn")
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "alignment_reference.safetensors",
        "README.md",
    } <= set(files)
    assert fake_hub.commit_titles("fake-user/sane-cnn")[0] == "Upload SANE model"
    assert fake_hub.commit_titles("fake-user/sane-cnn").count("Upload SANE model") == 1
    SaneProcessor.from_pretrained("fake-user/sane-cnn")  # fills the cache
    processor.push_to_hub("fake-user/processor-only")  # transformers' own push works too
    assert "alignment_reference.safetensors" in fake_hub.repo_files("fake-user/processor-only")
    hf_offline()
    cached = SaneProcessor.from_pretrained("fake-user/sane-cnn")
    torch.testing.assert_close(cached(_cnns(1))["tokens"], processor(_cnns(1))["tokens"])


def test_predict_with_the_shipped_probe_heads(released, tmp_path):
    model, processor = released
    heads = ProbeHeads.from_pretrained(RELEASED)
    assert heads.names == ["test_acc", "epoch", "ggap"]
    predictions = predict_networks(RELEASED, _cnns(), output=tmp_path / "p.csv")
    assert predictions.ids == ["network_0", "network_1", "network_2"]
    assert predictions.values["test_acc"].shape == (3,)
    assert np.isfinite(predictions.values["test_acc"]).all()
    # a head no better than the zoo's mean is left out, and said so
    informative = [head.name for head in heads.heads if head.informative]
    assert list(predictions.values) == informative
    assert set(predictions.left_out) == set(heads.names) - set(informative)
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header.startswith(",".join(["id", *informative]))
    features = processor(_cnns())
    inputs = head_inputs(model, features, heads, processor.layout.mask())
    np.testing.assert_allclose(
        heads.predict(inputs)["test_acc"], predictions.values["test_acc"], rtol=1e-5
    )
    table = predictions.table()
    assert "test_acc is the fraction correct on the mnist test split" in table
    for name in informative:
        assert f"{name}: " in table and "head reads" in table


def test_cli_embed_and_predict(tmp_path, capsys):
    folder = tmp_path / "nets"
    folder.mkdir()
    for index, network in enumerate(_cnns()):
        save_file(network.state_dict(), folder / f"cnn_{index}.safetensors")
    output = tmp_path / "embeddings.parquet"

    assert (
        main(["embed", str(RELEASED), str(folder), "--output", str(output), "--layer-means"]) == 0
    )
    table = pq.read_table(output).to_pydict()
    assert table["id"] == ["cnn_0", "cnn_1", "cnn_2"]
    assert len(table["embedding"][0]) == 128 and len(table["layer_means"][0]) == 5
    # untrained networks of PyTorch's default init (non-zero biases): outside the zoo's range
    assert table["outside_zoo_range"] == [True, True, True]
    assert all(p > 100 for p in table["weight_statistics_distance_percentile"])
    assert "warning: 3 of 3 networks lie outside" in capsys.readouterr().out
    assert (
        main(
            [
                "embed",
                str(RELEASED),
                str(folder / "cnn_0.safetensors"),
                "--output",
                str(tmp_path / "e.npy"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "e.npy").shape == (1, 128)

    assert main(["predict", str(RELEASED), str(folder), "--output", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "test_acc" in out and "cnn_2" in out and "fraction correct" in out
    assert "warning: 3 of 3 networks (cnn_0, cnn_1, cnn_2) lie outside" in out
    assert "init: uniform weights, zero biases" in out  # how the zoo's networks were made
    assert '"predictions"' in (tmp_path / "p.json").read_text()


def test_cli_embed_refuses_an_unknown_output_format(tmp_path, capsys):
    argv = ["embed", str(RELEASED), str(tmp_path), "--output", str(tmp_path / "e.txt")]
    assert main(argv) == 1
    [error] = capsys.readouterr().err.strip().splitlines()
    assert "unsupported output format '.txt'" in error


def test_networks_from_a_zoo_split_a_raw_zoo_and_a_hub_repo(
    released, synthetic_zoo, tmp_path, fake_hub
):
    _, processor = released
    # the synthetic zoo is an MLP zoo: out of distribution for the CNN-s model, on purpose
    ood = processor.for_networks(synthetic_zoo["test"])
    from_split = ood(synthetic_zoo["test"])
    first = synthetic_zoo["test"][0]
    assert from_split["network_ids"][0] == f"{first['model_id']}_epoch_{first['epoch']:03d}"
    assert len(from_split["network_ids"]) == len(synthetic_zoo["test"])
    # zoo rows decode back into the checkpoints: the raw zoo (same seeds) gives the same tokens
    from_raw = ood(write_raw_zoo(tmp_path / "raw"))
    assert len(from_raw["network_ids"]) == 100
    rows = [from_raw["network_ids"].index(i) for i in from_split["network_ids"]]
    torch.testing.assert_close(from_raw["tokens"][rows], from_split["tokens"], atol=1e-5, rtol=1e-5)

    HfApi().create_repo("fake-user/my-cnns")
    folder = tmp_path / "hub_nets"
    folder.mkdir()
    save_file(_cnns(1)[0].state_dict(), folder / "trained.safetensors")
    HfApi().upload_folder(repo_id="fake-user/my-cnns", folder_path=folder)
    from_hub = processor("fake-user/my-cnns")
    assert from_hub["network_ids"] == ["trained"]
    torch.testing.assert_close(from_hub["tokens"], processor(_cnns(1))["tokens"])


def test_cli_push_of_the_released_folder_keeps_processor_heads_and_card_sections(fake_hub, capsys):
    assert main(["push", str(RELEASED), "fake-user/sane-cnn-mnist"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert fake_hub.commit_titles("fake-user/sane-cnn-mnist")[0] == "Upload SANE model with sane-hf"
    files = fake_hub.repo_files("fake-user/sane-cnn-mnist")
    for name in (
        "preprocessor_config.json",
        "alignment_reference.safetensors",
        "probe_heads.json",
        "probe_heads.safetensors",
    ):
        assert files[name] == (RELEASED / name).read_bytes(), name
    card = files["README.md"].decode()
    assert 'SaneProcessor.from_pretrained("fake-user/sane-cnn-mnist")' in card
    assert "## Zoo and protocol" in card and "## Limitations" in card
    assert "R^2 test_acc (shipped probe head, test split)" in card
    heads = ProbeHeads.from_pretrained("fake-user/sane-cnn-mnist")
    assert heads.names == ProbeHeads.from_pretrained(RELEASED).names
    assert SaneProcessor.from_pretrained("fake-user/sane-cnn-mnist").reference is not None


@pytest.mark.slow
def test_zoo_made_networks_are_not_flagged_and_their_untrained_init_is(tmp_path):
    # the released zoo's recipe with a seed it never used: epoch 1 is an epoch SANE saw
    argv = [
        "zoo", "train", "--output", str(tmp_path / "zoo"), "--architecture", "cnn_s",
        "--dataset", "mnist", "--num-models", "1", "--seed", "10000", "--epochs", "1",
        "--no-progress", "--set", "hyperparameters.activation=tanh",
        "--set", "hyperparameters.init=uniform", "--set", "hyperparameters.lr=3e-4",
    ]  # fmt: skip
    assert main(argv) == 0
    files = sorted((tmp_path / "zoo" / "checkpoints").glob("*.safetensors"))
    predictions = predict_networks(RELEASED, files)
    assert predictions.ids == ["model_0000_epoch_000", "model_0000_epoch_001"]
    assert predictions.in_distribution.outside.tolist() == [True, False]
