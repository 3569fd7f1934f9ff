"""Importing zoos: the Ray Tune trial layout and plain safetensors folders, with broken members."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sane_hf import build_model
from sane_hf.cli import main
from sane_hf.zoo.formats import load_zoo_metadata
from sane_hf.zoo.importing import ImportReport, ZooImportError, import_zoo

EPOCHS = (0, 1, 2)


def cnn_s_state_dict(seed: int, epoch: int, **kwargs) -> dict[str, torch.Tensor]:
    """A CNN-s with random weights that drift a little per epoch, like a training trajectory."""
    torch.manual_seed(seed)
    state_dict = build_model("cnn_s", **kwargs).state_dict()
    generator = torch.Generator().manual_seed(1000 * seed + epoch)
    return {
        key: value + 0.01 * epoch * torch.randn(value.shape, generator=generator)
        for key, value in state_dict.items()
    }


def result_line(epoch: int) -> dict:
    """Metrics under the Model Zoos names (acc fractions, ``loss_*``), plus Ray bookkeeping."""
    return {
        "training_iteration": epoch,
        "train_acc": 0.5 + 0.1 * epoch,
        "test_acc": 0.45 + 0.1 * epoch,
        "loss_train": 2.0 - 0.5 * epoch,
        "loss_test": 2.1 - 0.5 * epoch,
        "timestamp": 1700000000 + epoch,
    }


def write_trial(root, name, seed, state_dicts, results) -> None:
    trial = root / name
    trial.mkdir(parents=True)
    params = {
        "model": {"nlin": "tanh", "dropout": 0.0, "init_type": "uniform"},
        "optim::optimizer": "adam",
        "optim::lr": 3e-4,
        "optim::wd": 0.0,
        "training::batchsize": 10,
        "training::epochs_train": len(EPOCHS),
        "seed": seed,
    }
    (trial / "params.json").write_text(json.dumps(params))
    (trial / "result.json").write_text("".join(json.dumps(line) + "\n" for line in results))
    for epoch, state_dict in state_dicts.items():
        (trial / f"checkpoint_{epoch:06d}").mkdir()
        torch.save(state_dict, trial / f"checkpoint_{epoch:06d}" / "checkpoints")


@pytest.fixture
def ray_zoo(tmp_path):
    """Five trials: two clean ones (one with Model Zoos' ``module_list`` keys), a truncated
    checkpoint, a diverged (NaN) epoch, a model of another architecture, a missing metric."""
    root = tmp_path / "ray"
    results = [result_line(epoch) for epoch in EPOCHS]
    clean = {epoch: cnn_s_state_dict(0, epoch) for epoch in EPOCHS}
    write_trial(root, "trial_a", 0, clean, results)

    module_list = {
        epoch: {f"module_list.{key}": value for key, value in cnn_s_state_dict(1, epoch).items()}
        for epoch in EPOCHS
    }
    incomplete = [
        line if line["training_iteration"] != 2 else {**line, "test_acc": None} for line in results
    ]
    write_trial(root, "trial_b", 1, module_list, incomplete)

    write_trial(
        root, "trial_c", 2, {epoch: cnn_s_state_dict(2, epoch) for epoch in EPOCHS}, results
    )
    checkpoint = root / "trial_c" / "checkpoint_000001" / "checkpoints"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])

    diverged = {epoch: cnn_s_state_dict(3, epoch) for epoch in EPOCHS}
    diverged[2]["12.weight"][0, 0] = float("nan")
    write_trial(root, "trial_d", 3, diverged, results)

    rgb = {epoch: cnn_s_state_dict(4, epoch, in_channels=3) for epoch in EPOCHS}
    write_trial(root, "trial_e", 4, rgb, results)
    return root


def import_ray(source, output, **kwargs) -> ImportReport:
    return import_zoo(
        source,
        output,
        architecture="cnn_s",
        zoo_info={"dataset": "mnist"},
        progress=False,
        **kwargs,
    )


def skipped_summary(report: ImportReport) -> list[tuple]:
    return [(item.model_id, item.epoch, item.reason.split(":")[0]) for item in report.skipped]


EXPECTED_SKIPS = [
    ("model_0001", 2, "missing metric(s) ['test_acc'] in result.json (epoch 2)"),
    ("model_0002", 1, "unreadable checkpoint (RuntimeError"),
    ("model_0003", 2, "model model_0003: parameter '12.weight' has non-finite values (NaN/Inf)"),
    ("model_0004", 0, "architecture differs from cnn_s({})"),
    ("model_0004", 1, "architecture differs from cnn_s({})"),
    ("model_0004", 2, "architecture differs from cnn_s({})"),
]


def test_ray_trial_import_skips_broken_members_and_reports_why(ray_zoo, tmp_path):
    output = tmp_path / "raw"
    report = import_ray(ray_zoo, output)

    assert report.models == {
        "model_0000": [0, 1, 2],
        "model_0001": [0, 1],
        "model_0002": [0, 2],
        "model_0003": [0, 1],
    }
    assert [(m, e) for m, e, _ in skipped_summary(report)] == [(m, e) for m, e, _ in EXPECTED_SKIPS]
    for (_, _, reason), (_, _, expected) in zip(skipped_summary(report), EXPECTED_SKIPS):
        assert expected.startswith(reason)
    assert report.skipped[2].message.startswith(
        "trial_d/checkpoint_000002/checkpoints: model model_0003: parameter '12.weight' has "
        "non-finite values (NaN/Inf)"
    )
    assert "'0.weight' has shape [8, 3, 5, 5], expected [8, 1, 5, 5]" in report.skipped[3].reason
    assert report.skipped[0].path == "trial_b/checkpoint_000002/checkpoints"
    assert any("module_list.0.weight" in note for note in report.notes)
    assert ImportReport.from_dict(json.loads((output / "import_report.json").read_text())) == report
    assert "skipped 6 items" in report.summary()

    zoo = json.loads((output / "zoo.json").read_text())
    assert zoo["architecture"] == "cnn_s" and zoo["dataset"] == "mnist"
    assert zoo["epochs"] == [0, 1, 2] and zoo["kind"] == "seed"

    records = load_zoo_metadata(output)
    assert len(records) == 9
    first = records[0]
    assert first["file"] == "checkpoints/model_0000_epoch_000.safetensors"
    assert first["hyperparameters"] == {
        "activation": "tanh",
        "dropout": 0.0,
        "init": "uniform",
        "optimizer": "adam",
        "lr": 3e-4,
        "weight_decay": 0.0,
        "batch_size": 10,
        "training::epochs_train": 3,
    }
    assert (first["train_loss"], first["test_loss"]) == (2.0, 2.1)
    assert first["ggap"] == pytest.approx(0.05) and first["val_acc"] is None
    assert first["metrics"] == {"timestamp": 1700000000} and first["source"] == "trial_a"

    # module_list.* keys were renamed to ours by position, values untouched
    by_file = {record["file"]: record for record in records}
    loaded = load_file(output / "checkpoints/model_0001_epoch_001.safetensors")
    assert by_file["checkpoints/model_0001_epoch_001.safetensors"]["seed"] == 1
    for key, value in cnn_s_state_dict(1, 1).items():
        assert torch.equal(loaded[key], value)


def test_strict_import_raises_the_reported_message_and_a_rerun_continues(ray_zoo, tmp_path):
    reference = import_ray(ray_zoo, tmp_path / "reference")
    output = tmp_path / "raw"

    with pytest.raises(ZooImportError) as raised:
        import_ray(ray_zoo, output, strict=True)
    assert str(raised.value) == reference.skipped[0].message
    assert not (output / "metadata.jsonl").exists()  # stopped in model_0001, model_0000 saved

    resumed = import_ray(ray_zoo, output)
    assert resumed.resumed_models == ["model_0000"]
    assert resumed.models == reference.models and resumed.skipped == reference.skipped
    assert (output / "metadata.jsonl").read_text().replace("raw", "reference") == (
        tmp_path / "reference" / "metadata.jsonl"
    ).read_text()

    again = import_ray(ray_zoo, output)
    assert again.resumed_models == sorted(reference.models)
    assert again.skipped == reference.skipped  # skips of done models are remembered


def test_ray_trials_need_an_architecture(ray_zoo, tmp_path):
    with pytest.raises(ValueError, match="pass architecture='cnn_s'"):
        import_zoo(ray_zoo, tmp_path / "raw", progress=False)


def test_safetensors_folder_is_validated_and_copied_to_canonical_names(tmp_path):
    source = tmp_path / "plain"
    (source / "nested").mkdir(parents=True)
    (source / "zoo.json").write_text(json.dumps({"architecture": "cnn_s", "dataset": "mnist"}))
    lines = []
    for model, (file, state_dict) in enumerate(
        [
            ("nested/a.safetensors", cnn_s_state_dict(0, 0)),
            ("b.safetensors", cnn_s_state_dict(1, 0)),
            ("broken.safetensors", cnn_s_state_dict(2, 0)),
            (
                "nan.safetensors",
                {**cnn_s_state_dict(3, 0), "15.bias": torch.full((10,), float("inf"))},
            ),
        ]
    ):
        save_file(state_dict, source / file)
        lines.append(
            {
                "file": file,
                "model_id": f"m{model}",
                "epoch": 0,
                "seed": model,
                "train_loss": 1.0,
                "train_acc": 0.6,
                "test_loss": 1.1,
                "test_acc": 0.5,
                "val_acc": None,  # no validation split: not an extra metric
                "hyperparameters": {"activation": "tanh"},
            }
        )
    (source / "broken.safetensors").write_bytes(b"not a safetensors file")
    lines[1]["lr_at_end"] = 1e-5
    lines.append({**lines[0], "train_acc": 60.0, "epoch": 1})
    (source / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    output = tmp_path / "raw"
    report = import_zoo(source, output, progress=False)

    assert report.source_layout == "safetensors"
    assert report.models == {"m0": [0], "m1": [0]}
    assert [(item.path, item.reason.split(" (")[0]) for item in report.skipped] == [
        (
            "nested/a.safetensors",
            "metric train_acc in metadata.jsonl line 5 is 60.0, expected a fraction in [0, 1]",
        ),
        ("broken.safetensors", "unreadable checkpoint"),
        ("nan.safetensors", "model m3: parameter '15.bias' has non-finite values"),
    ]
    records = load_zoo_metadata(output)
    assert [record["file"] for record in records] == [
        "checkpoints/m0_epoch_000.safetensors",
        "checkpoints/m1_epoch_000.safetensors",
    ]
    assert records[0]["ggap"] == pytest.approx(0.1) and records[0]["val_acc"] is None
    assert "metrics" not in records[0] and records[1]["metrics"] == {"lr_at_end": 1e-5}
    assert torch.equal(
        load_file(output / records[1]["file"])["0.weight"], cnn_s_state_dict(1, 0)["0.weight"]
    )
    assert json.loads((output / "zoo.json").read_text())["dataset"] == "mnist"


def test_cli_import_prints_the_report(ray_zoo, tmp_path, capsys):
    output = tmp_path / "raw"
    code = main(
        [
            "zoo",
            "import",
            str(ray_zoo),
            "--output",
            str(output),
            "--architecture",
            "cnn_s",
            "--architecture-kwargs",
            '{"in_channels": 1}',
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "imported 4 models, 9 checkpoints" in printed
    assert "trial_d/checkpoint_000002/checkpoints: model model_0003: parameter" in printed
    assert json.loads((output / "zoo.json").read_text())["architecture_kwargs"] == {
        "in_channels": 1
    }
    assert json.loads((output / "zoo.json").read_text())["num_models"] == 4
