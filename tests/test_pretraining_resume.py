"""Pretraining that loses nothing (issue 13 item 3): atomic checkpoints, ``latest`` = the newest
complete one, metrics without repeated steps, resumes refused on a changed config, the run
saved before the push."""

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sane_hf import cli
from sane_hf.pretraining.loop import read_metrics


def arguments(zoo: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--config",
        "tiny",
        "--dataset",
        str(zoo),
        "--output-dir",
        str(output_dir),
        "--report-to",
        "none",
        "--logging-steps",
        "1",
        "--batch-size",
        "8",
        *extra,
    ]


def error_lines(stderr: str) -> list[str]:
    """The CLI's error lines (progress bars also go to stderr)."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("sane-hf")]


def losses(output_dir: Path) -> dict[int, float]:
    steps = [m["step"] for m in read_metrics(output_dir) if "loss" in m]
    assert len(steps) == len(set(steps)), f"repeated steps in metrics.jsonl: {steps}"
    return {m["step"]: m["loss"] for m in read_metrics(output_dir) if "loss" in m}


def test_latest_skips_incomplete_checkpoints_and_metrics_continue(tiny_digits_zoo, tmp_path):
    common = ["--max-steps", "5", "--checkpointing-steps", "1"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert cli.main(["--debug", *arguments(tiny_digits_zoo, reference, *common)]) == 0
    assert (
        cli.main(["--debug", *arguments(tiny_digits_zoo, run, *common, "--stop-at-step", "4")]) == 0
    )
    # A save killed by an older version (files missing) and one killed now (a .partial folder).
    (run / "checkpoint-4" / "optimizer.safetensors").unlink()
    (run / "checkpoint-5.partial").mkdir()
    resume = arguments(tiny_digits_zoo, run, *common, "--resume-from-checkpoint", "latest")
    assert cli.main(["--debug", *resume]) == 0

    assert losses(run) == losses(reference)  # resumed at step 3, steps 4 and 5 logged once
    # tiny keeps two checkpoints; the killed save's .partial folder became checkpoint-5
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_a_resume_with_a_changed_config_is_refused_unless_allowed(
    tiny_digits_zoo, tmp_path, capsys
):
    run = tmp_path / "run"
    first = arguments(tiny_digits_zoo, run, "--max-steps", "4", "--checkpointing-steps", "2")
    assert cli.main([*first, "--stop-at-step", "2"]) == 0
    saved = (run / "pretraining_config.yaml").read_text()
    capsys.readouterr()

    changed = [*first, "--batch-size", "4", "--learning-rate", "1e-3"]
    assert cli.main([*changed, "--resume-from-checkpoint", "latest"]) == 1
    [error] = error_lines(capsys.readouterr().err)
    assert "changed settings ['batch_size', 'learning_rate']" in error
    assert "--allow-config-change" in error
    assert (run / "pretraining_config.yaml").read_text() == saved

    # The same settings with another stop/logging plan are a plain resume.
    assert cli.main([*first, "--resume-from-checkpoint", "latest", "--logging-steps", "2"]) == 0
    assert (run / "pretraining_config.yaml").read_text() == saved

    allowed = [*changed, "--resume-from-checkpoint", str(run / "checkpoint-2")]
    assert cli.main([*allowed, "--allow-config-change"]) == 0
    assert (run / "pretraining_config.yaml").read_text() == saved  # the original is kept
    resumed = yaml.safe_load((run / "pretraining_config.resume-2.yaml").read_text())
    assert resumed["batch_size"] == 4


def test_a_failed_push_is_one_line_after_everything_is_saved(
    tiny_digits_zoo, tmp_path, capsys, monkeypatch
):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    # httpx (huggingface_hub 1.x) or httpx2 (2.x): the package of the client's responses
    http = importlib.import_module(huggingface_hub.errors.Response.__module__.split(".")[0])
    request = http.Request("POST", "https://huggingface.co/api/repos/create")

    def refuse(self, repo_id, **kwargs):
        response = http.Response(401, request=request)
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    run = tmp_path / "run"
    argv = arguments(tiny_digits_zoo, run, "--max-steps", "2", "--push-to-hub", "--hub-model-id")
    assert cli.main([*argv, "user/sane"]) == 1
    [error] = error_lines(capsys.readouterr().err)
    assert "repo user/sane failed (HTTP 401" in error and "sane-hf push" in error
    for name in ("model.safetensors", "config.json", "sane_zoo.json", "training_summary.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "training_summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_sigkill_at_random_points_then_latest_resumes_to_the_uninterrupted_result(
    tiny_digits_zoo, tmp_path
):
    """Kill -9 three times at random points of a checkpoint-every-step run; each resume picks
    a complete checkpoint and the final losses equal those of an uninterrupted run."""
    common = ["--max-steps", "40", "--checkpointing-steps", "1", "--checkpoints-total-limit", "2"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert cli.main(["--debug", *arguments(tiny_digits_zoo, reference, *common)]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "sane_hf",
        "--debug",
        *arguments(tiny_digits_zoo, run, *common),
    ]
    rng = random.Random(0)
    for _ in range(3):
        resume = ["--resume-from-checkpoint", "latest"] if list(run.glob("checkpoint-*")) else []
        process = subprocess.Popen([*command, *resume], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    resume = ["--resume-from-checkpoint", "latest"] if list(run.glob("checkpoint-*")) else []
    result = subprocess.run(
        [*command, *resume], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(run) == losses(reference)
