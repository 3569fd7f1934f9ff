"""Experiments as data: `ExperimentSpec` (a YAML file) and `run_experiment`, its stages in order.

An experiment trains a zoo (`train_zoo` resumes by itself), builds its dataset, pretrains SANE,
probes the embeddings for model properties (paper Table 1) and samples new networks (paper
Table 3), each sampling run with `sample_networks`. ``sane-hf demo`` and every
``benchmarks/reproduce`` script are one spec each (``sane_hf/presets/experiment/*.yaml``, one
file per experiment and scale) run by `run_experiment`; what a script adds is only how it
reports the results. Every stage writes into its own folder and is skipped when its output is
complete, so an interrupted run picks up where it stopped. The stage functions are thin on
purpose: the package API called in order, plus the bookkeeping that makes a run resumable and
its numbers comparable (the same fine-tuning recipe for every group, novelty next to accuracy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from torch import nn

from sane_hf.downstream.probing import ProbeReport, probe_zoo
from sane_hf.models.sane.modeling_sane import SaneEncoderModel, SaneModel
from sane_hf.pretraining.checkpointing import CONFIG_FILE, list_checkpoints
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import SUMMARY_FILE
from sane_hf.recipes.pretraining import pretrain
from sane_hf.recipes.sampling import (
    NOVELTY_PLOT_FILE,
    PLOT_FILE,
    SamplingResults,
    sample_networks,
)
from sane_hf.recipes.settings import SamplingMethod, SamplingSettings
from sane_hf.utils.config import LoadableConfig, build_config, merge
from sane_hf.zoo.config import ZooConfig
from sane_hf.zoo.dataset import build_zoo_dataset
from sane_hf.zoo.distributed import default_device
from sane_hf.zoo.formats import DATASET_METADATA_FILE
from sane_hf.zoo.metadata import ZooDataset
from sane_hf.zoo.statistics import describe_zoo, format_zoo_statistics, plot_zoo_accuracy
from sane_hf.zoo.storage import load_zoo_dataset, load_zoo_records, save_zoo_dataset
from sane_hf.zoo.training import train_zoo

TABLE1_PROPERTIES = ("test_acc", "epoch", "ggap")


class StageLog:
    """Announces the stages of a run (``[2/5] building the zoo dataset``) and times them.

    With a ``record`` file, ``seconds`` is the wall time spent in every stage over all runs of
    the experiment, summed: a stage resumed three times counts all three parts, a stage that
    was only loaded adds next to nothing. Without one, it is this run's time.
    """

    def __init__(self, num_stages: int, record: str | Path | None = None):
        self.num_stages = num_stages
        self.record = Path(record) if record is not None else None
        self.seconds: dict[str, float] = {}
        self._done = 0

    @contextlib.contextmanager
    def stage(self, name: str, description: str) -> Iterator[None]:
        self._done += 1
        print(f"\n[{self._done}/{self.num_stages}] {description}", flush=True)
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        print(f"    done in {elapsed:.1f} s", flush=True)
        earlier = (
            json.loads(self.record.read_text()) if self.record and self.record.is_file() else {}
        )
        self.seconds[name] = round(earlier.get(name, 0.0) + elapsed, 1)
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps(earlier | {name: self.seconds[name]}, indent=1))


def zoo_stage(config: ZooConfig, zoo_dir: str | Path, plot_path: str | Path) -> None:
    """Train (or resume) the raw zoo in ``zoo_dir`` and plot its test accuracy per epoch."""
    train_zoo(config, zoo_dir)
    _, records, _ = load_zoo_records(zoo_dir)
    zoo = {"architecture": config.architecture, "dataset": config.dataset}
    title = f"Zoo of {config.num_models} {describe_zoo(zoo)}: test split accuracy per epoch"
    plot_zoo_accuracy(records, plot_path, title)


def experiment_pretraining(
    config: PretrainingConfig | Mapping[str, Any] | str, work_dir: str | Path
) -> PretrainingConfig:
    """``config`` (a config, a preset name or a mapping of values) for an experiment folder:
    SANE reads the zoo dataset of ``work_dir/dataset`` and writes into ``work_dir/sane``."""
    work_dir = Path(work_dir)
    paths = {"dataset": str(work_dir / "dataset"), "output_dir": str(work_dir / "sane")}
    if isinstance(config, PretrainingConfig):
        config = config.to_dict()
    return PretrainingConfig.load(config, flags=paths)


def build_dataset_stage(
    raw_zoo_dir: str | Path, dataset_dir: str | Path, **build_options: Any
) -> ZooDataset:
    """Build and save the zoo dataset of a raw zoo, or load it when ``dataset_dir`` holds one.

    The dataset is saved to a ``.partial`` folder first and renamed when complete, so an
    interrupted build is redone rather than half-loaded. ``build_options`` go to
    `build_zoo_dataset` (``epochs``, ``tokensize``, ``dtype``, ...).
    """
    dataset_dir = Path(dataset_dir)
    if (dataset_dir / DATASET_METADATA_FILE).is_file():
        print(f"    {dataset_dir} exists: loading it")
    else:
        partial = dataset_dir.with_name(dataset_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_zoo_dataset(build_zoo_dataset(raw_zoo_dir, **build_options), partial)
        partial.rename(dataset_dir)
    return load_zoo_dataset(dataset_dir)


def pretrain_stage(config: PretrainingConfig) -> SaneModel:
    """Pretrain SANE with `sane_hf.recipes.pretraining.pretrain`, resuming from the newest checkpoint of
    ``config.output_dir``; a finished run (saved model and summary) is only loaded.

    A run started with another config is an error, not silently reused: the saved
    ``pretraining_config.yaml`` must match ``config`` (paths and the resume setting aside).
    """
    output_dir = Path(config.output_dir)
    _check_same_pretraining(config, output_dir / CONFIG_FILE)
    if (output_dir / "model.safetensors").is_file() and (output_dir / SUMMARY_FILE).is_file():
        print(f"    {output_dir} holds a trained model: loading it")
    else:
        if list_checkpoints(output_dir):
            config = dataclasses.replace(config, resume_from_checkpoint="latest")
            print(f"    resuming from the newest checkpoint in {output_dir}")
        pretrain(config)
    return SaneModel.from_pretrained(output_dir).eval()


def _check_same_pretraining(config: PretrainingConfig, saved_file: Path) -> None:
    if not saved_file.is_file():
        return
    changed = config.changed_fields(yaml.safe_load(saved_file.read_text()) or {})
    if changed:
        raise ValueError(
            f"{saved_file.parent} holds a SANE run with another config (fields {changed} differ): "
            "use another output folder, or delete it to retrain"
        )


def probe_stage(
    model: SaneModel,
    zoo: ZooDataset,
    output_dir: str | Path,
    name: str = "probe",
    properties: Sequence[str] = TABLE1_PROPERTIES,
    baselines: Sequence[str] = ("s(W)", "W"),
    **embed_options: Any,
) -> ProbeReport:
    """Linear probes of SANE embeddings vs s(W) and W (paper Table 1): ``<name>.json`` and
    ``<name>.png`` (predicted vs true on the test split) in ``output_dir``."""
    report = probe_zoo(
        model, zoo.splits, properties=list(properties), baselines=baselines, **embed_options
    )
    _save_report(report, output_dir, name, plot=True, zoo=zoo)
    return report


def probe_pretrained(
    model: str | Path,
    dataset: str | Path,
    *,
    output_dir: str | Path | None = None,
    plot: bool = False,
    device: str | None = None,
    **probe_options: Any,
) -> ProbeReport:
    """`sane-hf probe`: load a pretrained SANE (folder or Hub id) and a zoo dataset, probe its
    embeddings next to the baselines (`probe_zoo`'s options), write ``probe.json`` (and with
    ``plot`` ``probe.png``) to ``output_dir`` when given."""
    if plot and output_dir is None:
        raise ValueError("plotting the probes needs an output folder (--output-dir)")
    encoder = SaneEncoderModel.from_pretrained(model)
    encoder = encoder.to(device or default_device())
    zoo = load_zoo_dataset(dataset)
    report = probe_zoo(encoder, zoo.splits, **probe_options)
    if output_dir is not None:
        _save_report(report, output_dir, "probe", plot=plot, zoo=zoo)
    return report


def _save_report(
    report: ProbeReport, output_dir: str | Path, name: str, plot: bool, zoo: ZooDataset
) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report.save_json(output_dir / f"{name}.json")
    if plot and any(result.metric == "r2" for result in report.results):
        title = (
            f"Linear probes, predicted vs true on the test split: {describe_zoo(zoo.metadata.zoo)}"
        )
        report.plot(output_dir / f"{name}.png", title)


def r2_table(report: Mapping[str, Any], score: str = "score") -> dict[str, dict[str, float]]:
    """``{property: {features: score}}`` of a `ProbeReport.to_dict()`: test scores, or with
    ``score="validation_score"`` the validation scores the probes were chosen by."""
    table: dict[str, dict[str, float]] = {}
    for result in report["results"]:
        table.setdefault(result["property"], {})[result["features"]] = result[score]
    return table


# ----------------------------------------------------------------------------------------------
# Experiments as data


@dataclass
class DatasetStage:
    """How the zoo dataset is built (`build_zoo_dataset`; unset values keep its defaults):
    ``epoch_range`` ``[first, last]`` keeps only the checkpoints of those epochs (inclusive),
    ``tokensize`` and ``dtype`` (``float32``/``float16``) set the tokens."""

    epoch_range: list[int] | None = None
    tokensize: int | None = None
    dtype: str | None = None

    def __post_init__(self):
        if self.epoch_range is not None and (
            len(self.epoch_range) != 2 or self.epoch_range[0] > self.epoch_range[1]
        ):
            raise ValueError(f"epoch_range must be [first, last], got {self.epoch_range}")

    def build_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"tokensize": self.tokensize, "dtype": self.dtype}
        if self.epoch_range is not None:
            options["epochs"] = range(self.epoch_range[0], self.epoch_range[1] + 1)
        return {name: value for name, value in options.items() if value is not None}


@dataclass
class ProbingStage:
    """Linear probes of the embeddings (`probe_zoo`) for ``properties``, next to ``baselines``."""

    properties: list[str] = field(default_factory=lambda: list(TABLE1_PROPERTIES))
    baselines: list[str] = field(default_factory=lambda: ["s(W)", "W"])


@dataclass
class SamplingRun:
    """One `sample_networks` call: ``methods`` with the experiment's sampling settings plus
    ``changes`` (field values of `SamplingSettings`, checked when the spec is loaded).

    Its files go to ``<work_dir>/<name>/``, its plot to ``<prefix><name>.png``; ``description``
    heads its stage, ``table_epochs`` are the fine-tuning epochs its table prints (default 0, 1
    and the last), ``include_prompts`` also fine-tunes the prompts themselves.
    """

    name: str
    methods: list[SamplingMethod]
    changes: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    table_epochs: list[int] | None = None
    include_prompts: bool = True


@dataclass
class ExperimentSpec(LoadableConfig):
    """The stages of an experiment, in the order `run_experiment` runs them: the ``zoo``, its
    ``dataset``, SANE's ``pretraining`` (dataset and output folder are the experiment's), the
    ``probing`` (null: none), a ``prompt_zoo`` of another task to take the prompts from (null:
    the zoo itself), and the ``sampling_runs`` with their shared ``sampling`` settings.

    Presets: ``sane_hf/presets/experiment/<experiment>-<scale>.yaml``, loaded like every config
    (`ExperimentSpec.load("mnist-cpu", overrides=["zoo.num_models=20"])`).
    """

    CONFIG_KIND: ClassVar[str] = "experiment"

    zoo: ZooConfig = field(default_factory=ZooConfig)
    dataset: DatasetStage = field(default_factory=DatasetStage)
    pretraining: PretrainingConfig = field(default_factory=PretrainingConfig)
    probing: ProbingStage | None = field(default_factory=ProbingStage)
    prompt_zoo: ZooConfig | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    sampling_runs: list[SamplingRun] = field(default_factory=list)

    def __post_init__(self):
        names = [run.name for run in self.sampling_runs]
        if len(set(names)) != len(names):
            raise ValueError(f"sampling run names must differ, got {names}")
        for run in self.sampling_runs:
            self.run_settings(run)  # a bad change is an error when the spec is loaded

    def run_settings(self, run: SamplingRun) -> SamplingSettings:
        """The experiment's sampling settings with ``run.changes``."""
        values = merge(self.sampling.to_dict(), run.changes)
        return build_config(SamplingSettings, values, f"sampling run {run.name!r}")


@dataclass
class ExperimentResults:
    """What `run_experiment` measured: the zoo dataset and SANE, the pretraining summary, the
    probe report (None without probing), the results of every sampling run by name, and the
    wall time per stage (over all runs of the experiment)."""

    zoo: ZooDataset
    model: SaneModel
    pretraining: dict[str, Any]
    probes: ProbeReport | None
    sampling: dict[str, SamplingResults]
    seconds: dict[str, float]
    prompt_zoo: ZooDataset | None = None


def run_experiment(
    spec: ExperimentSpec,
    work_dir: str | Path,
    results_dir: str | Path | None = None,
    prefix: str = "",
    *,
    sane_dir: str | Path | None = None,
    extra_groups: Callable[[ZooDataset], Mapping[str, Sequence[nn.Module]]] | None = None,
    device: str | None = None,
) -> ExperimentResults:
    """Run (or resume) the stages of ``spec`` and print their tables.

    Args:
        spec: the experiment.
        work_dir: zoo, dataset, SANE and every sampling run's folder (``stage_times.json``).
        results_dir: the plots and the probe report, named ``<prefix>zoo_accuracy.png``,
            ``<prefix>probe.{json,png}``, ``<prefix><run>.png`` and ``<prefix><run>_novelty.png``
            (default ``work_dir``).
        sane_dir: where zoo, dataset and SANE live when they are another experiment's (an
            experiment that samples with the SANE of another reuses its finished stages).
        extra_groups: networks fine-tuned next to the samples in every run (e.g. transfer
            baselines), made from the zoo dataset once it is built.
        device: where SANE runs (default: cuda when available, else cpu).
    """
    work = Path(work_dir)
    results = Path(results_dir) if results_dir is not None else work
    sane_work = Path(sane_dir) if sane_dir is not None else work
    results.mkdir(parents=True, exist_ok=True)
    num_stages = 3 + (spec.probing is not None) + (spec.prompt_zoo is not None)
    log = StageLog(num_stages + len(spec.sampling_runs), record=work / "stage_times.json")

    with log.stage("zoo", f"training {_zoo_size(spec.zoo)} -> {sane_work / 'zoo'} (resumes)"):
        zoo_stage(spec.zoo, sane_work / "zoo", results / f"{prefix}zoo_accuracy.png")
    epochs = spec.dataset.epoch_range
    with log.stage(
        "dataset",
        "building the zoo dataset: split by model, align, tokenize"
        + (f" (epochs {epochs[0]}..{epochs[1]})" if epochs else ""),
    ):
        zoo = build_dataset_stage(
            sane_work / "zoo", sane_work / "dataset", **spec.dataset.build_options()
        )
        print(format_zoo_statistics(zoo.metadata.statistics, zoo.metadata.zoo))
    with log.stage(
        "pretraining", f"pretraining SANE ({spec.pretraining.model.to_dict()}) -> sane/"
    ):
        pretraining = experiment_pretraining(spec.pretraining, sane_work)
        model = pretrain_stage(pretraining).to(device or default_device())
    report = None
    if spec.probing is not None:
        with log.stage(
            "probing", "property prediction: SANE vs " + ", ".join(spec.probing.baselines)
        ):
            report = probe_stage(
                model,
                zoo,
                results,
                name=f"{prefix}probe",
                properties=spec.probing.properties,
                baselines=spec.probing.baselines,
            )
            print(report.table())
    prompt_zoo = None
    if spec.prompt_zoo is not None:
        with log.stage("prompt_zoo", f"the prompts' zoo: training {_zoo_size(spec.prompt_zoo)}"):
            zoo_stage(spec.prompt_zoo, work / "prompt_zoo", results / f"{prefix}prompt_zoo.png")
            prompt_zoo = build_dataset_stage(work / "prompt_zoo", work / "prompt_dataset")

    sampled = {}
    groups = extra_groups(zoo) if extra_groups is not None and spec.sampling_runs else None
    for run in spec.sampling_runs:
        settings = spec.run_settings(run)
        with log.stage(run.name, run.description or f"sampling: {run.name}"):
            sampled[run.name] = sample_networks(
                model,
                zoo,
                work / run.name,
                settings,
                run.methods,
                prompt_dataset=prompt_zoo,
                include_prompts=run.include_prompts,
                extra_groups=groups,
                device=device,
                resume=True,
            )
            for plot, suffix in ((PLOT_FILE, ""), (NOVELTY_PLOT_FILE, "_novelty")):
                if (work / run.name / plot).is_file():
                    target = results / f"{prefix}{run.name}{suffix}.png"
                    shutil.copyfile(work / run.name / plot, target)
            last = settings.finetune_epochs
            print(sampled[run.name].table(run.table_epochs or sorted({0, min(1, last), last})))
    summary = json.loads((sane_work / "sane" / SUMMARY_FILE).read_text())
    return ExperimentResults(zoo, model, summary, report, sampled, log.seconds, prompt_zoo)


def _zoo_size(config: ZooConfig) -> str:
    return (
        f"{config.num_models} {config.architecture} networks on {config.dataset} "
        f"for {config.epochs} epochs"
    )


__all__ = [
    "DatasetStage",
    "ExperimentResults",
    "ExperimentSpec",
    "ProbingStage",
    "SamplingRun",
    "StageLog",
    "build_dataset_stage",
    "experiment_pretraining",
    "pretrain_stage",
    "probe_pretrained",
    "probe_stage",
    "r2_table",
    "run_experiment",
    "zoo_stage",
]
