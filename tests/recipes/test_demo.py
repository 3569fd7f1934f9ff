"""The demo end to end at `DemoConfig.quick()` size, then resumed from its outputs."""

import json

import pytest

from sane_hf.cli import main
from sane_hf.recipes.demo import DemoConfig, run_demo

PLOTS = ("zoo_accuracy.png", "probe.png", "sampling.png", "novelty.png")
GROUPS = ["SANE kde (shared)", "SANE subsampled (shared)", "from scratch"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    return output, run_demo(output, DemoConfig.quick())


@pytest.mark.slow
def test_demo_writes_plots_tables_and_summary(demo_run):
    output, summary = demo_run
    for name in (*PLOTS, "probe.json", "sampling.json", "summary.json", "sane/model.safetensors"):
        assert (output / name).is_file(), name
    assert json.loads((output / "summary.json").read_text()) == summary

    r2 = summary["property_prediction_r2"]
    assert list(r2) == ["test_acc", "epoch", "ggap"]
    assert all(list(scores) == ["SANE", "s(W)", "W"] for scores in r2.values())

    sampling = summary["sampling"]
    assert sampling["epochs"] == [0, 1]
    assert list(sampling["accuracy"]) == [
        *("SANE kde (shared)", "noise matched to SANE kde (shared)"),
        *("SANE subsampled (shared)", "noise matched to SANE subsampled (shared)"),
        "noise matched to SANE subsampled (shared), selected",  # as many candidates, same score
        *(f"noise {level}x prompt distance" for level in ("0.25", "0.5", "1")),
        *("ensemble of 2 prompts", "from scratch", "prompts"),
    ]  # every SANE group followed by its memorization baselines; the prompts themselves last
    assert sampling["matched_noise"] == {group: f"noise matched to {group}" for group in GROUPS[:2]}
    for group in GROUPS:
        assert all(0 <= value <= 1 for value in sampling["accuracy"][group]["mean"])
    assert list(sampling["novelty"]) == GROUPS[:2]  # from-scratch networks are not sampled
    assert all(
        entry["sample_to_nearest_training_model"] > 0 for entry in sampling["novelty"].values()
    )
    stages = summary["wall_time_s"]["stages (all runs)"]
    assert list(stages) == ["zoo", "dataset", "pretraining", "probing", "sampling"]


@pytest.mark.slow
def test_demo_rerun_resumes_from_finished_stages(demo_run, capsys):
    output, summary = demo_run
    model_file = output / "sane" / "model.safetensors"
    saved = model_file.stat().st_mtime_ns, (output / "sampling.json").read_text()

    assert main(["demo", "--output-dir", str(output), "--quick"]) == 0

    printed = capsys.readouterr().out
    assert "holds a trained model: loading it" in printed
    assert "sampling.json exists: loading the results" in printed
    assert "SANE subsampled (shared)" in printed and "ggap" in printed
    assert (model_file.stat().st_mtime_ns, (output / "sampling.json").read_text()) == saved
    rerun = json.loads((output / "summary.json").read_text())
    assert rerun["property_prediction_r2"] == summary["property_prediction_r2"]
    assert rerun["sampling"] == summary["sampling"]
    first, total = summary["wall_time_s"], rerun["wall_time_s"]
    for stage, seconds in first["stages (all runs)"].items():  # times add up over runs
        assert total["stages (all runs)"][stage] >= seconds
