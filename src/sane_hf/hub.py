"""Hugging Face Hub integration as free functions (timm's `_hub.py`): model cards and pushes.

The model files never import this module: they are copied next to the weights for
`trust_remote_code` loading and must work without sane-hf installed, so `save_pretrained` and
`push_to_hub` stay transformers' own and the SANE card is written here.

transformers' own `push_to_hub` keeps an existing card or writes one with
`library_name: transformers`; `push_model_to_hub` uploads our card instead, every time.
"""

import contextlib
import dataclasses
import importlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

from datasets import DatasetDict, SplitDict, SplitInfo
from datasets.info import DatasetInfo, DatasetInfosDict
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    DatasetCardData,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)
from huggingface_hub.errors import HfHubHTTPError

from sane_hf.models.sane.configuration_sane import SaneConfig
from sane_hf.models.sane.modeling_sane import SanePreTrainedModel
from sane_hf.models.sane.processing_sane import SaneProcessor
from sane_hf.zoo.card import build_zoo_dataset_card
from sane_hf.zoo.formats import DATASET_METADATA_FILE, PROBE_HEADS_CONFIG_FILE
from sane_hf.zoo.metadata import ZooDataset, ZooMetadata
from sane_hf.zoo.provenance import provenance_lines, test_accuracy_meaning
from sane_hf.zoo.storage import as_splits, load_zoo_dataset, save_zoo_dataset

LIBRARY_NAME = "sane-hf"
MODEL_TAGS = ("sane", "weight-space-learning", "hyper-representations", "model-zoo")
MODEL_CARD_TEMPLATE = files("sane_hf") / "templates" / "model_card.md"
# The model-index task of every SANE result: representations of networks from their weights.
EVAL_TASK = {"task_type": "feature-extraction", "task_name": "Weight-space representation learning"}
CHECKPOINT_PREFIX = "checkpoint-"  # pretraining's resumable states: never pushed
METRIC_LABELS = {"r2": "R^2", "accuracy": "accuracy"}


def probe_metric_name(metric: str, property_name: str) -> str:
    """Model-card name of a shipped probe head's test score, e.g. ``R^2 test_acc (shipped ...)``."""
    return f"{METRIC_LABELS.get(metric, metric)} {property_name} (shipped probe head, test split)"


def probe_head_metrics(folder: str | os.PathLike) -> dict[str, float]:
    """Test scores of the probe heads saved in a model folder (none: ``{}``)."""
    path = Path(folder) / PROBE_HEADS_CONFIG_FILE
    if not path.is_file():
        return {}
    heads = json.loads(path.read_text())["heads"]
    return {probe_metric_name(h["metric"], h["name"]): h["test_score"] for h in heads}


def build_model_card(
    config: SaneConfig,
    *,
    num_parameters: int,
    model_id: str,
    metrics: dict[str, float] | None = None,
    tags: list[str] | None = None,
    sections: dict[str, str] | None = None,
    probe_properties: list[str] | None = None,
) -> ModelCard:
    """Render the SANE model card of a model with `config`.

    Args:
        config: the model's configuration; `config.zoo_dataset` becomes the card's dataset.
        num_parameters: parameter count shown in the card.
        model_id: Hub id (or local folder) used as the model's name and in the usage example.
        metrics: evaluation results, name -> value (for example `{"test_mse": 0.15}`), written as
            a metrics table and as the `model-index` metadata; they need `config.zoo_dataset`.
        tags: extra Hub tags next to the SANE ones.
        sections: further markdown sections, title -> body, rendered after the evaluation
            (for example the zoo's protocol, the training configuration, full result tables
            and the limitations of a released checkpoint).
        probe_properties: properties of the probe heads saved with the model; the usage
            example then shows how to predict them.
    """
    metrics = _check_metrics(metrics, config.zoo_dataset)
    model_name = model_id.rstrip("/").split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name=LIBRARY_NAME,
        license="apache-2.0",
        tags=list(dict.fromkeys([*MODEL_TAGS, *(tags or [])])),
        datasets=[config.zoo_dataset] if config.zoo_dataset else None,
        metrics=list(metrics) or None,
        eval_results=[
            _eval_result(name, value, config.zoo_dataset) for name, value in metrics.items()
        ]
        or None,
    )
    return ModelCard.from_template(
        card_data,
        template_str=MODEL_CARD_TEMPLATE.read_text(encoding="utf-8"),
        model_name=model_name,
        model_id=model_id,
        config=config,
        num_parameters=num_parameters,
        metrics=metrics,
        sections=sections or {},
        probe_properties=probe_properties or [],
    )


def save_model_card(
    model: SanePreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    metrics: dict[str, float] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the model card of `model` to `save_directory/README.md`.

    The usage example names `repo_id` when given, else the folder itself. Returns the card's path.
    """
    card = build_model_card(
        model.config,
        num_parameters=model.num_parameters(),
        model_id=repo_id or os.fspath(save_directory),
        metrics=metrics,
        tags=model.model_tags,
        probe_properties=_probe_properties(save_directory),
    )
    path = Path(save_directory) / "README.md"
    card.save(path)
    return path


def push_model_to_hub(
    model: SanePreTrainedModel,
    repo_id: str,
    *,
    processor: SaneProcessor | None = None,
    metrics: dict[str, float] | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload `model` (weights, config, remote code, SANE model card) and its `processor` to the
    Hub repo `repo_id`, in one commit: a failed push publishes nothing half.

    Arguments as transformers' `push_to_hub`, plus `processor` (written beside the weights, so
    ``SaneProcessor.from_pretrained(repo_id)`` works) and `metrics` for the card. The repo is
    created if needed; a `revision` branch too. Returns the commit.
    """
    api = HfApi(token=token)
    with _http_errors(repo_id):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if tags:
            model.add_model_tags(tags)
        with tempfile.TemporaryDirectory() as work_dir:
            model.save_pretrained(work_dir, max_shard_size=max_shard_size)
            if processor is not None:
                processor.save_pretrained(work_dir)
            save_model_card(model, work_dir, metrics=metrics, repo_id=repo_id)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=work_dir,
                commit_message=commit_message or "Upload SANE model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


def _check_metrics(metrics: dict[str, float] | None, zoo_dataset: str | None) -> dict[str, float]:
    if not metrics:
        return {}
    if zoo_dataset is None:
        raise ValueError(
            "model-card metrics need the dataset they were measured on: set config.zoo_dataset "
            "to the zoo's Hub id"
        )
    for name, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")
    return {name: float(value) for name, value in metrics.items()}


def _eval_result(name: str, value: float, zoo_dataset: str) -> EvalResult:
    return EvalResult(
        **EVAL_TASK,
        dataset_type=zoo_dataset,
        dataset_name=zoo_dataset,
        metric_type=name,
        metric_name=name,
        metric_value=value,
    )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Upload a saved SANE model (a ``save_pretrained`` folder) or zoo dataset to the Hub.

    A model folder is uploaded in one commit, as pretraining's own push does: weights, config,
    remote code, processor, probe heads, ``sane_zoo.json`` and logs, without the resumable
    ``checkpoint-*`` states; its card is written anew for ``repo_id``, with the folder card's
    results and the probe heads' test scores. A zoo dataset folder (``save_zoo_dataset``) goes
    through `push_zoo_dataset`, so ``load_zoo_dataset(repo_id)`` works on the repo.
    """
    folder = Path(folder)
    if (folder / DATASET_METADATA_FILE).is_file() and (folder / "dataset_dict.json").is_file():
        return push_zoo_dataset(
            load_zoo_dataset(folder),
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message or "Upload zoo dataset with sane-hf",
        )
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is neither a SANE model folder (config.json from save_pretrained) nor a "
            f"zoo dataset folder ({DATASET_METADATA_FILE} and dataset_dict.json from save_zoo_dataset)"
        )
    card = folder_model_card(folder, repo_id)
    operations = [
        CommitOperationAdd(file.relative_to(folder).as_posix(), str(file))
        for file in sorted(folder.rglob("*"))
        if file.is_file() and _pushed(file.relative_to(folder))
    ]
    operations.append(CommitOperationAdd("README.md", str(card).encode()))
    api = HfApi(token=token)
    with _http_errors(repo_id):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.create_commit(
            repo_id, operations, commit_message=commit_message or "Upload SANE model with sane-hf"
        )


def _pushed(relative: Path) -> bool:
    """Files of a model folder that go to the Hub: not checkpoints, hidden files or the card."""
    first = relative.parts[0]
    return not (
        first.startswith((CHECKPOINT_PREFIX, "."))
        or relative.as_posix() == "README.md"
        or relative.name.endswith(".tmp")
    )


def folder_model_card(
    folder: Path, repo_id: str, sections: dict[str, str] | None = None
) -> ModelCard:
    """The card of a saved model folder, rendered for ``repo_id`` (a Hub id, or the folder itself):
    the folder card's results and extra sections plus the probe heads' test scores, and
    ``sections`` (title -> markdown) added or replaced."""
    config = SaneConfig.from_pretrained(folder)
    sections_update, metrics, sections = sections, {}, {}
    if (folder / "README.md").is_file():
        existing = ModelCard.load(folder / "README.md")
        for result in existing.data.eval_results or []:
            metrics[result.metric_name or result.metric_type] = result.metric_value
        sections = _extra_sections(existing.text)
    metrics.update(probe_head_metrics(folder))
    sections.update(trust_sections(folder))
    return build_model_card(
        config,
        num_parameters=_num_parameters(folder),
        model_id=repo_id,
        metrics=metrics if config.zoo_dataset else None,
        sections=sections | (sections_update or {}),
        probe_properties=_probe_properties(folder),
    )


# The sections the template renders itself; every other "## " section of a card is extra.
TEMPLATE_SECTIONS = (
    "Intended use",
    "Model details",
    "Training data",
    "Evaluation",
    "Usage",
    "Citation",
)


def trust_sections(folder: str | os.PathLike) -> dict[str, str]:
    """Card sections on what the model's answers rest on: how the zoo's networks were made
    (the processor's provenance) and which features each shipped probe head reads."""
    folder, sections = Path(folder), {}
    processor_file = folder / "preprocessor_config.json"
    provenance = None
    if processor_file.is_file():
        provenance = json.loads(processor_file.read_text()).get("provenance")
    if provenance:
        lines = provenance_lines(provenance)
        sections["How the zoo's networks were made"] = "\n".join(
            [f"- {line}" for line in lines]
            + [
                "",
                "Networks made another way (other init, e.g. PyTorch's default non-zero biases, "
                "other input scaling, untrained) are outside what SANE and its probe heads "
                "learned; `sane-hf predict` flags them (in-distribution percentiles).",
            ]
        )
    heads_file = folder / PROBE_HEADS_CONFIG_FILE
    if heads_file.is_file():
        heads = json.loads(heads_file.read_text())["heads"]
        rows = [
            "| property | features (chosen on validation) | validation | test |",
            "|---|---|---|---|",
        ]
        for head in heads:
            validation = head.get("validation_score")
            rows.append(
                f"| {head['name']} | {head.get('features', 'SANE')} | "
                f"{'-' if validation is None else f'{validation:.3f}'} | {head['test_score']:.3f} |"
            )
        note = (
            "`sane-hf predict` leaves out a head whose R² is <= 0 on validation or test (no "
            "better than the zoo's mean). `SANE + s(W)` reads the mean latent next to the "
            "weight statistics s(W): it is not SANE alone."
        )
        if any(head["name"] == "test_acc" for head in heads):
            note += f" test_acc is the {test_accuracy_meaning(provenance)}."
        sections["Probe heads"] = "\n".join(rows) + "\n\n" + note
    return sections


def _extra_sections(text: str) -> dict[str, str]:
    """``{title: body}`` of a card's sections that the template does not render itself."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            current = None if title in TEMPLATE_SECTIONS else title
            if current is not None:
                sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {title: "\n".join(lines).strip() for title, lines in sections.items()}


def _num_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        if file.name.startswith("model"):
            with safe_open(file, "pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a dict)
                    total += math.prod(weights.get_slice(key).get_shape())
    return total


def _probe_properties(folder: str | os.PathLike) -> list[str]:
    path = Path(folder) / PROBE_HEADS_CONFIG_FILE
    if not path.is_file():
        return []
    return [head["name"] for head in json.loads(path.read_text())["heads"]]


class HubError(RuntimeError):
    """A Hub request failed: one line naming the repo and the HTTP status (no chained traceback)."""


# Parquet shards of a pushed zoo dataset stay below about this size (the Hub's viewer and
# datasets' own push use a few hundred MB).
PARQUET_SHARD_BYTES = 500 * 2**20


@contextlib.contextmanager
def _http_errors(repo_id: str) -> Iterator[None]:
    """Turn the Hub client's HTTP errors into a one-line `HubError` naming repo and status."""
    try:
        yield
    except (HfHubHTTPError, RuntimeError, *_connection_errors()) as error:
        raise HubError(f"push of model {repo_id} failed: {_describe(error)}") from None


def _describe(error: Exception) -> str:
    """``HTTP <status> (<first line of the server's message>)`` or the error's first line.

    The client wraps a failed file upload in ``RuntimeError("Error while uploading ...")``: the
    HTTP error it comes from (its ``__cause__``) says what went wrong.
    """
    cause = error
    while getattr(cause, "response", None) is None and cause.__cause__ is not None:
        cause = cause.__cause__
    if getattr(cause, "response", None) is not None:
        error = cause
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if status is None:
        return f"{type(error).__name__}: {first_line}"
    reason = getattr(error, "server_message", None) or first_line
    return f"HTTP {status} ({reason.splitlines()[0] if reason else 'no message'})"


def push_zoo_dataset(
    dataset: DatasetDict | ZooDataset,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload zoo dataset with sane-hf",
    keep_on_failure: str | os.PathLike | None = None,
) -> CommitInfo:
    """Push the splits (parquet), ``sane_zoo.json`` and the dataset card in ONE commit.

    The parquet shards are written here (``data/<split>-<shard>-of-<shards>.parquet``, the layout of
    datasets' own ``push_to_hub``) and committed together with ``sane_zoo.json`` and the card,
    whose ``configs`` point ``datasets.load_dataset(repo_id)`` at them; data files of an earlier
    push that this one does not overwrite are deleted in the same commit. A failure anywhere
    leaves the repo as it was: never splits without their ``sane_zoo.json``.

    Raises `HubError` (repo and HTTP status in one line) when the Hub refuses or fails; with
    ``keep_on_failure`` the dataset is first saved there (`save_zoo_dataset`) so a build is not
    lost, and the message says where.
    """
    splits, metadata = as_splits(dataset)
    api = HfApi(token=token)
    try:
        with tempfile.TemporaryDirectory() as folder:
            data_files = _write_parquet_shards(splits, Path(folder))
            repo_id = api.create_repo(
                repo_id, repo_type="dataset", private=private, exist_ok=True
            ).repo_id
            card = build_zoo_dataset_card(metadata, repo_id=repo_id, card_data=_card_data(splits))
            operations = [
                CommitOperationAdd(path_in_repo, str(Path(folder) / path_in_repo))
                for path_in_repo in data_files
            ]
            operations += [
                CommitOperationAdd("README.md", str(card).encode()),
                # the fingerprint describes local Arrow files, not the pushed parquet
                CommitOperationAdd(DATASET_METADATA_FILE, _metadata_bytes(metadata)),
            ]
            stale = [
                path
                for path in api.list_repo_files(repo_id, repo_type="dataset")
                if path.startswith("data/") and path not in data_files
            ]
            operations += [CommitOperationDelete(path) for path in stale]
            return api.create_commit(
                repo_id, operations, commit_message=commit_message, repo_type="dataset"
            )
    except (HfHubHTTPError, OSError, RuntimeError, *_connection_errors()) as error:
        # RuntimeError: the client's "Error while uploading" around a failed LFS upload
        kept = ""
        if keep_on_failure is not None:
            save_zoo_dataset(ZooDataset(splits, metadata), keep_on_failure)
            kept = f"; the built dataset is kept in {keep_on_failure}"
        raise HubError(f"push of zoo dataset {repo_id} failed: {_describe(error)}{kept}") from None


def _connection_errors() -> tuple[type[Exception], ...]:
    """The HTTP library's transport errors (a dropped connection, a timeout): ``httpx`` or
    ``httpx2``, whichever this huggingface_hub uses."""
    from huggingface_hub import errors as hub_errors

    http = importlib.import_module(hub_errors.Response.__module__.split(".")[0])
    return (http.TransportError,)


def _metadata_bytes(metadata: ZooMetadata) -> bytes:
    return (dataclasses.replace(metadata, fingerprint=None).to_json() + "\n").encode()


def _card_data(splits: DatasetDict) -> DatasetCardData:
    """The card metadata datasets' own ``push_to_hub`` writes: ``configs`` pointing at the parquet
    shards, and ``dataset_info`` with the features (Array2D tokens) and split sizes."""
    card_data = DatasetCardData(
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"data/{name}-*"} for name in splits],
            }
        ]
    )
    split_dict = SplitDict()
    for name, split in splits.items():
        split_dict.add(SplitInfo(name=name, num_bytes=split.data.nbytes, num_examples=len(split)))
    first = next(iter(splits.values()))
    info = DatasetInfo(features=first.features, splits=split_dict)
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    return card_data


def _write_parquet_shards(splits: DatasetDict, folder: Path) -> list[str]:
    """Write every split as parquet shards under ``folder/data``; return their repo paths."""
    paths = []
    for name, split in splits.items():
        num_shards = max(1, math.ceil(split.data.nbytes / PARQUET_SHARD_BYTES))
        for index in range(num_shards):
            path = f"data/{name}-{index:05d}-of-{num_shards:05d}.parquet"
            (folder / "data").mkdir(exist_ok=True)
            split.shard(num_shards, index, contiguous=True).to_parquet(str(folder / path))
            paths.append(path)
    return paths


__all__ = [
    "LIBRARY_NAME",
    "MODEL_TAGS",
    "HubError",
    "build_model_card",
    "folder_model_card",
    "push_folder",
    "push_model_to_hub",
    "push_zoo_dataset",
    "save_model_card",
]
