import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sane_hf import ZooConfig, build_model, register_architecture, train_zoo
from sane_hf.cli import main
from sane_hf.zoo.architectures import ACTIVATIONS
from sane_hf.zoo.grouped import GroupedSequential
from sane_hf.zoo.population import ChunkTrainer, data_order, initialize_zoo_model, structural_kwargs
from sane_hf.zoo.tasks import load_dataset_by_name

TINY = {"dataset_kwargs": {"num_samples": 100}, "batch_size": 10}


def _metadata(zoo_dir):
    return [json.loads(line) for line in (zoo_dir / "metadata.jsonl").read_text().splitlines()]


def _rebuild(zoo_dir, record):
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    hp = record["hyperparameters"]
    model = build_model(zoo["architecture"], **zoo["architecture_kwargs"], **structural_kwargs(hp))
    model.load_state_dict(load_file(zoo_dir / record["file"]), strict=True)
    return model.eval()


def test_seed_zoo_writes_the_raw_zoo_format(tmp_path):
    config = ZooConfig(num_models=3, epochs=2, models_per_chunk=2, **TINY)
    zoo_dir = train_zoo(config, tmp_path / "zoo", progress=False)

    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    assert zoo["architecture"] == "cnn_s" and zoo["kind"] == "seed"
    assert zoo["architecture_kwargs"] == {"in_channels": 1, "num_classes": 10}
    assert zoo["epochs"] == [0, 1, 2] and zoo["input_shape"] == [1, 28, 28]
    records = _metadata(zoo_dir)
    assert [(r["model_id"], r["epoch"]) for r in records] == [
        (f"model_{i:04d}", e) for i in range(3) for e in range(3)
    ]
    assert [r["seed"] for r in records[::3]] == [0, 1, 2]
    assert records[0]["hyperparameters"] == {
        "activation": "tanh",
        "dropout": 0.0,
        "init": "uniform",
        "optimizer": "adam",
        "lr": 3e-4,
        "weight_decay": 0.0,
        "batch_size": 10,
    }
    # Epoch 0 is the initialization, reproducible from the seed alone.
    init = initialize_zoo_model(
        "cnn_s", zoo["architecture_kwargs"], records[3]["hyperparameters"], 1
    )
    for key, value in _rebuild(zoo_dir, records[3]).state_dict().items():
        assert torch.equal(value, init.state_dict()[key])
    # The stored metrics are those of the stored weights.
    dataset = load_dataset_by_name("digits", (1, 28, 28), num_samples=100)
    x, y = dataset.test
    for record in records[-3:]:
        with torch.no_grad():
            logits = _rebuild(zoo_dir, record)(x)
        assert record["test_acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
        assert record["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert record["ggap"] == pytest.approx(record["train_acc"] - record["test_acc"])
    assert records[-1]["train_loss"] < records[-3]["train_loss"], "training did not reduce the loss"


def _plain_loop(config, record, architecture_kwargs, input_shape):
    """Train one zoo model alone with torch.optim on the batches the zoo model saw."""
    hp = record["hyperparameters"]
    dataset = load_dataset_by_name("digits", input_shape, **config.dataset_kwargs)
    model = initialize_zoo_model(config.architecture, architecture_kwargs, hp, record["seed"])
    optimizer = {
        "sgd": lambda p: torch.optim.SGD(
            p, hp["lr"], momentum=config.sgd_momentum, weight_decay=hp["weight_decay"]
        ),
        "adam": lambda p: torch.optim.Adam(p, hp["lr"], weight_decay=hp["weight_decay"]),
        "adamw": lambda p: torch.optim.AdamW(p, hp["lr"], weight_decay=hp["weight_decay"]),
    }[hp["optimizer"]](model.parameters())
    x, y = dataset.train
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = torch.from_numpy(data_order(record["seed"], epoch, len(y)))
        for batch in order.split(config.batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize(
    ("architecture", "optimizer", "architecture_kwargs", "input_shape"),
    [
        ("cnn_s", "sgd", {}, None),
        ("cnn_s", "adam", {}, None),
        ("mlp", "adamw", {"hidden": [16]}, (1, 8, 8)),
        # BatchNorm: running statistics must be trained per model and saved.
        ("resnet_bottleneck", "sgd", {"widths": [4, 4, 4, 4]}, (3, 8, 8)),
    ],
)
def test_vectorized_training_matches_a_plain_loop(
    tmp_path, architecture, optimizer, architecture_kwargs, input_shape
):
    # Four models with different lr/wd in one vmapped group.
    config = ZooConfig(
        architecture=architecture,
        architecture_kwargs=architecture_kwargs,
        input_shape=input_shape,
        kind="hyperparameter",
        num_models=None,
        hyperparameters={"optimizer": optimizer, "activation": "relu", "init": "kaiming_uniform"},
        grid={
            "lr": [1e-2, 5e-3] if optimizer == "sgd" else [1e-2, 1e-3],
            "weight_decay": [0.0, 0.1],
        },
        epochs=1,
        **TINY,
    )
    zoo_dir = train_zoo(config, tmp_path / "zoo", progress=False)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    last = [r for r in _metadata(zoo_dir) if r["epoch"] == 1]
    assert len({r["hyperparameters"]["lr"] for r in last}) == 2
    for record in last:
        expected = _plain_loop(config, record, zoo["architecture_kwargs"], zoo["input_shape"])
        trained = load_file(zoo_dir / record["file"])
        assert trained.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(trained[key], value, atol=1e-5, rtol=1e-4, msg=key)
    if architecture == "resnet_bottleneck":
        assert trained["bn1.running_var"].ne(1).all() and trained["bn1.num_batches_tracked"] == 7


def _interrupt_in_epoch(monkeypatch, call: int) -> list[int]:
    """Make the ``call``-th trained epoch raise KeyboardInterrupt (once); returns the epochs trained."""
    original_epoch = ChunkTrainer._train_epoch
    calls = []
    interrupted = []

    def interrupted_epoch(self, bar):
        calls.append(self.epoch)
        if len(calls) == call and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        original_epoch(self, bar)

    monkeypatch.setattr(ChunkTrainer, "_train_epoch", interrupted_epoch)
    return calls


def _interrupted_run(config, zoo_dir, monkeypatch) -> list[int]:
    # Chunk 0 finishes its 3 epochs; chunk 1 saves epoch 1 and dies in epoch 2.
    calls = _interrupt_in_epoch(monkeypatch, call=5)
    with pytest.raises(KeyboardInterrupt):
        train_zoo(config, zoo_dir, progress=False)
    assert {r["model_id"] for r in _metadata(zoo_dir)} == {"model_0000", "model_0001"}
    state = json.loads((zoo_dir / "train_state/chunk_model_0002.json").read_text())
    assert state["epoch"] == 1 and state["model_ids"] == ["model_0002", "model_0003"]
    calls.clear()
    return calls


@pytest.mark.filterwarnings("ignore:.*overlap it:UserWarning")  # the same zoo twice, on purpose
def test_resume_after_interruption_is_bit_exact(tmp_path, monkeypatch):
    config = ZooConfig(num_models=4, epochs=3, models_per_chunk=2, **TINY)
    reference = train_zoo(config, tmp_path / "reference", progress=False)
    calls = _interrupted_run(config, tmp_path / "resumed", monkeypatch)

    resumed = train_zoo(config, tmp_path / "resumed", progress=False)
    assert calls == [2, 3], "resumption retrained finished work"
    assert _metadata(resumed) == _metadata(reference)
    assert not (resumed / "train_state").exists()
    for record in _metadata(reference):
        expected, got = load_file(reference / record["file"]), load_file(resumed / record["file"])
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_with_another_chunk_size_keeps_finished_models(tmp_path, monkeypatch):
    config = ZooConfig(num_models=4, epochs=3, models_per_chunk=2, **TINY)
    calls = _interrupted_run(config, tmp_path, monkeypatch)
    finished = _metadata(tmp_path)

    rechunked = ZooConfig(num_models=4, epochs=3, models_per_chunk=1, **TINY)
    train_zoo(rechunked, tmp_path, progress=False)
    # The two unfinished models restart in chunks of one; the finished ones stay as they were.
    assert calls == [1, 2, 3, 1, 2, 3]
    records = _metadata(tmp_path)
    assert records[: len(finished)] == finished
    assert [(r["model_id"], r["epoch"]) for r in records[len(finished) :]] == [
        (f"model_000{i}", e) for i in (2, 3) for e in range(4)
    ]
    assert not (tmp_path / "train_state").exists()


def test_resume_refuses_a_different_config(tmp_path):
    config = ZooConfig(num_models=1, epochs=2, **TINY)
    train_zoo(config, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different config \(fields \['epochs'\]"):
        train_zoo(ZooConfig(num_models=1, epochs=1, **TINY), tmp_path, progress=False)  # fewer


def test_hyperparameter_zoo_grid_subsampling_and_groups():
    config = ZooConfig(kind="hyperparameter", num_models=40, seeds_per_combination=2, seed=7)
    specs = config.model_specs()
    assert len(specs) == 40 and specs == config.model_specs()
    combos = {(tuple(s.hyperparameters.values()), s.seed) for s in specs}
    assert len(combos) == 40 and {s.seed for s in specs} <= {7, 8}
    other = ZooConfig(kind="hyperparameter", num_models=40, seeds_per_combination=2, seed=8)
    assert [s.hyperparameters for s in other.model_specs()] != [s.hyperparameters for s in specs]
    assert len(ZooConfig(kind="hyperparameter", num_models=None).model_specs()) == 256
    with pytest.raises(ValueError, match="exceeds the 256 models"):
        ZooConfig(kind="hyperparameter", num_models=300).model_specs()
    with pytest.raises(ValueError, match="'swish' is not one of"):
        ZooConfig(kind="hyperparameter", grid={"activation": ["swish"]})
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        ZooConfig(hyperparameters={"momentum": 0.5})


def test_dropout_masks_differ_between_models(tmp_path):
    # Two identical models (same seed and hyperparameters) only differ by their dropout masks.
    config = ZooConfig(
        kind="hyperparameter",
        num_models=None,
        hyperparameters={"dropout": 0.5},
        grid={"lr": [1e-3, 1e-3]},
        epochs=1,
        **TINY,
    )
    zoo_dir = train_zoo(config, tmp_path, progress=False)
    first, second = (load_file(zoo_dir / r["file"]) for r in _metadata(zoo_dir) if r["epoch"] == 1)
    assert not torch.equal(first["0.weight"], second["0.weight"])


def _tiny_linear(activation="tanh", num_classes=10):
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 12),
        ACTIVATIONS[activation](),
        torch.nn.Linear(12, num_classes),
    )


def test_registered_architecture_zoo(tmp_path):
    register_architecture("tiny_linear_zoo_test", _tiny_linear, overwrite=True)
    config = ZooConfig(architecture="tiny_linear_zoo_test", num_models=2, epochs=1, **TINY)
    zoo_dir = train_zoo(config, tmp_path / "zoo", progress=False)
    initial, trained = _metadata(zoo_dir)[-2:]
    assert trained["train_loss"] < initial["train_loss"]
    assert isinstance(_rebuild(zoo_dir, trained)[1], torch.nn.Linear)

    bad = ZooConfig(
        architecture="tiny_linear_zoo_test", architecture_kwargs={"num_classes": 5}, **TINY
    )
    with pytest.raises(ValueError, match=r"returns shape \(2, 5\).*expected \(2, 10\)"):
        train_zoo(bad, tmp_path / "bad", progress=False)


def test_cli_trains_and_resumes_from_a_yaml_config(tmp_path, capsys):
    config_file = tmp_path / "zoo.yaml"
    config_file.write_text("architecture: mlp\narchitecture_kwargs: {hidden: [8]}\nepochs: 1\n")
    args = ["zoo", "train", "--config", str(config_file), "--num-models", "2", "--no-progress"]
    args += ["--dataset", "mnist1d", "--set", "dataset_kwargs.num_samples=60"]
    args += ["--output", str(tmp_path / "zoo")]
    assert main(args) == 0
    zoo = json.loads((tmp_path / "zoo/zoo.json").read_text())
    assert zoo["architecture_kwargs"] == {"hidden": [8], "in_features": 40, "num_classes": 10}
    assert len(_metadata(tmp_path / "zoo")) == 4
    capsys.readouterr()
    rerun = [arg for arg in args if arg != "--no-progress"]  # the bar would show, if anything ran
    assert main(rerun) == 0  # finished: nothing left to train
    assert len(_metadata(tmp_path / "zoo")) == 4
    err = capsys.readouterr().err
    assert "already complete (2 models x 1 epochs), nothing to train" in err and "step" not in err
    assert not (tmp_path / "zoo" / "train_state").exists()  # a finished zoo, for zoo build


def test_a_zoo_extended_with_more_epochs_equals_one_trained_that_long(tmp_path):
    """1 epoch, then 3: byte for byte the zoo trained for 3 epochs at once (two chunks)."""

    def zoo(epochs: int) -> ZooConfig:
        return ZooConfig(architecture="mlp", architecture_kwargs={"hidden": [8]}, num_models=3,
                         models_per_chunk=2, epochs=epochs, dataset="mnist1d",
                         dataset_kwargs={"num_samples": 60})  # fmt: skip

    folders = {"extended": tmp_path / "a" / "zoo", "direct": tmp_path / "b" / "zoo"}
    train_zoo(zoo(1), folders["extended"], progress=False)
    train_zoo(zoo(3), folders["extended"], progress=False)
    train_zoo(zoo(3), folders["direct"], progress=False)
    files = {
        name: {
            str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.endswith(".lock")
        }
        for name, folder in folders.items()
    }
    assert len(_metadata(folders["extended"])) == 3 * 4
    assert files["extended"].keys() == files["direct"].keys()
    assert [
        name for name in files["direct"] if files["extended"][name] != files["direct"][name]
    ] == []
    with pytest.raises(ValueError, match=r"fields \['epochs'\] differ"):  # fewer: refused
        train_zoo(zoo(2), folders["extended"], progress=False)


def _chunk_trainer(architecture, input_shape, num_models=3, **architecture_kwargs):
    config = ZooConfig(architecture=architecture, num_models=num_models, **TINY)
    dataset = load_dataset_by_name("digits", input_shape, num_samples=100)
    kwargs = {**architecture_kwargs, "num_classes": 10}
    return ChunkTrainer(config, kwargs, config.model_specs(), dataset, torch.device("cpu"))


def test_grouped_cpu_step_matches_the_vmapped_step(monkeypatch):
    grouped = _chunk_trainer("cnn_s", (1, 28, 28), in_channels=1)
    monkeypatch.setattr(GroupedSequential, "supports", staticmethod(lambda module: False))
    vmapped = _chunk_trainer("cnn_s", (1, 28, 28), in_channels=1)
    assert grouped.grouped is not None and vmapped.grouped is None

    batch = torch.arange(30).view(3, 10)  # [models, batch]
    expected = vmapped._train_step(vmapped.params, vmapped.buffers, *vmapped._train_batch(batch))
    got = grouped._train_step(grouped.params, grouped.buffers, *grouped._train_batch(batch))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-4, msg=key)
    x = grouped.data.test[0]
    torch.testing.assert_close(
        grouped._logits(grouped.params, grouped.buffers, x),
        vmapped._logits(vmapped.params, vmapped.buffers, x),
    )


def _conv_then_linear(activation="tanh", num_classes=10):
    # The Linear layer acts on [B, C, 1, 1] feature maps: valid, but not a grouped Linear.
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, num_classes, 8), torch.nn.Linear(1, 1), torch.nn.Flatten()
    )


def test_networks_the_grouped_step_cannot_run_train_through_vmap(tmp_path):
    register_architecture("conv_then_linear_zoo_test", _conv_then_linear, overwrite=True)
    trainer = _chunk_trainer("conv_then_linear_zoo_test", (1, 8, 8))
    assert trainer.grouped is None
    config = ZooConfig(
        architecture="conv_then_linear_zoo_test",
        input_shape=(1, 8, 8),
        num_models=2,
        epochs=1,
        **TINY,
    )
    zoo_dir = train_zoo(config, tmp_path, progress=False)
    initial, trained = _metadata(zoo_dir)[-2:]
    assert trained["train_loss"] < initial["train_loss"]
