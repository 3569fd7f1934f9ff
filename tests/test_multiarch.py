"""One SANE for many architectures: universal tokens, mixed zoos, pretraining, the processor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sane_hf.models.sane.configuration_sane import SaneConfig
from sane_hf.models.sane.modeling_sane import SaneModel, normalize_for_loss
from sane_hf.models.sane.processing_sane import SaneProcessor
from sane_hf.models.sane.processing_universal import SaneUniversalProcessor
from sane_hf.weights.alignment import PermutationSpec, apply_permutation, random_permutation
from sane_hf.weights.universal import (
    ALIGNMENTS,
    LAYER_TYPES,
    SCALE_MODES,
    TOKEN_MODES,
    TokenScheme,
    UniversalTokenizer,
    canonical_order,
)
from sane_hf.zoo.architectures import build_model

ARCHITECTURES = {
    "mlp": {"in_features": 64, "hidden": [16, 8]},
    "cnn_s": {},
    "cnn_wide": {},
    "resnet_small": {},
}


class WithLayerNorm(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Embedding(10, 8), nn.LayerNorm(8), nn.Conv1d(8, 4, 3), nn.Flatten(), nn.Linear(8, 2)
        )


def _networks() -> list[nn.Module]:
    torch.manual_seed(0)
    return [build_model(name, **kwargs) for name, kwargs in ARCHITECTURES.items()]


@pytest.mark.parametrize("token_mode", TOKEN_MODES)
@pytest.mark.parametrize("scale", SCALE_MODES)
@pytest.mark.parametrize(
    "network", [*ARCHITECTURES, "layernorm_embedding_conv1d"], ids=lambda name: name
)
def test_decode_is_exact_for_every_scale_mode(network, token_mode, scale):
    if network in ARCHITECTURES:
        module = build_model(network, **ARCHITECTURES[network])
    else:
        module = WithLayerNorm()
    with torch.no_grad():  # non-zero biases and running statistics, as trained networks have
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor).mul_(0.1))
    tokenizer = UniversalTokenizer(TokenScheme(tokensize=16, token_mode=token_mode, scale=scale))
    encoded = tokenizer(module)
    decoded = tokenizer.decode(encoded.tokens, tokenizer.layout(module), encoded.scales)
    for key, value in module.state_dict().items():
        assert torch.equal(decoded[key], value), key
    assert encoded.positions[:, 1].max() < len(LAYER_TYPES)


def test_positions_do_not_depend_on_depth():
    tokenizer = UniversalTokenizer(TokenScheme(depth_buckets=8))
    shallow = tokenizer(build_model("mlp", in_features=64, hidden=[16]))
    deep = tokenizer(build_model("mlp", in_features=64, hidden=[16, 16, 16]))
    # first and last layers sit at relative depth 0 and 1 whatever the depth in between
    assert shallow.positions[0, 0] == deep.positions[0, 0] == 0
    assert shallow.positions[-1, 0] == deep.positions[-1, 0] == 7


def test_canonical_alignment_needs_no_reference():
    module = build_model("mlp", in_features=12, hidden=[8, 6])
    spec = PermutationSpec.from_model(module)
    permuted = apply_permutation(module.state_dict(), spec, random_permutation(spec))
    first, second = canonical_order(module.state_dict(), spec), canonical_order(permuted, spec)
    for key in first:
        assert torch.allclose(first[key], second[key]), key
    tokenizer = UniversalTokenizer(TokenScheme(alignment="canonical"))
    with pytest.raises(ValueError, match="PermutationSpec"):
        tokenizer(module)
    assert ALIGNMENTS == ("none", "canonical")


def test_unsupported_layer_is_refused_in_one_line():
    processor = SaneUniversalProcessor(TokenScheme())
    network = nn.Sequential(nn.Linear(4, 4), nn.ConvTranspose2d(4, 2, 3))
    with pytest.raises(ValueError, match=r"unsupported layer '1' \(ConvTranspose2d\)") as error:
        processor([build_model("cnn_s"), network])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unsupported layer"):  # a state_dict, by shape
        processor({"w.weight": torch.zeros(2, 2, 2, 2, 2)})


@pytest.mark.parametrize(
    ("mode", "dims"), [("batch", (0, 1, 2)), ("window", (1, 2)), ("token", (2,))]
)
def test_loss_normalization_standardizes_by_the_targets(mode, dims):
    torch.manual_seed(0)
    targets = torch.randn(2, 3, 4) * 0.01 + 5  # raw weights: tiny spread, large offset
    reconstructions = targets + 0.001
    mask = torch.ones_like(targets, dtype=torch.bool)
    scored, normalized = normalize_for_loss(reconstructions, targets, mask, mode)
    std = targets.std(dim=dims, keepdim=True, correction=0)
    assert torch.allclose(normalized.mean(dim=dims), torch.zeros(()), atol=1e-4)
    assert torch.allclose(scored - normalized, 0.001 / std, rtol=1e-3)
    unchanged = normalize_for_loss(reconstructions, targets, mask, "none")
    assert unchanged[0] is reconstructions and unchanged[1] is targets


@pytest.fixture(scope="module")
def tiny_mixed(tmp_path_factory) -> Path:
    """Two architectures (an MLP and CNN-s), seven networks each (4/1/2 split), one epoch."""
    from sane_hf.zoo.config import ZooConfig
    from sane_hf.zoo.training import train_zoo

    root = tmp_path_factory.mktemp("mixed")
    for name, architecture, kwargs, init in (
        ("mlp", "mlp", {"hidden": [8]}, "default"),
        ("cnn", "cnn_s", {}, "uniform"),
    ):
        config = ZooConfig(
            architecture=architecture,
            architecture_kwargs=kwargs,
            dataset="digits",
            dataset_kwargs={"num_samples": 200, "standardize": name == "cnn"},
            num_models=7,
            epochs=1,
            batch_size=32,
            hyperparameters={"init": init},
        )
        train_zoo(config, root / name, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_run(tiny_mixed, tmp_path_factory) -> tuple[Path, Path]:
    """``sane-hf zoo build`` of the two zoos and ``sane-hf pretrain --config multi-cpu`` on it
    (a few steps of a tiny SANE): the dataset and the model folder."""
    root = tmp_path_factory.mktemp("run")
    dataset, output = root / "mixed", root / "sane"
    command = [sys.executable, "-m", "sane_hf"]
    subprocess.run(
        [*command, "zoo", "build", str(tiny_mixed / "mlp"), str(tiny_mixed / "cnn"),
         "--output", str(dataset), "--tokensize", "32", "--no-progress"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [*command, "pretrain", "--config", "multi-cpu", "--dataset", str(dataset),
         "--output-dir", str(output), "--max-steps", "4", "--batch-size", "4",
         "--set", "model.d_model=32", "--set", "model.latent_dim=16",
         "--set", "model.windowsize=8", "--set", "model.projection_dim=8"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return dataset, output


def test_mixed_zoo_build_pretrain_embed(tiny_run):
    from sane_hf.downstream.embedding import embed
    from sane_hf.zoo.mixed import load_mixed_dataset

    dataset, output = tiny_run
    mixed = load_mixed_dataset(dataset)
    assert set(mixed.splits["train"]["architecture"]) == {"mlp", "cnn"}
    assert set(mixed.splits["test"]["architecture"]) == {"mlp", "cnn"}  # stratified
    row = mixed.splits["train"].with_format("numpy")[0]
    assert set(mixed.metadata.decode(row)) == set(
        mixed.metadata.architectures[row["architecture"]].build().state_dict()
    )
    files = sorted(p.name for p in output.iterdir())
    assert "sane_zoo.json" not in files and "alignment_reference.safetensors" not in files
    assert "probe_heads.safetensors" in files
    processor = SaneProcessor.from_pretrained(output)
    assert isinstance(processor, SaneUniversalProcessor)
    model = SaneModel.from_pretrained(output).eval()
    assert model.config.token_scheme == processor.token_scheme.to_dict()
    # a network of an architecture the model never saw (a ResNet with BatchNorm) is embedded
    networks = [*_networks()[:2], build_model("resnet_small"), build_model("mlp", in_features=20)]
    embeddings = embed(model, processor(networks), progress=False)
    assert embeddings.mean.shape == (4, 16) and torch.isfinite(embeddings.mean).all()
    alone = embed(model, processor(networks[2]), progress=False)
    assert torch.allclose(alone.mean[0], embeddings.mean[2], atol=1e-5)  # padding changes nothing


def test_cli_probe_and_predict_on_mixed(tiny_run, tmp_path):
    dataset, output = tiny_run
    command = [sys.executable, "-m", "sane_hf"]
    probe = subprocess.run(
        [*command, "probe", "--model", str(output), "--dataset", str(dataset),
         "--output-dir", str(tmp_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "s(W)" in probe.stdout and "cnn" in probe.stdout
    result = json.loads((tmp_path / "probe.json").read_text())
    assert {r["features"] for r in result["universal"]} >= {"SANE", "s(W)"}
    assert set(result["universal"][0]["per_architecture"]) == {"mlp", "cnn"}
    folder = tmp_path / "networks"  # a folder mixing architectures
    folder.mkdir()
    for index, network in enumerate(_networks()):
        save_file(network.state_dict(), folder / f"net_{index}.safetensors")
    # four steps of pretraining: no head beats the zoo's mean, and predict says so in one line
    refused = subprocess.run(
        [*command, "predict", str(output), str(folder)], capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert "no probe head of this model beats the zoo's mean" in refused.stderr.splitlines()[-1]
    released = Path(__file__).parents[1] / "checkpoints" / "sane-multi-cpu"
    predict = subprocess.run(
        [*command, "predict", str(released), str(folder)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert all(f"net_{i}" in predict.stdout for i in range(len(ARCHITECTURES)))


def test_reconstruction_and_sampling_across_architectures(tiny_run):
    from sane_hf.downstream.mixed import reconstruction_accuracies, sample_from_prompts
    from sane_hf.zoo.mixed import load_mixed_dataset

    dataset, output = tiny_run
    mixed = load_mixed_dataset(dataset)
    model = SaneModel.from_pretrained(output).eval()
    rows = mixed.splits["test"].select(range(4))
    scores = reconstruction_accuracies(model, rows, mixed.metadata, num_test_samples=50)
    assert all(len(s["original"]) == len(s["reconstructed"]) for s in scores.values())
    samples = sample_from_prompts(model, rows, mixed.metadata, num_test_samples=50)
    for groups in samples.values():
        assert set(groups) == {"prompts", "samples", "prompts + matched noise"}
        assert all(0 <= value <= 1 for values in groups.values() for value in values)


def test_processor_round_trip_and_decode_into_target(tmp_path):
    processor = SaneUniversalProcessor(TokenScheme(scale="layer"), max_positions=(32, 8, 512))
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert set(config) == {
        "feature_extractor_type",
        "processor_class",
        "token_scheme",
        "max_positions",
    }
    loaded = SaneProcessor.from_pretrained(tmp_path)
    networks = _networks()
    batch = loaded(networks)
    assert batch["attention_mask"].sum(1).tolist() == batch["lengths"].tolist()
    for index, (name, kwargs) in enumerate(ARCHITECTURES.items()):
        (module,) = loaded.decode(
            batch["tokens"][index], batch["scales"][index], name, kwargs, as_modules=True
        )
        for key, value in networks[index].state_dict().items():
            assert torch.equal(module.state_dict()[key], value), (name, key)
    with pytest.raises(ValueError, match="scales"):
        loaded.decode(batch["tokens"][0], None, "mlp", ARCHITECTURES["mlp"])


def test_old_config_loads_with_absolute_positions():
    config = SaneConfig.from_preset("tiny")
    assert config.position_scheme == "absolute" and config.loss_normalization == "none"
    with pytest.raises(ValueError, match="position_scheme"):
        SaneConfig.from_preset("tiny", position_scheme="sinusoidal")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_module_and_its_safetensors_file_tokenize_alike(name, tmp_path):
    from safetensors.torch import load_file

    module = build_model(name, **ARCHITECTURES[name])
    save_file(module.state_dict(), tmp_path / "net.safetensors")  # the file reorders the keys
    tokenizer = UniversalTokenizer(TokenScheme(token_mode="dense"))
    from_module, from_file = tokenizer(module), tokenizer(load_file(tmp_path / "net.safetensors"))
    assert torch.equal(from_module.tokens, from_file.tokens)
    assert torch.equal(from_module.positions, from_file.positions)
