"""Resumable stages of a SANE experiment, shared by ``sane-hf demo`` and ``benchmarks/reproduce_*.py``.

An experiment trains a zoo (`train_zoo` resumes by itself), builds its dataset, pretrains SANE,
probes the embeddings for model properties (paper Table 1) and samples new networks (paper
Table 3). Every stage writes into its own folder and is skipped when its output is complete, so
an interrupted run picks up where it stopped. The functions are thin on purpose: they are the
package API called in order, plus the bookkeeping that makes a run resumable and its numbers
comparable (the same fine-tuning recipe for every group, novelty next to accuracy).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sane_hf.downstream.baselines import MemorizationBaselines
from sane_hf.downstream.evaluation import (
    SampleEvaluation,
    accuracy_score,
    evaluate_samples,
    load_task_dataset,
    random_batches,
    scratch_models,
)
from sane_hf.downstream.probing import ProbeReport, probe_zoo
from sane_hf.downstream.sampling import (
    SampledModels,
    SaneSampler,
    nearest_neighbor_distances,
    novelty_report,
    select_prompts,
    split_token_chunks,
)
from sane_hf.models.sane.modeling_sane import SaneEncoderModel, SaneModel
from sane_hf.pretraining.checkpointing import CONFIG_FILE, list_checkpoints
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import SUMMARY_FILE
from sane_hf.recipes.pretraining import pretrain_with_probe_heads
from sane_hf.recipes.settings import DEFAULT_METHODS as DEFAULT_METHODS
from sane_hf.recipes.settings import SAMPLING_KINDS as SAMPLING_KINDS
from sane_hf.recipes.settings import SamplingMethod as SamplingMethod
from sane_hf.recipes.settings import SamplingSettings as SamplingSettings
from sane_hf.weights.alignment import align
from sane_hf.zoo.config import ZooConfig
from sane_hf.zoo.dataset import (
    ZooDataset,
    build_zoo_dataset,
    load_zoo_dataset,
    load_zoo_records,
    save_zoo_dataset,
)
from sane_hf.zoo.distributed import my_share, zoo_processes
from sane_hf.zoo.formats import DATASET_METADATA_FILE
from sane_hf.zoo.statistics import plot_zoo_accuracy
from sane_hf.zoo.tasks import ImageDataset
from sane_hf.zoo.training import train_zoo

TABLE1_PROPERTIES = ("test_acc", "epoch", "ggap")
RECIPE_KEYS = ("optimizer", "lr", "weight_decay", "batch_size")


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
    plot_zoo_accuracy(records, plot_path)


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
    """Pretrain SANE with `sane_hf.pretraining.loop.pretrain`, resuming from the newest checkpoint of
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
        pretrain_with_probe_heads(config)
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
    _save_report(report, output_dir, name, plot=True)
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
    encoder = encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = probe_zoo(encoder, load_zoo_dataset(dataset).splits, **probe_options)
    if output_dir is not None:
        _save_report(report, output_dir, "probe", plot=plot)
    return report


def _save_report(report: ProbeReport, output_dir: str | Path, name: str, plot: bool) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report.save_json(output_dir / f"{name}.json")
    if plot and any(result.metric == "r2" for result in report.results):
        report.plot(output_dir / f"{name}.png")


def r2_table(report: Mapping[str, Any], score: str = "score") -> dict[str, dict[str, float]]:
    """``{property: {features: score}}`` of a `ProbeReport.to_dict()`: test scores, or with
    ``score="validation_score"`` the validation scores the probes were chosen by."""
    table: dict[str, dict[str, float]] = {}
    for result in report["results"]:
        table.setdefault(result["property"], {})[result["features"]] = result[score]
    return table


# ----------------------------------------------------------------------------------------------
# Sampling (paper Table 3)


@dataclass
class SamplingResults:
    """Accuracy of every group per fine-tuning epoch, and the novelty of every sampled group."""

    evaluation: SampleEvaluation
    novelty: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"evaluation": self.evaluation.to_dict(), "novelty": self.novelty}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingResults:
        return cls(SampleEvaluation.from_dict(data["evaluation"]), dict(data["novelty"]))

    def table(self, epochs: Sequence[int] | None = None) -> str:
        """`SampleEvaluation.table`: Table 3 with the novelty of every group and the
        matched-noise row after every SANE row."""
        relative = {group: figures["relative"] for group, figures in self.novelty.items()}
        return self.evaluation.table(epochs, relative)


def training_recipe(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """The fine-tuning arguments of `evaluate_samples` from a zoo row's hyperparameters."""
    return {
        name: hyperparameters[name] for name in RECIPE_KEYS if hyperparameters.get(name) is not None
    }


def prompt_networks(
    prompt_zoo: ZooDataset, rows: Sequence[int], split: str = "train"
) -> list[nn.Module]:
    """Rows of a split of the prompt zoo as networks with their raw (de-normalized) weights."""
    selected = prompt_zoo.splits[split].select(rows)
    tokens = selected.with_format("torch", columns=["tokens"])["tokens"]
    networks = []
    for row_tokens, hyperparameters in zip(tokens, selected["hyperparameters"]):
        network = prompt_zoo.metadata.build_model(hyperparameters)
        network.load_state_dict(prompt_zoo.metadata.decode(row_tokens))
        networks.append(network.eval())
    return networks


def zoo_reference_network(zoo: ZooDataset) -> nn.Module:
    """The checkpoint every model of ``zoo`` was aligned to (it is in the train split)."""
    alignment = zoo.metadata.alignment
    if not alignment["aligned"]:
        raise ValueError("the zoo was built without alignment: it has no reference model")
    columns = zoo.splits["train"].select_columns(["model_id", "epoch"]).to_dict()
    pairs = list(zip(columns["model_id"], columns["epoch"]))
    row = pairs.index((alignment["reference_model_id"], alignment["reference_epoch"]))
    return prompt_networks(zoo, [row])[0]


def choose_prompts(prompt_zoo: ZooDataset, settings: SamplingSettings) -> list[int]:
    """Rows of the best ``num_prompts`` checkpoints of ``prompt_split`` at ``prompt_epoch``, or
    of all of them when the split has fewer (a small zoo, or its test split), saying so."""
    if settings.prompt_split not in prompt_zoo.splits:
        raise ValueError(
            f"prompt_split {settings.prompt_split!r} is not a split of the prompt zoo "
            f"(splits: {list(prompt_zoo.splits)})"
        )
    split = prompt_zoo.splits[settings.prompt_split]
    epochs = np.array(split["epoch"])
    epoch = int(epochs.max()) if settings.prompt_epoch is None else settings.prompt_epoch
    available = int((epochs == epoch).sum())
    if available == 0:
        raise ValueError(
            f"prompt_epoch {epoch} has no checkpoint in the {settings.prompt_split} split "
            f"(epochs {sorted(set(epochs.tolist()))})"
        )
    if available < settings.num_prompts:
        print(
            f"    {settings.num_prompts} prompts asked for, the {settings.prompt_split} split has "
            f"{available} checkpoints at epoch {epoch}: using all {available}"
        )
    count = min(settings.num_prompts, available)
    return select_prompts(split, count, epoch, settings.prompt_metric)


def aligned_to_zoo(networks: Sequence[nn.Module], zoo: ZooDataset) -> list[nn.Module]:
    """Copies of ``networks`` permuted onto the ordering of ``zoo``'s alignment reference.

    SANE only saw aligned networks; networks from elsewhere (another zoo, another task) are
    encoded the way the zoo was once they are aligned to the same reference. Permutations do
    not change what a network computes.
    """
    reference = zoo_reference_network(zoo)
    aligned = []
    for network in networks:
        permuted = copy.deepcopy(network)
        permuted.load_state_dict(align(network, reference).state_dict)
        aligned.append(permuted.eval())
    return aligned


def zoo_prompts(
    zoo: ZooDataset, prompt_zoo: ZooDataset, rows: Sequence[int], split: str = "train"
) -> torch.Tensor | list[nn.Module]:
    """Prompts for SANE pretrained on ``zoo`` from ``rows`` of a split of ``prompt_zoo``.

    Rows of ``zoo`` itself are its tokens, aligned and normalized as SANE saw them. Rows of
    another zoo are its networks, permuted onto ``zoo``'s alignment reference when ``zoo`` is
    aligned; `SaneSampler.prompt_tokens` then normalizes them with ``zoo``'s statistics (the
    other zoo's tokens are normalized with its own, and its networks in their own unit order).
    """
    if prompt_zoo is zoo:
        tokens = zoo.splits[split].with_format("torch", columns=["tokens"])[rows]["tokens"]
        return tokens.float()
    networks = prompt_networks(prompt_zoo, rows, split)
    return aligned_to_zoo(networks, zoo) if zoo.metadata.alignment["aligned"] else networks


def draw_samples(
    sampler: SaneSampler,
    method: SamplingMethod,
    prompts: torch.Tensor | Sequence[nn.Module],
    settings: SamplingSettings,
    score_fn,
    bn_batches,
) -> SampledModels:
    """``settings.num_samples`` networks drawn the way ``method`` says (seeded)."""
    options = {
        "mode": method.mode,
        "bandwidth": settings.bandwidth,
        "generator": torch.Generator().manual_seed(settings.seed),
        "bn_batches": bn_batches,
    }
    if method.kind == "kde":
        return sampler.sample(prompts, settings.num_samples, **options)
    if method.kind == "subsampled":
        return sampler.subsample(
            prompts, settings.num_samples, settings.num_candidates, score_fn, **options
        )
    return sampler.bootstrap(
        None if method.kind == "prior" else prompts,
        settings.num_samples,
        settings.num_candidates,
        score_fn,
        settings.rounds,
        prior_sigma=settings.prior_sigma,
        **options,
    )


def sample_novelty(
    samples: SampledModels, prompt_tokens: torch.Tensor, zoo: ZooDataset, mask: torch.Tensor
) -> dict[str, float]:
    """Medians, in normalized weight space, of the distance of every sample to its nearest
    training checkpoint (any epoch) and to its nearest prompt, and of every prompt to its
    nearest other prompt (the scale: how far apart distinct trained networks are)."""
    report = novelty_report(samples.tokens, split_token_chunks(zoo.splits["train"]), mask)
    to_prompts, _ = nearest_neighbor_distances(samples.tokens, prompt_tokens, mask)
    between_prompts, _ = nearest_neighbor_distances(
        prompt_tokens, prompt_tokens, mask, exclude_identical=True
    )
    sample_distance = float(report.sample_distances.median())
    prompt_distance = float(between_prompts.median())
    return {
        "sample_to_nearest_training_model": sample_distance,
        "sample_to_nearest_prompt": float(to_prompts.median()),
        "prompt_to_nearest_prompt": prompt_distance,
        "relative": sample_distance / prompt_distance,
    }


def compare_sampling(
    model: SaneModel,
    zoo: ZooDataset,
    methods: Sequence[SamplingMethod],
    settings: SamplingSettings,
    *,
    prompt_zoo: ZooDataset | None = None,
    task: ImageDataset | None = None,
    extra_groups: Mapping[str, Sequence[nn.Module]] | None = None,
    include_prompts: bool = True,
    on_samples: Callable[[str, SampledModels], None] | None = None,
) -> SamplingResults:
    """Sample networks with every method, fine-tune them next to from-scratch networks.

    Args:
        model: SANE pretrained on ``zoo`` (whose normalization decodes the samples).
        zoo: the zoo dataset SANE was trained on; the novelty reference is its train split.
        methods: the sampling methods, one evaluated group each.
        settings: prompts, sample counts, KDE bandwidth and fine-tuning.
        prompt_zoo: the zoo the prompts come from (default ``zoo``); another task's zoo samples
            for that task (its networks are aligned to ``zoo``'s reference and normalized with
            ``zoo``'s statistics).
        task: the data to score candidates on and fine-tune on (default: the prompt zoo's task).
        extra_groups: further networks to fine-tune the same way (e.g. transfer baselines).
        include_prompts: also fine-tune the prompt networks themselves (a "prompt" group).
        on_samples: called with each method's name and samples before fine-tuning (e.g. to save
            the networks, as `sample_networks` does).
    """
    prompt_zoo = prompt_zoo or zoo
    prompt_split = prompt_zoo.splits[settings.prompt_split]
    rows = choose_prompts(prompt_zoo, settings)
    hyperparameters = prompt_split[rows[0]]["hyperparameters"]
    sampler = SaneSampler.from_zoo(
        model,
        zoo.metadata,
        architecture_kwargs=settings.architecture_kwargs,
        hyperparameters=hyperparameters,
        window=settings.window,
        halo=settings.halo,
    )
    prompt_tokens = sampler.prompt_tokens(zoo_prompts(zoo, prompt_zoo, rows, settings.prompt_split))
    task = task or load_task_dataset(prompt_zoo.metadata.zoo)
    score_fn = accuracy_score(task, settings.score_samples, settings.seed)
    has_norm = any(isinstance(m, _BatchNorm) for m in sampler.template.modules())
    bn_batches = (
        random_batches(task, settings.bn_batches, seed=settings.seed)
        if has_norm and settings.condition_bn
        else None
    )

    groups: dict[str, SampledModels | Sequence[nn.Module]] = {}
    novelties = {}
    with zoo_processes() as ranks:  # under a launcher: the methods are drawn on several ranks
        drawn = {}
        for method in my_share(list(methods), ranks):  # each draw is seeded on its own
            samples = draw_samples(sampler, method, prompt_tokens, settings, score_fn, bn_batches)
            novelty = sample_novelty(samples, prompt_tokens, zoo, sampler.mask)
            drawn[method.name] = (samples, novelty)
        drawn = {name: draw for part in ranks.all_gather(drawn) for name, draw in part.items()}
        for method in methods:  # the order of one process
            samples, novelties[method.name] = drawn[method.name]
            groups[method.name] = samples  # SampledModels: the baselines need tokens
            if on_samples is not None and ranks.rank == 0:
                on_samples(method.name, samples)
    init = hyperparameters.get("init") or "default"
    groups["from scratch"] = scratch_models(
        sampler.template, settings.num_samples, init, settings.seed
    )
    if include_prompts:
        groups["prompts"] = prompt_networks(
            prompt_zoo, rows[: settings.num_samples], settings.prompt_split
        )
    groups.update(extra_groups or {})
    with zoo_processes() as ranks:
        evaluation = None
        if ranks.rank == 0:  # one population: its dropout masks are drawn for all networks
            baselines = None
            if settings.baselines:
                baselines = MemorizationBaselines(
                    sampler,
                    prompt_tokens,
                    lambda: split_token_chunks(zoo.splits["train"]),
                    training_checkpoints(zoo, prompt_split_epoch(prompt_zoo, settings), settings),
                    settings.noise_levels,
                    settings.num_samples,
                    settings.seed,
                    bn_batches,
                    score_fn,
                    settings.num_candidates,
                    selection_rounds(methods, settings),
                )
            evaluation = evaluate_samples(
                groups,
                task,
                settings.finetune_epochs,
                seed=settings.seed,
                device=model.device,
                baselines=baselines,
                **training_recipe(hyperparameters),
            )
        evaluation = ranks.from_rank_0(evaluation)
    return SamplingResults(evaluation, novelties)


def selection_rounds(
    methods: Sequence[SamplingMethod], settings: SamplingSettings
) -> dict[str, int]:
    """Rounds of candidate selection of every selecting method (the baselines select their
    matched noise the same way): subsampling one, bootstrapping and the prior ``rounds``."""
    return {
        method.name: 1 if method.kind == "subsampled" else settings.rounds
        for method in methods
        if method.kind != "kde"
    }


def prompt_split_epoch(prompt_zoo: ZooDataset, settings: SamplingSettings) -> int:
    """The epoch the prompts are taken at (``prompt_epoch``, default the split's last)."""
    if settings.prompt_epoch is not None:
        return settings.prompt_epoch
    return int(max(prompt_zoo.splits[settings.prompt_split]["epoch"]))


def training_checkpoints(
    zoo: ZooDataset, epoch: int, settings: SamplingSettings
) -> torch.Tensor | None:
    """Normalized tokens of up to ``novelty_networks`` train-split checkpoints at ``epoch`` (the
    first ones by row; all epochs if none is at ``epoch``): whose mistakes samples should not
    copy. None when ``novelty_networks`` is 0."""
    if settings.novelty_networks <= 0:
        return None
    train = zoo.splits["train"]
    epochs = np.array(train["epoch"])
    rows = np.flatnonzero(epochs == epoch)
    rows = rows if len(rows) else np.arange(len(train))
    rows = rows[: settings.novelty_networks].tolist()
    return train.with_format("torch", columns=["tokens"])[rows]["tokens"].float()


def cached_sampling(path: str | Path, run) -> SamplingResults:
    """``run()`` once: its results are saved to ``path`` (JSON) and loaded on later calls."""
    path = Path(path)
    if path.is_file():
        print(f"    {path} exists: loading the results")
        return SamplingResults.from_dict(json.loads(path.read_text()))
    results = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.to_dict(), indent=1) + "\n")
    return results
