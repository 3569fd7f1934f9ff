"""Sampling networks from SANE (paper Table 3): `compare_sampling` and `sample_networks`.

One implementation of sampling for the API, the CLI (``sane-hf sample``), the demo and the
experiments: the same `SamplingSettings` (one set of defaults, loaded by the config mechanism),
the same prompt choice (a small zoo gives all its checkpoints and says so), the same novelty
numbers, the same files. `compare_sampling` draws networks with every method and fine-tunes them
next to networks trained from scratch; `sample_networks` runs it and writes the samples, the
results (``sampling.json``) and the plots.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
from sane_hf.downstream.novelty import (
    nearest_neighbor_distances,
    novelty_report,
    split_token_chunks,
)
from sane_hf.downstream.sampling import SampledModels, SaneSampler, select_prompts
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.recipes.settings import DEFAULT_METHODS, SamplingMethod, SamplingSettings
from sane_hf.weights.alignment import align
from sane_hf.zoo.architectures import build_model
from sane_hf.zoo.distributed import (
    default_device,
    is_main_process,
    my_share,
    process_device,
    zoo_processes,
)
from sane_hf.zoo.formats import atomic_save_safetensors
from sane_hf.zoo.metadata import ZooDataset
from sane_hf.zoo.statistics import describe_zoo
from sane_hf.zoo.storage import load_zoo_dataset
from sane_hf.zoo.tasks import ImageDataset

RECIPE_KEYS = ("optimizer", "lr", "weight_decay", "batch_size")
SAMPLES_DIR = "samples"
RESULTS_FILE = "sampling.json"
PLOT_FILE = "sampling.png"
NOVELTY_PLOT_FILE = "novelty.png"


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


def sample_networks(
    model: str | os.PathLike | SaneModel,
    dataset: str | os.PathLike | ZooDataset,
    output_dir: str | os.PathLike,
    settings: SamplingSettings | None = None,
    methods: Sequence[SamplingMethod | str] = DEFAULT_METHODS,
    *,
    prompt_dataset: str | os.PathLike | ZooDataset | None = None,
    task_dataset: str | None = None,
    include_prompts: bool = True,
    extra_groups: Mapping[str, Sequence[nn.Module]] | None = None,
    device: str | None = None,
    resume: bool = False,
) -> SamplingResults:
    """Sample networks from SANE with every method, fine-tune them next to networks trained
    from scratch, and write the results.

    Args:
        model: a pretrained SANE (folder or Hub id, or the model itself).
        dataset: the zoo dataset SANE was pretrained on (folder, Hub id or loaded).
        output_dir: receives ``samples/<method>/sample_<i>.safetensors`` (the networks as
            sampled, before fine-tuning), ``sampling.json`` (accuracy per fine-tuning epoch and
            novelty per method), ``sampling.png`` and ``novelty.png``.
        settings: prompts, counts, KDE and fine-tuning (default: `SamplingSettings`' defaults).
        methods: `SamplingMethod`\\ s or their kinds (``kde``, ``subsampled``, ``bootstrapped``,
            ``prior``).
        prompt_dataset: a zoo dataset of another task to take the prompts from.
        task_dataset: the task to score and fine-tune on (default: the prompt zoo's).
        include_prompts, extra_groups: further groups fine-tuned the same way (`compare_sampling`).
        device: where SANE runs (default: cuda when available, else cpu).
        resume: when ``output_dir`` holds the ``sampling.json`` of an earlier call, load it
            instead of sampling again (the plots are redrawn); the experiments resume this way.
    """
    settings = settings or SamplingSettings.load()
    methods = [m if isinstance(m, SamplingMethod) else SamplingMethod(m) for m in methods]
    output = Path(output_dir)
    zoo = dataset if isinstance(dataset, ZooDataset) else load_zoo_dataset(dataset)
    prompt_zoo = zoo
    if prompt_dataset is not None:
        prompt_zoo = (
            prompt_dataset
            if isinstance(prompt_dataset, ZooDataset)
            else load_zoo_dataset(prompt_dataset)
        )
    task_zoo = dict(prompt_zoo.metadata.zoo) | ({"dataset": task_dataset} if task_dataset else {})
    if resume and (output / RESULTS_FILE).is_file():
        print(f"    {output / RESULTS_FILE} exists: loading the results")
        results = SamplingResults.from_dict(json.loads((output / RESULTS_FILE).read_text()))
        if is_main_process():
            _plot_results(results, output, task_zoo)
        return results
    device = process_device(device or default_device())
    check_sampling_inputs(settings, zoo, prompt_zoo, device)
    if not isinstance(model, SaneModel):
        model = SaneModel.from_pretrained(model)
    model = model.to(device).eval()
    task = load_task_dataset(prompt_zoo.metadata.zoo, task_dataset) if task_dataset else None
    output.mkdir(parents=True, exist_ok=True)

    results = compare_sampling(
        model,
        zoo,
        methods,
        settings,
        prompt_zoo=prompt_zoo,
        task=task,
        extra_groups=extra_groups,
        include_prompts=include_prompts,
        on_samples=lambda name, samples: save_samples(samples, output / SAMPLES_DIR / _slug(name)),
    )
    if is_main_process():  # under a launcher every process holds the results
        (output / RESULTS_FILE).write_text(json.dumps(results.to_dict(), indent=1) + "\n")
        _plot_results(results, output, task_zoo)
    return results


def _plot_results(results: SamplingResults, output: Path, task_zoo: Mapping[str, Any]) -> None:
    """The accuracy and novelty plots, titled with the networks, their task and the split."""
    networks = describe_zoo(task_zoo)
    results.evaluation.plot(
        output / PLOT_FILE, f"Sampled vs from-scratch {networks}: test split accuracy"
    )
    if results.evaluation.novelty:  # accuracy against novelty, next to the baselines
        results.evaluation.plot_novelty(
            output / NOVELTY_PLOT_FILE,
            f"Test split accuracy before fine-tuning vs novelty: {networks}",
        )


def check_sampling_inputs(
    settings: SamplingSettings, zoo: ZooDataset, prompt_zoo: ZooDataset, device: str
) -> None:
    """The settings that need the zoos or the machine, checked before SANE loads and anything
    is sampled: the device, the prompts' split and ranking column, the architecture variant."""
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available here (use --device cpu)")
    if settings.prompt_split not in prompt_zoo.splits:
        raise ValueError(
            f"prompt_split {settings.prompt_split!r} is not a split of the prompt zoo "
            f"(splits: {list(prompt_zoo.splits)})"
        )
    columns = prompt_zoo.splits[settings.prompt_split].column_names
    if settings.prompt_metric not in columns:
        raise ValueError(
            f"prompt_metric {settings.prompt_metric!r} is not a column of the prompt zoo "
            f"(numeric columns: {[c for c in columns if c.endswith(('_acc', '_loss', 'ggap'))]})"
        )
    if settings.architecture_kwargs:
        described = zoo.metadata.zoo
        kwargs = {**described.get("architecture_kwargs", {}), **settings.architecture_kwargs}
        try:
            build_model(described["architecture"], **kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"architecture_kwargs {settings.architecture_kwargs}: {described['architecture']} "
                f"cannot be built with them ({str(error).splitlines()[0]})"
            ) from None


def save_samples(samples: SampledModels, folder: str | os.PathLike) -> list[Path]:
    """Each sampled network's state dict as ``sample_<i>.safetensors`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, network in enumerate(samples.models):
        path = folder / f"sample_{index:03d}.safetensors"
        atomic_save_safetensors({k: v.detach() for k, v in network.state_dict().items()}, path)
        paths.append(path)
    return paths


def _slug(name: str) -> str:
    """A folder name for a method name: ``SANE kde (shared)`` -> ``sane-kde-shared``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cached_sampling(path: str | Path, run: Callable[[], SamplingResults]) -> SamplingResults:
    """``run()`` once: its results are saved to ``path`` (JSON) and loaded on later calls (for
    scripts that call `compare_sampling` themselves; `sample_networks` resumes with
    ``resume=True``)."""
    path = Path(path)
    if path.is_file():
        print(f"    {path} exists: loading the results")
        return SamplingResults.from_dict(json.loads(path.read_text()))
    results = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.to_dict(), indent=1) + "\n")
    return results


__all__ = [
    "SamplingResults",
    "aligned_to_zoo",
    "cached_sampling",
    "choose_prompts",
    "compare_sampling",
    "draw_samples",
    "prompt_networks",
    "prompt_split_epoch",
    "sample_networks",
    "sample_novelty",
    "save_samples",
    "training_checkpoints",
    "training_recipe",
    "zoo_prompts",
    "zoo_reference_network",
]
