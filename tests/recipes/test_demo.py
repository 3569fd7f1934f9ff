"""The demo end to end at `DemoConfig.quick()` size, then resumed from its outputs; how it
explains its tables, titles its plots, sums up and records itself."""

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from sane_hf.cli import main
from sane_hf.recipes.demo import GLOSSARY, DemoConfig, closing_line, glossary, run_demo, verdict

PLOTS = ("zoo_accuracy.png", "probe.png", "sampling.png", "sampling_novelty.png")
GROUPS = ["SANE kde (shared)", "SANE subsampled (shared)", "from scratch"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The quick demo, with the titles of every figure it saves: ``{file: (title, panels)}``."""
    output = tmp_path_factory.mktemp("demo")
    titles = {}
    save = Figure.savefig

    def recording_savefig(figure, path, *args, **kwargs):
        suptitle = figure._suptitle.get_text() if figure._suptitle else ""
        panels = [axes.get_title() for axes in figure.axes if axes.get_visible()]
        titles[Path(path).name] = (suptitle, panels)
        return save(figure, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", recording_savefig)
        summary = run_demo(output, DemoConfig.quick())
    return output, summary, titles


@pytest.mark.slow
def test_demo_writes_plots_tables_and_summary(demo_run):
    output, summary, _ = demo_run
    files = ("probe.json", "sampling/sampling.json", "summary.json", "sane/model.safetensors")
    for name in (*PLOTS, *files):
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
    output, summary, _ = demo_run
    model_file = output / "sane" / "model.safetensors"
    saved = model_file.stat().st_mtime_ns, (output / "sampling" / "sampling.json").read_text()

    assert main(["demo", "--output-dir", str(output), "--quick"]) == 0

    printed = capsys.readouterr().out
    assert "holds a trained model: loading it" in printed
    assert "sampling.json exists: loading the results" in printed
    assert "SANE subsampled (shared)" in printed and "ggap" in printed
    results = (output / "sampling" / "sampling.json").read_text()
    assert (model_file.stat().st_mtime_ns, results) == saved
    rerun = json.loads((output / "summary.json").read_text())
    assert rerun["property_prediction_r2"] == summary["property_prediction_r2"]
    assert rerun["sampling"] == summary["sampling"]
    first, total = summary["wall_time_s"], rerun["wall_time_s"]
    for stage, seconds in first["stages (all runs)"].items():  # times add up over runs
        assert total["stages (all runs)"][stage] >= seconds


@pytest.mark.slow
def test_demo_plots_are_titled_with_split_architecture_and_dataset(demo_run):
    _, _, titles = demo_run
    for name in ("zoo_accuracy.png", "probe.png", "sampling.png", "novelty.png"):  # as drawn
        title, panels = titles[name]
        text = " ".join([title, *panels])
        assert "test split" in text.lower() and "cnn_s" in text and "digits" in text, (name, text)
    _, probe_panels = titles["probe.png"]
    assert probe_panels == [
        "test accuracy",
        "training epoch",
        "generalization gap (train - test accuracy)",
    ]
    _, novelty_panels = titles["novelty.png"]
    assert novelty_panels == ["how far from the training networks", "how alike the mistakes are"]


@pytest.mark.slow
def test_demo_card_records_its_zoo_and_its_evaluation(demo_run, capsys):
    output, summary, _ = demo_run
    card = (output / "sane" / "README.md").read_text()
    assert "## Demo zoo" in card and "## Demo evaluation" in card
    assert '"num_models": 8' in card and "digits" in card  # the quick demo's zoo
    assert "test_acc" in card and "from scratch" in card  # its probe and sampling tables
    assert closing_line(summary["verdict"]) in card


def test_the_glossary_explains_each_name_of_the_tables_in_one_line():
    lines = glossary().splitlines()
    assert len(lines) == len(GLOSSARY) == 5
    for name, line in zip(("s(W)", "W", "dist", "rel", "IoU"), lines):
        assert line.split()[0] == name and len(line.split()) > 5


def test_the_closing_line_says_where_sane_wins_and_where_it_loses():
    r2 = {"test_acc": {"SANE": 0.9, "s(W)": 0.5, "W": 0.1}, "epoch": {"SANE": 0.2, "s(W)": 0.8}}
    sampling = {
        "epochs": [0, 5],
        "accuracy": {
            "SANE kde (shared)": {"mean": [0.30, 0.60]},
            "noise matched to SANE kde (shared)": {"mean": [0.40, 0.50]},
            "from scratch": {"mean": [0.10, 0.70]},
            "SANE subsampled (shared)": {"mean": [0.10, 0.70]},
            "noise matched to SANE subsampled (shared)": {"mean": [0.05, 0.70]},
        },
        "matched_noise": {
            "SANE kde (shared)": "noise matched to SANE kde (shared)",
            "SANE subsampled (shared)": "noise matched to SANE subsampled (shared)",
        },
    }
    outcome = verdict(r2, sampling)
    assert outcome["wins"] == [
        "predicting test accuracy (R^2 0.90 vs 0.50 with s(W))",
        "SANE kde (shared) before fine-tuning (30.0% vs 10.0% from scratch)",
        "SANE subsampled (shared) before fine-tuning (10.0% vs 5.0% prompts plus matched noise)",
    ]
    assert outcome["losses"] == [
        "predicting training epoch (R^2 0.20 vs 0.80 with s(W))",
        "SANE kde (shared) before fine-tuning (30.0% vs 40.0% prompts plus matched noise)",
        "SANE kde (shared) after 5 fine-tuning epochs (60.0% vs 70.0% from scratch)",
    ]
    assert outcome["ties"] == [
        "SANE subsampled (shared) before fine-tuning (10.0% vs 10.0% from scratch)",
        "SANE subsampled (shared) after 5 fine-tuning epochs (70.0% vs 70.0% from scratch)",
    ]
    line = closing_line(outcome)
    assert line.startswith("At this scale SANE wins on: predicting test accuracy")
    assert "It loses on: predicting training epoch" in line and "\n" not in line
    assert line.endswith("Ties: " + "; ".join(outcome["ties"]) + ".")
