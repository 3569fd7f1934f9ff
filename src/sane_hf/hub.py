"""Hugging Face Hub integration: model cards, pushing SANE models with their card, zoo dataset cards.

`SanePreTrainedModel.save_pretrained` and `.push_to_hub` call into this module. It lives outside
`modeling_sane.py` because that file is copied next to the weights for `trust_remote_code`
loading and must work without sane-hf installed; card writing is optional there.

transformers' own `push_to_hub` keeps an existing card or writes one with
`library_name: transformers`; `push_model_to_hub` uploads our card instead, every time.
"""

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import (
    CommitInfo,
    DatasetCard,
    DatasetCardData,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)

from .configuration_sane import SaneConfig
from .modeling_sane import SanePreTrainedModel

if TYPE_CHECKING:
    from .zoo_dataset import ZooMetadata

LIBRARY_NAME = "sane-hf"
MODEL_TAGS = ("sane", "weight-space-learning", "hyper-representations", "model-zoo")
MODEL_CARD_TEMPLATE = files("sane_hf") / "templates" / "model_card.md"
# The model-index task of every SANE result: representations of networks from their weights.
EVAL_TASK = {"task_type": "feature-extraction", "task_name": "Weight-space representation learning"}


def build_model_card(
    config: SaneConfig,
    *,
    num_parameters: int,
    model_id: str,
    metrics: dict[str, float] | None = None,
    tags: list[str] | None = None,
    sections: dict[str, str] | None = None,
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
    )
    path = Path(save_directory) / "README.md"
    card.save(path)
    return path


def push_model_to_hub(
    model: SanePreTrainedModel,
    repo_id: str,
    *,
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
    """Upload `model` (weights, config, remote code and SANE model card) to the Hub repo `repo_id`.

    Arguments as transformers' `push_to_hub`, plus `metrics` for the card. The repo is created if
    needed; a `revision` branch too. Returns the commit.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    if tags:
        model.add_model_tags(tags)
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(
            work_dir, max_shard_size=max_shard_size, metrics=metrics, repo_id=repo_id
        )
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

    A model folder is uploaded as it is (weights, config, remote code, card, ``sane_zoo.json``).
    A zoo dataset folder (``save_zoo_dataset``) is converted to the Hub's parquet layout by
    `sane_hf.zoo_dataset.push_zoo_dataset`, so ``load_zoo_dataset(repo_id)`` works on the repo.
    """
    from .zoo_dataset import METADATA_FILE, load_zoo_dataset, push_zoo_dataset

    folder = Path(folder)
    if (folder / METADATA_FILE).is_file() and (folder / "dataset_dict.json").is_file():
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
            f"zoo dataset folder ({METADATA_FILE} and dataset_dict.json from save_zoo_dataset)"
        )
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload SANE model with sane-hf",
    )


# ----------------------------------------------------------------------------------------------
# Dataset cards for zoo datasets (`sane_hf.zoo_dataset`)


ZOO_DATASET_TAGS = ("sane", "model-zoo", "weight-space-learning", "neural-network-weights")
COLUMN_DOCS = {
    "model_id": "network id; all checkpoints of one network share it (and one split)",
    "epoch": "training epoch of the checkpoint (0 = initialization)",
    "tokens": "normalized weight tokens `[N, T]`; `ZooMetadata.decode` gives the state_dict",
    "positions": "`[N, 3]` (global token index, layer index, row index)",
    "counts": "real values per token; the padding mask is `arange(T) < counts[:, None]`",
    "seed": "training seed of the network",
    "ggap": "generalization gap, train_acc - test_acc",
    "hyperparameters": "training hyperparameters of the network",
}


def _size_category(count: int) -> str:
    for limit, name in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K")):
        if count < limit:
            return name
    return "100K<n<1M" if count < 10**6 else "n>1M"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def build_zoo_dataset_card(
    metadata: "ZooMetadata",
    *,
    repo_id: str | None = None,
    card_data: DatasetCardData | None = None,
) -> DatasetCard:
    """A dataset card for a zoo dataset: architecture, data, protocol and property statistics.

    ``card_data`` (e.g. the metadata ``push_to_hub`` wrote: ``configs``, ``dataset_info``) is
    kept and completed with a name, tags and a size category.
    """
    from .zoo_dataset import METADATA_FILE  # zoo_dataset imports this module

    zoo, statistics, layout = metadata.zoo, metadata.statistics, metadata.layout
    architecture = zoo["architecture"]
    name = f"{architecture} zoo on {zoo.get('dataset', 'an unnamed dataset')}"
    card_data = card_data or DatasetCardData()
    card_data.pretty_name = name
    card_data.tags = list(
        dict.fromkeys([*ZOO_DATASET_TAGS, architecture, *(card_data.get("tags") or [])])
    )
    card_data.size_categories = [_size_category(statistics["num_checkpoints"])]
    if "license" in zoo:
        card_data.license = zoo["license"]

    build_arguments = ", ".join(
        [repr(architecture), *(f"{k}={v!r}" for k, v in zoo.get("architecture_kwargs", {}).items())]
    )
    num_parameters = sum(
        math.prod(spec.shape) for layer in layout.layers for spec in layer.parameters
    )
    alignment = metadata.alignment
    if alignment["aligned"]:
        epoch = alignment["alignment_epoch"]
        aligned = (
            f"every network is permuted onto `{alignment['reference_model_id']}` (epoch "
            f"{alignment['reference_epoch']}) by weight matching; the permutation of a network is "
            f"found on its {'last' if epoch is None else f'epoch-{epoch}'} checkpoint and applied "
            "to all its checkpoints (permutations do not change what a network computes)"
        )
    else:
        aligned = "none (networks keep their own hidden-unit order)"
    split = metadata.split
    protocol_keys = [key for key in zoo if key not in ("architecture", "architecture_kwargs")]
    per_epoch = [
        (
            row["epoch"],
            row["checkpoints"],
            *(f"{row['test_acc'][stat]:.4f}" for stat in ("mean", "std", "min", "max")),
            f"{row['train_acc']['mean']:.4f}",
        )
        for row in statistics["per_epoch"]
    ]
    load_from = repo_id or "path/to/saved/zoo"
    sections = [
        f"# {name}",
        f"A population of {statistics['num_models']} `{architecture}` networks "
        f"({statistics['num_checkpoints']} checkpoints), stored as weight tokens for SANE "
        "([Schürholt et al., ICML 2024](https://arxiv.org/abs/2406.09997)) with sane-hf. "
        "One row per checkpoint.",
        "## Architecture",
        f"- `build_model({build_arguments})`: "
        f"{num_parameters:,} tokenized parameters\n"
        f"- {layout.num_tokens} tokens of {layout.tokensize} values per checkpoint, "
        f"{layout.num_layers} layers",
        "## Data",
        "\n".join(f"- {key}: `{json.dumps(zoo[key])}`" for key in protocol_keys),
        "## Preprocessing",
        f"- split {'/'.join(str(round(100 * f)) for f in split['fractions'])} **by network** "
        f"(seed {split['seed']}): all checkpoints of a network are in one split\n"
        f"- alignment: {aligned}\n"
        "- normalization: per-parameter mean and std of the **training split only**, stored in "
        f"`{METADATA_FILE}` to de-normalize generated weights\n"
        f"- tokenizer: token size {metadata.tokenizer['tokensize']}, normalization layers "
        f"{'included' if metadata.tokenizer['include_norm'] else 'left out'}; "
        f"tokens stored as {metadata.tokenizer['dtype']}",
        "## Splits",
        _markdown_table(
            ("split", "networks", "checkpoints"),
            ((s, c["models"], c["checkpoints"]) for s, c in statistics.get("splits", {}).items()),
        ),
        "## Test accuracy per epoch",
        _markdown_table(
            ("epoch", "checkpoints", "mean", "std", "min", "max", "train acc mean"), per_epoch
        ),
        "## Columns",
        "\n".join(f"- `{column}`: {doc}" for column, doc in COLUMN_DOCS.items())
        + "\n- `train_loss`, `train_acc`, `val_loss`, `val_acc`, `test_loss`, `test_acc`: "
        "properties of the checkpoint (accuracies are fractions)",
        "## Usage",
        "```python\nfrom sane_hf import load_zoo_dataset\n\n"
        f"zoo = load_zoo_dataset({load_from!r})\n"
        'row = zoo.splits["train"].with_format("torch")[0]\n'
        'state_dict = zoo.metadata.decode(row["tokens"])  # de-normalized weights\n'
        'model = zoo.metadata.build_model(row["hyperparameters"])\n'
        "model.load_state_dict(state_dict)\n```",
    ]
    return DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


__all__ = [
    "LIBRARY_NAME",
    "MODEL_TAGS",
    "ZOO_DATASET_TAGS",
    "build_model_card",
    "build_zoo_dataset_card",
    "push_folder",
    "push_model_to_hub",
    "save_model_card",
]
