"""``training/pretrain_sane.py`` (the examples-style Accelerate script) trains exactly like
``sane-hf pretrain``: same seed, same losses, step by step, so the two cannot drift apart."""

import importlib.util
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from sane_hf import ProbeHeads, SaneModel, SaneProcessor, cli
from sane_hf.pretraining.loop import read_metrics

SCRIPT = Path(__file__).parents[1] / "training" / "pretrain_sane.py"


def losses(output_dir: Path) -> list[dict[str, float]]:
    """Every logged step's loss terms and learning rate, and the validation metrics."""
    keys = ("loss", "reconstruction_loss", "contrastive_loss", "learning_rate", "val_mse")
    return [
        {k: m[k] for k in keys if k in m} | {"step": m["step"]} for m in read_metrics(output_dir)
    ]


@pytest.fixture(scope="module")
def script():
    """The script as a module (what `accelerate launch training/pretrain_sane.py` runs), whose
    `main(argv)` resets Accelerate's process-wide singletons after each run."""
    spec = importlib.util.spec_from_file_location("pretrain_sane", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def main(argv: list[str]) -> dict:
        try:
            return module.main(argv)
        finally:
            AcceleratorState._reset_state()
            GradientState._reset_state()

    return main


def test_script_gives_the_losses_of_sane_hf_pretrain(script, tiny_digits_zoo, tmp_path):
    shared = ["--set", "max_steps=4", "--set", "logging_steps=1", "--set", "seed=3"]
    shared += ["--set", "epoch_size=64", "--set", "batch_size=16", "--set", "report_to=none"]
    script_argv = ["--dataset_name", str(tiny_digits_zoo), "--config", "tiny", *shared]
    script([*script_argv, "--output_dir", str(tmp_path / "script"), "--checkpointing_steps", "2"])
    cli_argv = ["--config", "tiny", "--dataset", str(tiny_digits_zoo)]
    assert (
        cli.main(["--debug", "pretrain", *cli_argv, "--output-dir", str(tmp_path / "cli"), *shared])
        == 0
    )

    script_losses, cli_losses = losses(tmp_path / "script"), losses(tmp_path / "cli")
    assert [m["step"] for m in script_losses if "loss" in m] == [1, 2, 3, 4]
    assert script_losses == cli_losses
    # The same release folder: model, processor, probe heads, and the checkpoints asked for.
    assert (
        SaneModel.from_pretrained(tmp_path / "script").config
        == SaneModel.from_pretrained(tmp_path / "cli").config
    )
    SaneProcessor.from_pretrained(tmp_path / "script")
    assert ProbeHeads.from_pretrained(tmp_path / "script").test_scores()
    checkpoints = sorted(p.name for p in (tmp_path / "script").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]


def test_script_resumes_from_its_latest_checkpoint(script, tiny_digits_zoo, tmp_path):
    """Stopped at step 2 and resumed, the script logs the losses of an uninterrupted run."""

    def run(output_dir: Path, *extra: str) -> None:
        argv = ["--dataset_name", str(tiny_digits_zoo), "--output_dir", str(output_dir)]
        argv += ["--max_train_steps", "3", "--logging_steps", "1", "--report_to", "none"]
        argv += ["--set", "epoch_size=32", "--set", "batch_size=16", "--seed", "1", *extra]
        script(argv)

    run(tmp_path / "whole")
    run(tmp_path / "parts", "--checkpointing_steps", "2", "--set", "stop_at_step=2")
    assert not (tmp_path / "parts" / "model.safetensors").exists()
    run(tmp_path / "parts", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "fsdp", "multi_node"])
def test_launcher_configs_are_what_accelerate_reads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(SCRIPT.parent / "configs" / f"{name}.yaml"))
    expected = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP"}
    assert config.distributed_type.value == expected.get(name, "MULTI_GPU")
    if name == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "SaneLayer"
    if name == "multi_node":
        assert config.num_machines == 2 and config.num_processes == 16
