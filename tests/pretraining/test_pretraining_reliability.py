"""Reliability of pretraining output folders and settings: one run per folder, bad values
refused before any work, a diverging run stopped before it saves NaN weights, files with the
user's permissions."""

import os
import re
import stat
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_pretraining import arguments as pretrain_arguments

from sane_hf import cli
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import read_metrics
from sane_hf.zoo.formats import PRETRAINING_LOCK_FILE, zoo_writer_lock


def arguments(zoo: Path, output_dir: Path, *extra: str) -> list[str]:
    """``sane-hf pretrain`` with the tiny preset, logging every step, without trackers."""
    return ["pretrain", *pretrain_arguments(zoo, output_dir, *extra)]


def error_line(capsys) -> str:
    """The CLI's one error line (after any progress bar's carriage returns)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line[line.index("sane-hf ") :] for line in err.splitlines() if "sane-hf " in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("second", ["new_run", "resume_latest"])
def test_a_second_run_on_one_output_dir_is_refused_at_once(
    tiny_digits_zoo, tmp_path, capsys, second
):
    output = tmp_path / "run"
    argv = arguments(tiny_digits_zoo, output, "--max-steps", "2", "--checkpointing-steps", "1")
    assert cli.main(argv) == 0
    lines_before = read_metrics(output)
    extra = ["--seed", "7"] if second == "new_run" else ["--resume-from-checkpoint", "latest"]
    with zoo_writer_lock(output, PRETRAINING_LOCK_FILE):  # the first run, still going
        assert cli.main([*argv, *extra]) == 1
    error = error_line(capsys)
    assert f"{output} is being written by another process" in error
    assert read_metrics(output) == lines_before
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_a_run_without_dataset_creates_no_output_folder(tmp_path, capsys):
    output = tmp_path / "run"
    assert cli.main(["pretrain", "--config", "tiny", "--output-dir", str(output)]) == 1
    assert "no dataset" in error_line(capsys)
    assert not output.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--weight-decay", "-1"], "weight_decay must be >= 0, got -1"),
        (["--set", "model.n_layer=6"], "unknown key(s) ['n_layer']"),
        (["--set", "model.d_model=abc"], "must be int or null, got 'abc'"),
        (["--set", "model.dropout=1.5"], "model: dropout must lie in [0, 1), got 1.5"),
        (["--set", "adam_betas=[0.9, 1.5]"], "adam_betas must be two numbers in [0, 1)"),
        (["--set", "adam_betas=[-0.1, 0.9]"], "adam_betas must be two numbers in [0, 1)"),
        (["--stop-at-step", "-1"], "stop_at_step must be a positive integer, got -1"),
    ],
)
def test_bad_values_are_refused_in_one_line_before_any_work(tmp_path, capsys, argv, message):
    output = tmp_path / "run"
    missing_zoo = tmp_path / "no-such-zoo"  # refused before the dataset is even looked at
    assert cli.main(arguments(missing_zoo, output, *argv)) == 1
    assert message in error_line(capsys)
    assert not output.exists()
    with pytest.raises(ValueError, match=re.escape(message)):  # the API refuses them alike
        PretrainingConfig(**_as_fields(argv))


def _as_fields(argv: list[str]) -> dict:
    """The API form of one flag (``--weight-decay -1`` -> ``weight_decay=-1``) or --set."""
    if argv[0] == "--set":
        key, value = argv[1].split("=", 1)
        if key.startswith("model."):
            return {"model": {"preset": "tiny", key.removeprefix("model."): yaml.safe_load(value)}}
        return {key: yaml.safe_load(value)}
    return {argv[0].removeprefix("--").replace("-", "_"): yaml.safe_load(argv[1])}


def test_a_diverging_run_stops_keeping_the_last_good_checkpoint(tiny_digits_zoo, tmp_path, capsys):
    output = tmp_path / "run"
    argv = arguments(
        tiny_digits_zoo,
        output,
        "--max-steps",
        "30",
        "--checkpointing-steps",
        "1",
        "--learning-rate",
        "1e30",
        "--warmup-fraction",
        "0",
        "--set",
        "max_grad_norm=null",
    )
    assert cli.main(argv) == 1
    error = error_line(capsys)
    assert "the training loss became non-finite (NaN/Inf) by step" in error
    assert not (output / "model.safetensors").exists()
    saved = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if saved:
        assert f"the last good checkpoint is {saved[-1]}" in error
        assert all(v.isfinite().all() for v in load_file(saved[-1] / "model.safetensors").values())
    else:
        assert "no checkpoint was saved" in error


def test_pretraining_files_get_the_users_umask(tiny_digits_zoo, tmp_path):
    previous = os.umask(0o022)
    try:
        argv = arguments(
            tiny_digits_zoo, tmp_path / "run", "--max-steps", "1", "--checkpointing-steps", "1"
        )
        assert cli.main(argv) == 0
    finally:
        os.umask(previous)
    files = [
        *(tmp_path / "run").glob("*.safetensors"),
        *(tmp_path / "run").glob("checkpoint-1/*.safetensors"),
    ]
    assert {"model.safetensors", "rng_state_0.safetensors", "optimizer.safetensors"} <= {
        f.name for f in files
    }
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {
        f.name: "0o644" for f in files
    }
