"""``sane-hf demo``: the whole SANE workflow on scikit-learn's digits, on a laptop CPU.

The stages, each one or two calls into ``sane_hf`` (read this file to learn the API):

1. ``train_zoo``: a seed zoo of CNN-s networks on digits (8x8 images resized to 28x28), the
   Model Zoos protocol (tanh, uniform init, Adam 3e-4, batch 10), a checkpoint every epoch;
2. ``build_zoo_dataset``: split by model, align, normalize with training statistics, tokenize;
3. ``pretrain``: the tiny SANE preset through the package's Accelerate pretraining;
4. ``probe_zoo``: linear probes of SANE embeddings for test accuracy, epoch and generalization
   gap, next to the s(W) and raw-weight baselines (paper Table 1);
5. ``SaneSampler``: networks sampled around the best training checkpoints (plain KDE draws and
   subsampling), fine-tuned for 0, 1 and 5 epochs next to networks trained from scratch, with
   the novelty of the samples (paper Table 3).

Everything lands in ``--output-dir``: the raw zoo, the dataset, the SANE checkpoint, the plots
(``zoo_accuracy.png``, ``probe.png``, ``sampling.png``), ``probe.json``, ``sampling.json`` and
``summary.json``. Rerunning resumes: zoo training continues from its last checkpoint epoch, and
finished stages (dataset, pretraining, sampling) are loaded instead of recomputed.

The numbers are those of a small zoo and a tiny SANE: they show the method working end to end,
not the paper's scale (``benchmarks/reproduce/mnist.py`` is the larger experiment).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import SUMMARY_FILE
from sane_hf.recipes.experiments import (
    DEFAULT_METHODS,
    SamplingMethod,
    SamplingSettings,
    StageLog,
    build_dataset_stage,
    cached_sampling,
    compare_sampling,
    experiment_pretraining,
    pretrain_stage,
    probe_stage,
    r2_table,
    zoo_stage,
)
from sane_hf.utils.config import LoadableConfig
from sane_hf.zoo.config import ZooConfig
from sane_hf.zoo.statistics import format_zoo_statistics


@dataclass
class DemoConfig(LoadableConfig):
    """What the demo trains and measures: the ``default`` preset
    (``sane_hf/presets/demo/default.yaml``, about a minute with one thread on an idle 2-core
    CPU); `DemoConfig.quick()` (preset ``quick``) checks the pipeline in seconds. Any other
    demo is `DemoConfig.load(preset_or_file, overrides=["zoo.num_models=16"])`."""

    CONFIG_KIND: ClassVar[str] = "demo"
    DEFAULT_PRESET: ClassVar[str | None] = "default"

    zoo: ZooConfig = field(default_factory=ZooConfig)
    pretraining: PretrainingConfig = field(default_factory=PretrainingConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    methods: tuple[SamplingMethod, ...] = tuple(SamplingMethod(kind) for kind in DEFAULT_METHODS)

    @classmethod
    def default(cls) -> DemoConfig:
        return cls.load("default")

    @classmethod
    def quick(cls) -> DemoConfig:
        """A few networks on 300 digits, a few SANE steps: exercises every stage, measures
        nothing."""
        return cls.load("quick")


def run_demo(output_dir: str | Path = "demo_outputs", config: DemoConfig | None = None) -> dict:
    """Run (or resume) the demo into ``output_dir``; print its tables and return the summary
    that is also written to ``output_dir/summary.json``."""
    config = config or DemoConfig.default()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    log = StageLog(num_stages=5, record=output / "stage_times.json")
    start = time.perf_counter()

    with log.stage(
        "zoo",
        f"training {config.zoo.num_models} {config.zoo.architecture} networks on "
        f"{config.zoo.dataset} for {config.zoo.epochs} epochs -> {output / 'zoo'} (resumes)",
    ):
        zoo_stage(config.zoo, output / "zoo", output / "zoo_accuracy.png")

    with log.stage("dataset", "building the zoo dataset: split by model, align, tokenize"):
        zoo = build_dataset_stage(output / "zoo", output / "dataset")
        print(format_zoo_statistics(zoo.metadata.statistics, zoo.metadata.zoo))

    with log.stage("pretraining", f"pretraining SANE ({config.pretraining.model}) -> sane/"):
        pretraining = experiment_pretraining(config.pretraining, output)
        model = pretrain_stage(pretraining)

    with log.stage("probing", "property prediction: SANE vs s(W) vs W (test R^2)"):
        report = probe_stage(model, zoo, output)
        print(report.table())

    with log.stage("sampling", "sampling networks vs training from scratch"):
        sampling = cached_sampling(
            output / "sampling.json",
            lambda: compare_sampling(model, zoo, config.methods, config.sampling),
        )
        sampling.evaluation.plot(output / "sampling.png")
        if sampling.evaluation.novelty:
            sampling.evaluation.plot_novelty(output / "novelty.png")
        finetune_epochs = config.sampling.finetune_epochs
        print(sampling.table(sorted({0, min(1, finetune_epochs), finetune_epochs})))
        print(
            "    at this scale the table shows whether SANE's samples beat prompts plus noise at "
            "the same distance; it cannot show the paper's numbers (a tiny zoo and SANE)"
        )

    summary = {
        "config": {
            "zoo": config.zoo.to_dict(),
            "pretraining": pretraining.to_dict(),
            "sampling": dataclasses.asdict(config.sampling),
            "methods": [method.name for method in config.methods],
        },
        "zoo": zoo.metadata.statistics,
        "pretraining": json.loads((output / "sane" / SUMMARY_FILE).read_text()),
        "property_prediction_r2": r2_table(report.to_dict()),
        "sampling": {
            "accuracy": sampling.evaluation.summary(),
            "epochs": sampling.evaluation.epochs,
            "novelty": sampling.novelty,
            "matched_noise": sampling.evaluation.matched,
        },
        "wall_time_s": {
            "stages (all runs)": log.seconds,
            "this run": round(time.perf_counter() - start, 1),
        },
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nplots, tables and summary.json written to {output}")
    return summary
