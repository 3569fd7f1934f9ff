"""SANE pretraining end to end on a real tiny digits zoo (``tiny_digits_zoo``), on CPU."""

import argparse
import importlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sane_hf import ProbeHeads, SaneModel, SaneProcessor, cli
from sane_hf.downstream.ood import InDistributionReference
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import (
    build_model_config,
    one_cycle_schedule,
    read_metrics,
    split_tokens,
)
from sane_hf.utils.config import add_config_arguments, config_from_args
from sane_hf.zoo.dataset import build_zoo_dataset
from sane_hf.zoo.storage import load_zoo_dataset


def main(argv: list[str]) -> int:
    """``sane-hf pretrain ARGV``, with errors raised (--debug) instead of printed."""
    return cli.main(["--debug", "pretrain", *argv])


def arguments(zoo: Path, output_dir: Path, *extra: str) -> list[str]:
    """The tiny preset, logging every step, without trackers (TensorBoard is tested once)."""
    return [
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
        *extra,
    ]


def training_losses(output_dir: Path) -> dict[int, float]:
    """Loss per step; every step appears once, also after a resume."""
    steps = [m["step"] for m in read_metrics(output_dir) if "loss" in m]
    assert len(steps) == len(set(steps)), f"repeated steps in metrics.jsonl: {steps}"
    return {m["step"]: m["loss"] for m in read_metrics(output_dir) if "loss" in m}


def parse(*argv: str) -> PretrainingConfig:
    """The config `sane-hf pretrain` builds from ``argv`` (preset or file, flags, --set)."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainingConfig)
    return config_from_args(PretrainingConfig, parser.parse_args(argv))


def test_config_sources_apply_in_order(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "dataset: zoo\nlearning_rate: 1e-4\nweight_decay: 0\nmodel:\n  preset: tiny\n  d_model: 64\n"
    )
    config = parse(
        "--config",
        str(config_file),
        "--learning-rate",
        "3e-4",
        "--set",
        "learning_rate=1e-3",
        "--set",
        "model.n_layers=3",
        "--set",
        "adam_betas=[0, 0.99]",
    )
    assert config.learning_rate == 1e-3  # --set wins over the flag, the flag over the file
    assert config.weight_decay == 0.0 and isinstance(config.weight_decay, float)
    assert config.model.to_dict() == {"preset": "tiny", "d_model": 64, "n_layers": 3}
    assert config.adam_betas == [0.0, 0.99] and isinstance(config.adam_betas[0], float)
    assert parse("--config", "tiny").model.preset == "tiny"  # a preset by name


@pytest.mark.parametrize(
    ("preset", "tokensize", "model_shape"),
    [("cnn", 289, (1024, 8, 8, 64, 128)), ("resnet18", 288, (2048, 8, 16, 256, 128))],
)
def test_reference_presets_match_the_paper(preset, tokensize, model_shape):
    config = parse("--config", preset)
    model = build_model_config(config, tokensize)
    assert (model.d_model, model.n_layers, model.n_heads, model.windowsize, model.latent_dim) == (
        model_shape
    )
    training = (config.batch_size, config.learning_rate, config.weight_decay, config.num_epochs)
    assert training == (32, 1e-4, 3e-9, 50)
    assert config.noise_sigma == 0.1 and config.permutation


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "learning_rat=1e-3"], "unknown key.*learning_rat.*valid keys"),
        (["--learning-rate", "fast"], "learning_rate"),
        (["--set", "model.preset"], "key=value"),
        (["--mixed-precision", "fp8"], "mixed_precision must be one of"),
        (["--set", "model={d_model: 64}"], "needs a `preset`"),
    ],
)
def test_config_errors_name_the_problem(argv, message):
    with pytest.raises(ValueError, match=message):
        parse("--config", "tiny", *argv)


def test_float16_zoos_stay_float16_in_memory(tiny_digits_zoo):
    zoo = load_zoo_dataset(tiny_digits_zoo)
    half = build_zoo_dataset(tiny_digits_zoo.parent / "raw", dtype="float16", progress=False)
    tokens = split_tokens(zoo.splits["train"], zoo.metadata.layout)
    half_tokens = split_tokens(half.splits["train"], zoo.metadata.layout)
    assert (tokens.dtype, half_tokens.dtype) == (torch.float32, torch.float16)
    assert torch.equal(half_tokens, tokens.half())


def test_cli_pretraining_lowers_the_reconstruction_loss(tiny_digits_zoo, tmp_path, fake_hub):
    output_dir = tmp_path / "run"
    argv = arguments(tiny_digits_zoo, output_dir, "--max-steps", "30", "--epoch-size", "96")
    argv += ["--report-to", "tensorboard", "--push-to-hub", "true", "--hub-model-id", "user/sane"]
    argv += ["--checkpointing-steps", "15"]
    assert cli.main(["pretrain", *argv]) == 0

    metrics = read_metrics(output_dir)
    train = [m["reconstruction_loss"] for m in metrics if "loss" in m]
    validation = [m for m in metrics if "val_r2" in m]
    assert len(train) == 30 and len(validation) == 10  # 96 windows of 32: 3 steps per epoch
    assert sum(train[-5:]) / 5 < 0.85 * sum(train[:5]) / 5
    assert validation[-1]["val_mse"] < validation[0]["val_mse"]
    assert validation[-1]["val_r2"] > 0.1
    assert all(0 <= m["data_wait_fraction"] < 1 for m in metrics if "data_wait_fraction" in m)

    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["steps"] == 30 and summary["val_r2"] == validation[-1]["val_r2"]
    assert list(output_dir.glob("sane-pretraining/events.out.tfevents.*"))
    zoo_metadata = json.loads((output_dir / "sane_zoo.json").read_text())
    assert zoo_metadata == json.loads((tiny_digits_zoo / "sane_zoo.json").read_text())
    assert "library_name: sane-hf" in (output_dir / "README.md").read_text()
    model = SaneModel.from_pretrained(output_dir)
    assert (model.config.d_model, model.config.latent_dim, model.config.tokensize) == (32, 16, 289)
    # the run writes its processor: the zoo's statistics and its alignment reference
    processor = SaneProcessor.from_pretrained(output_dir)
    assert processor.normalization.to_dict() == zoo_metadata["normalization"]
    assert processor.reference is not None and processor.architecture == "cnn_s"
    assert processor.max_positions == list(model.config.max_positions)
    # ... and probe heads fitted on the zoo, whose test scores the card reports
    heads = ProbeHeads.from_pretrained(output_dir)
    assert {"test_acc", "epoch"} <= set(heads.names)
    # ... the in-distribution reference beside them, and the zoo's provenance in the processor
    assert InDistributionReference.from_pretrained(output_dir) is not None
    assert processor.provenance["architecture"] == "cnn_s"
    assert processor.provenance["biases_at_init"] == "zero"
    card = (output_dir / "README.md").read_text()
    assert "## How the zoo's networks were made" in card and "## Probe heads" in card

    # The fake Hub checks our use of the client, not the real upload path.
    pushed = fake_hub.repo_files("user/sane")
    assert {"config.json", "model.safetensors", "sane_zoo.json", "README.md"} <= set(pushed)
    assert {"preprocessor_config.json", "alignment_reference.safetensors"} <= set(pushed)
    assert {"probe_heads.json", "probe_heads.safetensors"} <= set(pushed)
    assert {"in_distribution.json", "in_distribution.safetensors"} <= set(pushed)
    assert pushed["model.safetensors"] == (output_dir / "model.safetensors").read_bytes()
    assert "pretraining_config.yaml" in pushed
    assert (output_dir / "checkpoint-30").is_dir()
    assert not any(path.startswith("checkpoint-") for path in pushed)


def test_resumed_run_continues_the_uninterrupted_loss_curve(tiny_digits_zoo, tmp_path):
    # Gradient accumulation, checkpoint rotation and a kill between checkpoints, all at once.
    common = ["--max-steps", "6", "--gradient-accumulation-steps", "2", "--batch-size", "8"]
    common += ["--checkpointing-steps", "2", "--checkpoints-total-limit", "2"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    main(arguments(tiny_digits_zoo, uninterrupted, *common))
    main(arguments(tiny_digits_zoo, interrupted, *common, "--stop-at-step", "5"))
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert not (interrupted / "model.safetensors").exists()
    main(arguments(tiny_digits_zoo, interrupted, *common, "--resume-from-checkpoint", "latest"))

    expected = training_losses(uninterrupted)
    assert sorted(expected) == list(range(1, 7))
    assert training_losses(interrupted) == expected
    final_weights = [load_file(run / "model.safetensors") for run in (uninterrupted, interrupted)]
    assert all(torch.equal(final_weights[0][k], final_weights[1][k]) for k in final_weights[0])


def test_compiled_run_saves_a_model_and_checkpoints_that_load_plainly(
    tiny_digits_zoo, tmp_path, monkeypatch
):
    """`torch_compile: true` wraps the model (keys `_orig_mod.*`); nothing saved may carry it.

    The wrapper is the same for every dynamo backend; dynamo's plain `eager` backend stands in
    for inductor here, whose kernel compilation would take most of a minute on a 2-core CPU.
    """
    compile_model = torch.compile

    def compile_eagerly(model, **settings):
        assert settings.pop("backend") == "inductor"  # what torch_compile asks Accelerate for
        settings.pop("mode", None)  # inductor's
        settings.pop("options", None)
        return compile_model(model, backend="eager", **settings)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    output_dir = tmp_path / "compiled"
    extra = ["--set", "torch_compile=true", "--max-steps", "2", "--checkpointing-steps", "1"]
    main(arguments(tiny_digits_zoo, output_dir, *extra))
    _, info = SaneModel.from_pretrained(output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    checkpoint_keys = load_file(output_dir / "checkpoint-1" / "model.safetensors").keys()
    assert checkpoint_keys == load_file(output_dir / "model.safetensors").keys()


def run_two_processes(zoo: Path, output_dir: Path, *extra: str) -> dict:
    """``python -m sane_hf pretrain`` in two CPU processes (torchrun, gloo); returns the summary."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    command += ["2", "-m", "sane_hf", "pretrain", *arguments(zoo, output_dir, *extra)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "training_summary.json").read_text())


@pytest.mark.slow
def test_two_processes_train_one_bf16_model_on_different_data_and_resume(tiny_digits_zoo, tmp_path):
    # dropout draws from each process's own RNG, which the checkpoint keeps per rank
    common = ["--max-steps", "3", "--mixed-precision", "bf16", "--set", "model.dropout=0.1"]
    output_dir = tmp_path / "ddp"
    summary = run_two_processes(tiny_digits_zoo, output_dir, *common, "--checkpointing-steps", "2")
    first, second = summary["processes"]
    assert summary["num_processes"] == 2 and (first["rank"], second["rank"]) == (0, 1)
    assert first["batch_checksum"] != second["batch_checksum"]  # each rank its own windows
    assert first["parameter_norm"] == second["parameter_norm"]  # gradients were all-reduced

    checkpoint = output_dir / "checkpoint-2"
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= {
        path.name for path in checkpoint.iterdir()
    }
    resumed = tmp_path / "resumed"
    run_two_processes(
        tiny_digits_zoo, resumed, *common, "--resume-from-checkpoint", str(checkpoint)
    )
    assert training_losses(resumed) == {3: training_losses(output_dir)[3]}
    final_weights = [load_file(run / "model.safetensors") for run in (output_dir, resumed)]
    assert all(torch.equal(final_weights[0][k], final_weights[1][k]) for k in final_weights[0])


def learning_rates(total_steps: int, warmup_fraction: float) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    scheduler = one_cycle_schedule(optimizer, total_steps, warmup_fraction)
    rates = []
    for _ in range(total_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedule_is_torch_one_cycle_for_normal_runs():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-3, total_steps=40, pct_start=0.3, cycle_momentum=False
    )
    expected = []
    for _ in range(40):
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert learning_rates(40, 0.3) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("total_steps", "warmup_fraction"), [(10, 0.1), (6, 0.1), (3, 0.3), (1, 0.3), (5, 0.0)]
)
def test_schedule_of_a_warmup_of_one_step_or_less_starts_at_the_peak(total_steps, warmup_fraction):
    # torch's OneCycleLR divides by zero for the first case and starts at the final rate (1/25e4
    # of the peak) in the others.
    rates = learning_rates(total_steps, warmup_fraction)
    assert rates[0] == pytest.approx(1e-3)
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))
    if total_steps > 1:
        assert rates[-1] == pytest.approx(1e-3 / 25e4)


def test_warmup_fraction_must_lie_in_zero_to_one():
    assert parse("--config", "tiny", "--warmup-fraction", "0").warmup_fraction == 0.0
    for value in ("1", "-0.1"):
        with pytest.raises(ValueError, match=r"warmup_fraction must lie in \[0, 1\), got"):
            parse("--config", "tiny", "--warmup-fraction", value)


# Nothing lost: atomic checkpoints, ``latest`` = the newest complete one,
# metrics without repeated steps, resumes refused on a changed config, the run saved before the
# push.


def error_lines(stderr: str) -> list[str]:
    """The CLI's error lines (progress bars also go to stderr)."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("sane-hf")]


def test_latest_skips_incomplete_checkpoints_and_metrics_continue(tiny_digits_zoo, tmp_path):
    common = ["--max-steps", "5", "--checkpointing-steps", "1"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(arguments(tiny_digits_zoo, reference, *common)) == 0
    assert main(arguments(tiny_digits_zoo, run, *common, "--stop-at-step", "4")) == 0
    # A save killed by an older version (files missing) and one killed now (a .partial folder).
    (run / "checkpoint-4" / "optimizer.safetensors").unlink()
    (run / "checkpoint-5.partial").mkdir()
    resume = arguments(tiny_digits_zoo, run, *common, "--resume-from-checkpoint", "latest")
    assert main(resume) == 0

    # resumed at step 3: the losses of the uninterrupted run, steps 4 and 5 logged once
    assert training_losses(run) == training_losses(reference)
    # tiny keeps two checkpoints; the killed save's .partial folder became checkpoint-5
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_a_resume_with_a_changed_config_is_refused_unless_allowed(
    tiny_digits_zoo, tmp_path, capsys
):
    run = tmp_path / "run"
    first = [
        "pretrain",
        *arguments(tiny_digits_zoo, run, "--max-steps", "4", "--checkpointing-steps", "2"),
    ]
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
    argv = ["pretrain", *arguments(tiny_digits_zoo, run, "--max-steps", "2", "--push-to-hub")]
    assert cli.main([*argv, "--hub-model-id", "user/sane"]) == 1
    [error] = error_lines(capsys.readouterr().err)
    assert "user/sane failed: HTTP 401" in error and "sane-hf push" in error
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
    # Both runs with one thread (float sums depend on the thread count); the uninterrupted one
    # in this process, the killed ones in subprocesses.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pretrain = [sys.executable, "-m", "sane_hf", "pretrain"]
    threads = torch.get_num_threads()
    try:  # --threads: the CLI otherwise sets the threads itself (OMP_NUM_THREADS, free CPUs)
        argv = ["--threads", "1", "pretrain", *arguments(tiny_digits_zoo, reference, *common)]
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    command = [*pretrain, *arguments(tiny_digits_zoo, run, *common)]
    rng = random.Random(0)
    for _ in range(3):
        resume = ["--resume-from-checkpoint", "latest"] if list(run.glob("checkpoint-*")) else []
        process = subprocess.Popen([*command, *resume], env=env, stderr=subprocess.DEVNULL)
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
    assert training_losses(run) == training_losses(reference)
