"""`sample_networks`: what ``sane-hf sample`` runs, `compare_sampling` plus the files it writes.

One implementation of sampling for the API, the demo and the CLI: the same `SamplingSettings`
(one set of defaults, loaded by the config mechanism), the same prompt choice (a small zoo
gives all its checkpoints and says so), the same novelty numbers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from sane_hf.downstream.evaluation import load_task_dataset
from sane_hf.downstream.pretrained import is_main_process
from sane_hf.downstream.sampling import SampledModels
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.recipes.experiments import (
    DEFAULT_METHODS,
    SamplingMethod,
    SamplingResults,
    SamplingSettings,
    compare_sampling,
)
from sane_hf.zoo.architectures import build_model
from sane_hf.zoo.dataset import ZooDataset, load_zoo_dataset
from sane_hf.zoo.distributed import process_device
from sane_hf.zoo.formats import atomic_save_safetensors

SAMPLES_DIR = "samples"
RESULTS_FILE = "sampling.json"
PLOT_FILE = "sampling.png"
NOVELTY_PLOT_FILE = "novelty.png"


def sample_networks(
    model: str | os.PathLike | SaneModel,
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: SamplingSettings | None = None,
    methods: Sequence[SamplingMethod | str] = DEFAULT_METHODS,
    *,
    prompt_dataset: str | os.PathLike | None = None,
    task_dataset: str | None = None,
    device: str | None = None,
) -> SamplingResults:
    """Sample networks from SANE with every method, fine-tune them next to networks trained
    from scratch, and write the results.

    Args:
        model: a pretrained SANE (folder or Hub id, or the model itself).
        dataset: the zoo dataset SANE was pretrained on (folder or Hub id).
        output_dir: receives ``samples/<method>/sample_<i>.safetensors`` (the networks as
            sampled, before fine-tuning), ``sampling.json`` (accuracy per fine-tuning epoch and
            novelty per method), ``sampling.png`` and ``novelty.png``.
        settings: prompts, counts, KDE and fine-tuning (default: the ``default`` preset).
        methods: `SamplingMethod`\\ s or their kinds (``kde``, ``subsampled``, ``bootstrapped``,
            ``prior``).
        prompt_dataset: a zoo dataset of another task to take the prompts from.
        task_dataset: the task to score and fine-tune on (default: the prompt zoo's).
        device: where SANE runs (default: cuda when available, else cpu).
    """
    import torch

    settings = settings or SamplingSettings.load()
    methods = [m if isinstance(m, SamplingMethod) else SamplingMethod(m) for m in methods]
    device = process_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    zoo = load_zoo_dataset(dataset)
    prompt_zoo = load_zoo_dataset(prompt_dataset) if prompt_dataset else zoo
    check_sampling_inputs(settings, zoo, prompt_zoo, device)
    if not isinstance(model, SaneModel):
        model = SaneModel.from_pretrained(model)
    model = model.to(device).eval()
    task = load_task_dataset(prompt_zoo.metadata.zoo, task_dataset) if task_dataset else None
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)

    results = compare_sampling(
        model,
        zoo,
        methods,
        settings,
        prompt_zoo=prompt_zoo,
        task=task,
        on_samples=lambda name, samples: save_samples(samples, output / SAMPLES_DIR / _slug(name)),
    )
    if is_main_process():  # under a launcher every process holds the results
        (output / RESULTS_FILE).write_text(json.dumps(results.to_dict(), indent=1) + "\n")
        results.evaluation.plot(output / PLOT_FILE)
        if results.evaluation.novelty:  # accuracy against novelty, next to the baselines
            results.evaluation.plot_novelty(output / NOVELTY_PLOT_FILE)
    return results


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
