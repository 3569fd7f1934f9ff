"""Reliability of `embed` / `predict` with the released model folder: the user's networks are
read and checked like `zoo build` reads a zoo (float weights only, finite, confined raw zoos,
named files), the model folder's processor and probe heads are checked on load, and outputs
are replaced whole."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from sane_hf import build_model
from sane_hf.cli import main
from sane_hf.downstream.pretrained import PretrainedSane, embed_networks
from sane_hf.zoo.formats import write_zoo_info, write_zoo_metadata
from sane_hf.zoo.storage import save_zoo_dataset

RELEASED = Path(__file__).parents[2] / "checkpoints" / "sane-cnn-mnist"


def cnn_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("cnn_s", in_channels=1, num_classes=10).state_dict()


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and the last stderr line of one `sane-hf` command."""
    status = main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    return status, lines[-1] if lines else ""


def embed_one(capsys, model: Path, tmp_path: Path) -> tuple[int, str]:
    """`sane-hf embed MODEL net.safetensors` (a CNN-s written beforehand) into ``e.npy``."""
    net, output = str(tmp_path / "net.safetensors"), str(tmp_path / "e.npy")
    return run(capsys, "embed", str(model), net, "--output", output)


def model_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(RELEASED, folder)
    return folder


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------
# the networks: float weights only, finite, files named in every error


@pytest.mark.parametrize("how", ["all_int64", "one_int32_bias"])
def test_integer_weights_are_refused_by_embed_and_predict(tmp_path, capsys, how):
    state = cnn_state()
    if how == "all_int64":
        state = {key: value.round().long() for key, value in state.items()}
    else:
        key = next(key for key in state if key.endswith("bias"))
        state[key] = state[key].round().int()
    save_file(state, tmp_path / "int_net.safetensors")
    for command in ("embed", "predict"):
        output = ["--output", str(tmp_path / ("e.npy" if command == "embed" else "p.json"))]
        status, error = run(
            capsys, command, str(RELEASED), str(tmp_path / "int_net.safetensors"), *output
        )
        assert status == 1
        assert (
            "network 'int_net'" in error
            and "expected float" in error
            and "dtype torch.int" in error
        )
    assert not (tmp_path / "e.npy").exists()


def test_nan_weights_name_network_parameter_and_nan(tmp_path, capsys):
    state = cnn_state()
    state["0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, tmp_path / "nan_net.safetensors")
    status, error = run(
        capsys,
        "embed",
        str(RELEASED),
        str(tmp_path / "nan_net.safetensors"),
        "--output",
        str(tmp_path / "e.npy"),
    )
    assert status == 1
    assert "network 'nan_net'" in error and "'0.weight'" in error and "NaN" in error


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "folder"])
def test_broken_safetensors_files_are_named(tmp_path, capsys, how):
    nets = tmp_path / "nets"
    nets.mkdir()
    save_file(cnn_state(), nets / "good.safetensors")
    bad = nets / "x.safetensors"
    if how == "truncated":
        data = (nets / "good.safetensors").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        bad.write_bytes(b"\x00garbage" * 100)
    elif how == "empty":
        bad.write_bytes(b"")
    else:
        bad.mkdir()
    status, error = run(
        capsys, "embed", str(RELEASED), str(nets), "--output", str(tmp_path / "e.npy")
    )
    assert status == 1
    assert str(bad) in error
    assert ("found a folder" if how == "folder" else "not a complete safetensors file") in error


# ----------------------------------------------------------------------------------------------
# a raw zoo given to embed is confined to its folder, as `zoo build` confines it


def _raw_zoo(root: Path, file: str) -> Path:
    write_zoo_info(
        root,
        {"architecture": "cnn_s", "architecture_kwargs": {"in_channels": 1, "num_classes": 10}},
    )
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(cnn_state(), root / "checkpoints" / "m0_epoch_000.safetensors")
    write_zoo_metadata(
        root,
        [
            {"model_id": "m0", "epoch": 0, "file": "checkpoints/m0_epoch_000.safetensors"},
            {"model_id": "m1", "epoch": 0, "file": file},
        ],
    )
    return root


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_raw_zoo_cannot_make_embed_read_outside_it(tmp_path, capsys, how):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(cnn_state(1), outside / "x.safetensors")
    zoo = tmp_path / "zoo"
    if how == "dotdot":
        _raw_zoo(zoo, "../outside/x.safetensors")
    elif how == "absolute":
        _raw_zoo(zoo, str(outside / "x.safetensors"))
    else:
        _raw_zoo(zoo, "checkpoints/link.safetensors")
        os.symlink(outside / "x.safetensors", zoo / "checkpoints" / "link.safetensors")
    output = tmp_path / "e.npy"
    status, error = run(capsys, "embed", str(RELEASED), str(zoo), "--output", str(output))
    assert status == 1
    assert "zoo folder" in error and "metadata.jsonl" in error
    assert not output.exists()
    # the same rule as zoo build: a clean zoo embeds
    _raw_zoo(zoo, "checkpoints/m0_epoch_000.safetensors")
    (zoo / "checkpoints" / "link.safetensors").unlink(missing_ok=True)
    assert run(capsys, "embed", str(RELEASED), str(zoo), "--output", str(output))[0] == 0


# ----------------------------------------------------------------------------------------------
# the model folder: processor and probe heads checked on load, naming the file and the field


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("std", 0.0, "must be > 0"),
        ("std", float("nan"), "is nan, not finite"),
        ("std", 1e-30, "must be > 0"),
        ("std", -1.0, "must be > 0"),
        ("mean", float("nan"), "is nan, not finite"),
        ("mean", float("inf"), "is inf, not finite"),
    ],
)
def test_processor_statistics_are_checked_on_load(tmp_path, capsys, field, value, message):
    model = model_copy(tmp_path)
    save_file(cnn_state(), tmp_path / "net.safetensors")

    def change(config):
        config["normalization"][field]["0.weight"] = value

    edit_json(model / "preprocessor_config.json", change)
    status, error = embed_one(capsys, model, tmp_path)
    assert status == 1
    assert "preprocessor_config.json" in error and f"normalization {field} of '0.weight'" in error
    assert message in error


def test_alignment_reference_is_only_the_file_inside_the_model_folder(tmp_path, capsys):
    model = model_copy(tmp_path)
    save_file(cnn_state(), tmp_path / "net.safetensors")
    shutil.copy(model / "alignment_reference.safetensors", tmp_path / "elsewhere.safetensors")
    edit_json(
        model / "preprocessor_config.json",
        lambda c: c.update(alignment_reference=str(tmp_path / "elsewhere.safetensors")),
    )
    argv = [
        "embed",
        str(model),
        str(tmp_path / "net.safetensors"),
        "--output",
        str(tmp_path / "e.npy"),
    ]
    status, error = run(capsys, *argv)
    assert status == 1 and "alignment_reference must be 'alignment_reference.safetensors'" in error

    edit_json(
        model / "preprocessor_config.json",
        lambda c: c.update(alignment_reference="alignment_reference.safetensors"),
    )
    reference = load_file(model / "alignment_reference.safetensors")
    reference["0.weight"][0, 0, 0, 0] = float("nan")
    save_file(reference, model / "alignment_reference.safetensors")
    status, error = run(capsys, *argv)
    assert (
        status == 1 and "alignment reference" in error and "'0.weight'" in error and "NaN" in error
    )

    save_file(
        {k: v.nan_to_num().long() for k, v in reference.items()},
        model / "alignment_reference.safetensors",
    )
    status, error = run(capsys, *argv)
    assert status == 1 and "alignment reference" in error and "expected float" in error


def _set_head_array(model: Path, key: str, change) -> None:
    tensors = load_file(model / "probe_heads.safetensors")
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, model / "probe_heads.safetensors")


@pytest.mark.parametrize(
    ("key", "change", "message"),
    [
        ("test_acc.feature_std", lambda t: t.fill_(float("nan")), "non-finite"),
        ("test_acc.feature_std", lambda t: t.zero_(), "feature_std must be > 0"),
        ("test_acc.intercept", lambda t: t.fill_(float("nan")), "non-finite"),
        ("test_acc.coef", lambda t: t[:5], "has shape [5], expected ["),
        ("test_acc.intercept", lambda t: t.long(), "expected float"),
    ],
)
def test_probe_heads_are_checked_on_load(tmp_path, capsys, key, change, message):
    model = model_copy(tmp_path)
    save_file(cnn_state(), tmp_path / "net.safetensors")
    _set_head_array(model, key, change)
    status, error = run(capsys, "predict", str(model), str(tmp_path / "net.safetensors"))
    assert status == 1
    assert "probe_heads.safetensors" in error and key.split(".")[0] in error and message in error


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("embedding_std", lambda t: t.zero_()), "embedding_std must be > 0"),
        (("train_embeddings", lambda t: t.fill_(float("nan"))), "must be finite"),
        (("train_statistics", lambda t: t.long()), "must be finite floating-point"),
        (
            lambda d: d["validation_scores"].update(embedding_distance=["x"]),
            "must be finite numbers",
        ),
        (lambda d: d["validation_scores"].update(embedding_distance=[float("nan")]), "finite"),
    ],
)
def test_the_in_distribution_reference_is_checked_on_load(tmp_path, capsys, edit, message):
    model = model_copy(tmp_path)
    save_file(cnn_state(), tmp_path / "net.safetensors")
    if isinstance(edit, tuple):
        key, change = edit
        tensors = load_file(model / "in_distribution.safetensors")
        tensors[key] = change(tensors[key].clone())
        save_file(tensors, model / "in_distribution.safetensors")
    else:
        edit_json(model / "in_distribution.json", edit)
    status, error = run(capsys, "predict", str(model), str(tmp_path / "net.safetensors"))
    assert status == 1
    assert "in_distribution" in error and message in error


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["heads"][0].pop("kind"), "heads[0].kind is None"),
        (lambda d: d["heads"][0].update(classes="abc"), "heads[0].classes is 'abc'"),
        (lambda d: d.update(heads={}), "`heads` must be a non-empty list"),
        (
            lambda d: d["heads"][0].update(kind="logistic"),
            "(logistic head, 0 classes",
        ),
    ],
)
def test_malformed_probe_head_descriptions_are_one_line_errors(tmp_path, capsys, change, message):
    model = model_copy(tmp_path)
    save_file(cnn_state(), tmp_path / "net.safetensors")
    edit_json(model / "probe_heads.json", change)
    status, error = run(capsys, "predict", str(model), str(tmp_path / "net.safetensors"))
    assert status == 1 and "probe_heads" in error and message in error


def test_non_finite_sane_weights_are_refused_on_load(tmp_path, capsys):
    model = model_copy(tmp_path)
    save_file(cnn_state(), tmp_path / "net.safetensors")
    weights = load_file(model / "model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key].clone().fill_(float("nan"))
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    status, error = embed_one(capsys, model, tmp_path)
    assert status == 1 and "model.safetensors" in error and key in error and "NaN" in error


# ----------------------------------------------------------------------------------------------
# outputs are replaced whole


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_embed_replaces_its_output_atomically(tmp_path, capsys, suffix, monkeypatch):
    save_file(cnn_state(), tmp_path / "net.safetensors")
    output = tmp_path / f"embeddings{suffix}"
    argv = ["embed", str(RELEASED), str(tmp_path / "net.safetensors"), "--output", str(output)]
    assert main(argv) == 0
    before = output.read_bytes()

    import pyarrow.parquet

    def killed(table, where, *args, **kwargs):
        Path(where).write_bytes(b"half")
        raise KeyboardInterrupt

    def killed_npy(file, *args, **kwargs):
        file.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pyarrow.parquet, "write_table", killed)
    monkeypatch.setattr(np, "save", killed_npy)
    assert main(argv) == 130
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["net.safetensors", output.name])
    if suffix == ".parquet":
        assert pq.read_table(output).num_rows == 1
    else:
        assert np.load(output).shape == (1, 128)


def test_embed_streams_a_folder_in_chunks(tmp_path):
    """Embed reads, prepares and encodes a folder chunk by chunk: the result equals one big
    batch, and the rows keep the order of the files."""
    nets = tmp_path / "nets"
    nets.mkdir()
    for seed in range(5):
        save_file(cnn_state(seed), nets / f"n{seed}.safetensors")
    sane = PretrainedSane.from_pretrained(RELEASED)
    chunked = embed_networks(sane, [nets], output=tmp_path / "a.parquet", chunk_size=2)
    whole = embed_networks(sane, [nets], output=tmp_path / "b.parquet", chunk_size=256)
    assert chunked.ids == whole.ids == [f"n{seed}" for seed in range(5)]
    torch.testing.assert_close(chunked.mean, whole.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.layer_means, whole.layer_means, rtol=1e-5, atol=1e-6)
    assert pq.read_table(tmp_path / "a.parquet").to_pydict()["id"] == chunked.ids


def test_cli_probe_without_baselines(zoo, sane, tmp_path, capsys):
    sane.save_pretrained(tmp_path / "sane")
    save_zoo_dataset(zoo, tmp_path / "zoo")
    argv = ["probe", "--model", str(tmp_path / "sane"), "--dataset", str(tmp_path / "zoo")]
    argv += ["--properties", "epoch", "--baselines", "none", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert {r["features"] for r in saved["results"]} == {"SANE"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "seed must be >= 0, got -1"),
        (
            ["--num-candidates", "2", "--num-samples", "3"],
            "num_candidates (2) must be >= num_samples",
        ),
        (["--prompt-split", "val"], "prompt_split must be train, validation or test"),
        (["--prompt-metric", "flops"], "prompt_metric 'flops' is not a column of the prompt zoo"),
        (["--device", "cuda"], "no CUDA GPU is available"),
        (["--set", "architecture_kwargs={hidden_units: 3}"], "architecture_kwargs"),
    ],
)
def test_sample_settings_are_checked_before_the_model_loads(zoo, tmp_path, capsys, argv, message):
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is available")
    save_zoo_dataset(zoo, tmp_path / "zoo")
    (tmp_path / "not-a-model").mkdir()  # loading it would fail: the settings must fail first
    command = [
        "sample",
        "--model",
        str(tmp_path / "not-a-model"),
        "--dataset",
        str(tmp_path / "zoo"),
    ]
    status, error = run(capsys, *command, "--output-dir", str(tmp_path / "out"), *argv)
    assert status == 1 and message in error
    assert not (tmp_path / "out").exists()
