"""The one config mechanism: presets, files, flags, overrides; validation shared by API and CLI."""

import argparse
import dataclasses
import json
import re

import pytest

from sane_hf import cli
from sane_hf.models.sane.configuration_sane import SaneConfig
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.recipes.demo import DemoConfig
from sane_hf.recipes.settings import SamplingSettings
from sane_hf.utils.config import (
    add_config_arguments,
    config_from_args,
    load_config,
    preset_names,
)
from sane_hf.zoo.config import ZooConfig


def test_every_kind_of_config_has_its_presets_shipped_in_the_package():
    assert {"tiny", "cpu", "cnn", "resnet18"} <= set(preset_names("pretraining"))
    assert {"default", "quick"} <= set(preset_names("demo"))


@pytest.mark.parametrize("name", preset_names("pretraining"))
def test_every_pretraining_preset_builds_its_sane_config(name):
    config = PretrainingConfig.load(name)
    model_config = config.model_config()
    assert model_config.d_model % model_config.n_heads == 0
    assert model_config.windowsize > 0 and config.mixed_precision in ("no", "bf16", "fp16")


def test_sources_apply_in_order_preset_file_flags_overrides(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainingConfig)
    args = parser.parse_args(["--config", "tiny", "--max-steps", "7", "--set", "max_steps=9"])
    config = config_from_args(PretrainingConfig, args)
    assert config.max_steps == 9  # --set wins over the flag
    assert config.model.to_dict() == {"preset": "tiny"}  # from tiny.yaml: the tiny model as is
    args = parser.parse_args(["--config", "tiny", "--learning-rate", "1", "--model.d-model", "64"])
    assert config_from_args(PretrainingConfig, args).model.d_model == 64  # a model section flag
    assert config_from_args(PretrainingConfig, args).learning_rate == 1.0  # int read as float
    assert config_from_args(PretrainingConfig, parser.parse_args([])).max_steps is None

    (tmp_path / "run.json").write_text(json.dumps({"batch_size": 4, "model": {"preset": "cnn"}}))
    config = PretrainingConfig.load(tmp_path / "run.json", overrides=["model.n_layers=2"])
    assert config.batch_size == 4 and config.model.to_dict() == {"preset": "cnn", "n_layers": 2}


def test_a_flag_absent_keeps_the_preset_value_and_a_bool_flag_alone_means_true():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainingConfig)
    config = config_from_args(
        PretrainingConfig, parser.parse_args(["--config", "tiny", "--allow-config-change"])
    )
    assert config.allow_config_change is True and config.max_steps == 500  # tiny's, not None


def test_a_file_extends_a_preset_with_base(tmp_path):
    (tmp_path / "demo.yaml").write_text("base: quick\nzoo:\n  num_models: 3\n")
    config = DemoConfig.load(tmp_path / "demo.yaml")
    quick = DemoConfig.quick()
    assert config.zoo.num_models == 3 and config.zoo.epochs == quick.zoo.epochs
    assert config.zoo.dataset_kwargs == {"num_samples": 300}
    assert config.sampling == quick.sampling and config.pretraining == quick.pretraining


def test_demo_presets_build_every_section():
    quick = DemoConfig.quick()
    assert isinstance(quick.zoo, ZooConfig) and isinstance(quick.pretraining, PretrainingConfig)
    assert quick.pretraining.max_steps == 10 and quick.pretraining.model.to_dict() == {
        "preset": "tiny"
    }
    assert quick.sampling == SamplingSettings(
        num_prompts=3, num_samples=2, num_candidates=4, score_samples=100, finetune_epochs=1
    )
    assert [m.kind for m in quick.sampling_runs[0].methods] == ["kde", "subsampled"]
    default = DemoConfig.load(overrides=["zoo.num_models=16"])
    assert default.zoo.num_models == 16 and default.zoo.epochs == 8


def test_zoo_config_loads_presets_files_and_dicts_through_the_same_loader(tmp_path):
    (tmp_path / "zoo.yaml").write_text("num_models: 4\ninput_shape: [1, 8, 8]\nepochs: 2\n")
    config = ZooConfig.load(tmp_path / "zoo.yaml")
    assert config.num_models == 4 and config.input_shape == (1, 8, 8)
    assert ZooConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_model'\]"):
        ZooConfig.from_dict({"num_model": 3})
    with pytest.raises(ValueError, match=r"epochs in .* must be int, got 'many'"):
        ZooConfig.from_dict({"epochs": "many"})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("tinyy", r"unknown pretraining preset 'tinyy': choose one of \['cnn', 'cnn-s-cpu'"),
        ("no/such/run.yaml", "config file no/such/run.yaml does not exist"),
    ],
)
def test_unknown_presets_and_missing_files_are_named(source, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        PretrainingConfig.load(source)


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping, got list"):
        load_config(PretrainingConfig, tmp_path / "list.yaml")


# Validation: one test per value, the API and the CLI give the same message.
PRETRAINING_VALUES = [
    ({"max_grad_norm": -1.0}, ["--max-grad-norm", "-1"], r"max_grad_norm must be > 0"),
    ({"max_grad_norm": 0.0}, ["--max-grad-norm", "0"], r"max_grad_norm must be > 0"),
    ({"noise_sigma": -0.1}, ["--noise-sigma", "-0.1"], r"noise_sigma must be >= 0, got -0.1"),
    (
        {"erase_probability": 1.5},
        ["--erase-probability", "1.5"],
        r"erase_probability must lie in \[0, 1\], got 1.5",
    ),
    (
        {"erase_probability": -0.5},
        ["--erase-probability", "-0.5"],
        r"erase_probability must lie in \[0, 1\], got -0.5",
    ),
    (
        {"model": {"preset": "tiny", "n_layers": 0}},
        ["--set", "model.n_layers=0"],
        r"model: n_layers must be a positive integer, got 0",
    ),
    (
        {"model": {"preset": "tiny", "n_heads": 0}},
        ["--set", "model.n_heads=0"],
        r"model: n_heads must be a positive integer, got 0",
    ),
    (
        {"model": {"preset": "tiny", "n_heads": 3}},
        ["--set", "model.n_heads=3"],
        r"model: d_model must be even and divisible by n_heads",
    ),
    (
        {"model": {"preset": "tiny", "windowsize": 0}},
        ["--set", "model.windowsize=0"],
        r"model: windowsize must be a positive integer, got 0",
    ),
]


@pytest.mark.parametrize(("values", "flags", "message"), PRETRAINING_VALUES)
def test_pretraining_values_are_refused_alike_by_api_and_cli(
    values, flags, message, tmp_path, capsys
):
    with pytest.raises(ValueError, match=message):
        PretrainingConfig(**values)
    argv = ["pretrain", "--config", "tiny", "--dataset", str(tmp_path), *flags]
    assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert re.search(message, error), error


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("n_layers", 0, "n_layers must be a positive integer, got 0"),
        ("n_heads", 0, "n_heads must be a positive integer, got 0"),
        ("windowsize", 0, "windowsize must be a positive integer, got 0"),
    ],
)
def test_sane_config_refuses_sizes_below_one(name, value, message):
    with pytest.raises(Exception, match=message):
        SaneConfig.from_preset("tiny", **{name: value})


@pytest.mark.parametrize("value", [0, -3])
def test_zoo_num_models_must_be_positive_in_api_and_cli(value, tmp_path, capsys):
    with pytest.raises(ValueError, match="num_models"):
        ZooConfig(num_models=value)
    assert cli.main(["zoo", "train", "--num-models", str(value), "--output", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "num_models" in error and error.count("\n") == 1


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--num-samples", "num_samples must be a positive integer, got 0"),
        ("--num-prompts", "num_prompts must be a positive integer, got 0"),
    ],
)
def test_sample_counts_of_zero_are_refused_alike_by_api_and_cli(flag, message, tmp_path, capsys):
    field = flag.removeprefix("--").replace("-", "_")
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{field: 0})
    argv = ["sample", "--model", str(tmp_path), "--dataset", str(tmp_path)]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "out"), flag, "0"]) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_sampling_settings_round_trip_through_a_file(tmp_path):
    settings = SamplingSettings(num_prompts=4, architecture_kwargs={"num_classes": 3})
    (tmp_path / "s.json").write_text(json.dumps(dataclasses.asdict(settings)))
    assert SamplingSettings.load(tmp_path / "s.json") == settings


def test_the_default_token_size_is_written_once_and_the_model_file_agrees():
    import inspect

    from sane_hf.weights.tokenization import DEFAULT_TOKENSIZE, WeightTokenizer
    from sane_hf.zoo.dataset import build_zoo_dataset

    assert SaneConfig().tokensize == DEFAULT_TOKENSIZE  # the self-contained copy
    assert WeightTokenizer().tokensize == DEFAULT_TOKENSIZE
    default = inspect.signature(build_zoo_dataset).parameters["tokensize"].default
    assert default == DEFAULT_TOKENSIZE


def test_the_model_section_has_one_field_per_sane_config_field():
    import dataclasses

    from sane_hf.models.sane.configuration_sane import SaneConfig
    from sane_hf.pretraining.config import ModelSection

    own = set(SaneConfig.__annotations__) - {"model_type"}  # the fields SaneConfig adds
    section = {f.name for f in dataclasses.fields(ModelSection)} - {"preset"}
    assert section == own


def test_tiny_means_the_tiny_model_everywhere():
    from sane_hf.models.sane.configuration_sane import SaneConfig

    tiny = SaneConfig.from_preset("tiny").to_dict()
    for config in (PretrainingConfig.load("tiny"), DemoConfig.load("default").pretraining):
        assert config.model_config().to_dict() == tiny
