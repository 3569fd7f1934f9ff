"""``sane-hf demo``: the whole SANE workflow on scikit-learn's digits, on a laptop CPU.

The demo is one experiment (`ExperimentSpec`, preset ``sane_hf/presets/demo/default.yaml``) run
by `run_experiment`; its stages, each one or two calls into ``sane_hf``:

1. ``train_zoo``: a seed zoo of CNN-s networks on digits (8x8 images resized to 28x28), the
   Model Zoos protocol (tanh, uniform init, Adam 3e-4, batch 10), a checkpoint every epoch;
2. ``build_zoo_dataset``: split by model, align, normalize with training statistics, tokenize;
3. ``pretrain``: the tiny SANE model through the package's Accelerate pretraining;
4. ``probe_zoo``: linear probes of SANE embeddings for test accuracy, epoch and generalization
   gap, next to the s(W) and raw-weight baselines (paper Table 1);
5. ``sample_networks``: networks sampled around the best training checkpoints (plain KDE draws
   and subsampling), fine-tuned next to networks trained from scratch and to memorization
   baselines, with the novelty of the samples (paper Table 3).

Everything lands in ``--output-dir``: the raw zoo, the dataset, the SANE checkpoint (its model
card records the demo's zoo and evaluation), ``sampling/`` (the samples and ``sampling.json``),
the plots (``zoo_accuracy.png``, ``probe.png``, ``sampling.png``, ``sampling_novelty.png``),
``probe.json`` and ``summary.json``. Rerunning resumes: zoo training continues from its last
checkpoint epoch, and finished stages (dataset, pretraining, sampling) are loaded.

The numbers are those of a small zoo and a tiny SANE: they show the method working end to end,
not the paper's scale (``benchmarks/reproduce/mnist.py`` is the larger experiment); the closing
line says where SANE wins and where it loses at this scale.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from sane_hf.downstream.probing import PROPERTY_LABELS
from sane_hf.hub import folder_model_card
from sane_hf.recipes.experiments import (
    ExperimentSpec,
    experiment_pretraining,
    r2_table,
    run_experiment,
)
from sane_hf.zoo.formats import atomic_write_text
from sane_hf.zoo.statistics import format_zoo_statistics

# How to read the demo's tables, one line per name.
GLOSSARY = {
    "s(W)": "baseline features: per-layer statistics of the weights (mean, variance, quantiles)",
    "W": "baseline features: the raw weights themselves, all of them in one vector",
    "dist": "median distance (normalized weights) from a group's networks to the nearest "
    "training checkpoint",
    "rel": "dist over the median distance between two prompts: near 0 a copy, about 1 as new "
    "as two trained networks are to each other",
    "IoU": "overlap of a network's test mistakes with those of the most similar training "
    "network: 1 the same mistakes, 0 none shared",
}


@dataclasses.dataclass
class DemoConfig(ExperimentSpec):
    """The demo's experiment: the ``default`` preset (``sane_hf/presets/demo/default.yaml``,
    about a minute with one thread on an idle 2-core CPU); `DemoConfig.quick()` (preset
    ``quick``) checks the pipeline in seconds. Any other demo is
    `DemoConfig.load(preset_or_file, overrides=["zoo.num_models=16"])`."""

    CONFIG_KIND: ClassVar[str] = "demo"
    DEFAULT_PRESET: ClassVar[str | None] = "default"

    @classmethod
    def default(cls) -> DemoConfig:
        return cls.load("default")

    @classmethod
    def quick(cls) -> DemoConfig:
        """A few networks on 300 digits, a few SANE steps: exercises every stage, measures
        nothing."""
        return cls.load("quick")


def glossary() -> str:
    """The glossary as printed before the tables: one line per name."""
    width = max(map(len, GLOSSARY))
    return "\n".join(f"    {name:<{width}}  {text}" for name, text in GLOSSARY.items())


def verdict(
    r2: Mapping[str, Mapping[str, float]], sampling: Mapping[str, Any]
) -> dict[str, list[str]]:
    """Where SANE wins and where it loses in a demo summary: every probe against the best
    baseline (test R^2), every SANE group before fine-tuning and after the last fine-tuning
    epoch against the networks trained from scratch, and before fine-tuning against its
    matched-noise baseline (prompts plus noise at the same distance); equal numbers are ties."""
    wins: list[str] = []
    losses: list[str] = []
    ties: list[str] = []

    def record(ours: float, theirs: float, text: str) -> None:
        (wins if ours > theirs else losses if ours < theirs else ties).append(text)

    for name, scores in r2.items():
        baselines = {features: score for features, score in scores.items() if features != "SANE"}
        if "SANE" not in scores or not baselines:
            continue
        best = max(baselines, key=baselines.get)
        record(
            scores["SANE"],
            baselines[best],
            f"predicting {PROPERTY_LABELS.get(name, name)} (R^2 {scores['SANE']:.2f} vs "
            f"{baselines[best]:.2f} with {best})",
        )
    accuracy, epochs = sampling["accuracy"], sampling["epochs"]
    scratch = accuracy.get("from scratch")
    for group, noise in sampling["matched_noise"].items():
        comparisons = [(0, noise, "prompts plus matched noise")]
        if scratch is not None:
            comparisons += [(0, "from scratch", "from scratch")]
            if len(epochs) > 1:
                comparisons += [(len(epochs) - 1, "from scratch", "from scratch")]
        for column, other, label in comparisons:
            ours, theirs = accuracy[group]["mean"][column], accuracy[other]["mean"][column]
            plural = "s" if epochs[column] != 1 else ""
            when = (
                f"after {epochs[column]} fine-tuning epoch{plural}"
                if column
                else "before fine-tuning"
            )
            record(
                ours, theirs, f"{group} {when} ({100 * ours:.1f}% vs {100 * theirs:.1f}% {label})"
            )
    return {"wins": wins, "losses": losses, "ties": ties}


def closing_line(outcome: Mapping[str, list[str]]) -> str:
    """One line: ``At this scale SANE wins on ... It loses on ... (Ties: ...)``."""
    wins = "; ".join(outcome["wins"]) or "nothing"
    losses = "; ".join(outcome["losses"]) or "nothing"
    ties = f" Ties: {'; '.join(outcome['ties'])}." if outcome.get("ties") else ""
    return f"At this scale SANE wins on: {wins}. It loses on: {losses}.{ties}"


def run_demo(output_dir: str | Path = "demo_outputs", config: DemoConfig | None = None) -> dict:
    """Run (or resume) the demo into ``output_dir``; print its tables and return the summary
    that is also written to ``output_dir/summary.json``."""
    config = config or DemoConfig.default()
    output = Path(output_dir)
    start = time.perf_counter()
    print("How to read the tables below:\n" + glossary())
    results = run_experiment(config, output)
    run = config.sampling_runs[0]
    sampling = results.sampling[run.name]
    pretraining = results.pretraining
    summary = {
        "config": {
            "zoo": config.zoo.to_dict(),
            "pretraining": experiment_pretraining(config.pretraining, output).to_dict(),
            "sampling": dataclasses.asdict(config.run_settings(run)),
            "methods": [method.name for method in run.methods],
        },
        "zoo": results.zoo.metadata.statistics,
        "pretraining": pretraining,
        "property_prediction_r2": r2_table(results.probes.to_dict()),
        "sampling": {
            "accuracy": sampling.evaluation.summary(),
            "epochs": sampling.evaluation.epochs,
            "novelty": sampling.novelty,
            "matched_noise": sampling.evaluation.matched,
        },
    }
    outcome = verdict(summary["property_prediction_r2"], summary["sampling"])
    summary["verdict"] = outcome
    summary["wall_time_s"] = {
        "stages (all runs)": results.seconds,
        "this run": round(time.perf_counter() - start, 1),
    }
    atomic_write_text(output / "summary.json", _json(summary))
    write_demo_card(output / "sane", config, results, closing_line(outcome))
    print(f"\n{closing_line(outcome)}")
    print(f"plots, tables and summary.json written to {output}")
    return summary


def write_demo_card(folder: Path, config: DemoConfig, results, closing: str) -> None:
    """The demo model's card (``sane/README.md``) with the demo's zoo and its evaluation."""
    run = config.sampling_runs[0]
    settings = config.run_settings(run)
    last = settings.finetune_epochs
    sampling_table = results.sampling[run.name].table(sorted({0, min(1, last), last}))
    zoo = results.zoo.metadata
    sections = {
        "Demo zoo": (
            "Trained by `sane-hf demo` with this zoo config:\n\n```json\n"
            + _json(config.zoo.to_dict())
            + "```\n\n```\n"
            + format_zoo_statistics(zoo.statistics, zoo.zoo)
            + "\n```"
        ),
        "Demo evaluation": (
            "Linear probes on the test split (R^2), SANE embeddings vs the baselines:\n\n```\n"
            + results.probes.table()
            + "\n```\n\nSampled networks (test accuracy in %, mean ± std, by fine-tuning "
            "epoch) next to networks trained from scratch and memorization baselines:\n\n```\n"
            + sampling_table
            + "\n```\n\n"
            + "\n".join(f"- **{name}**: {text}" for name, text in GLOSSARY.items())
            + f"\n\n{closing}"
        ),
    }
    folder_model_card(folder, str(folder), sections).save(folder / "README.md")


def _json(value: Any) -> str:
    return json.dumps(value, indent=1) + "\n"


__all__ = [
    "DemoConfig",
    "closing_line",
    "glossary",
    "run_demo",
    "verdict",
    "write_demo_card",
]
