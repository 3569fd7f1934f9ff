"""The dataset card (README.md) of a zoo dataset: architecture, data, protocol, statistics."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from sane_hf.zoo.formats import DATASET_METADATA_FILE
from sane_hf.zoo.metadata import ZooMetadata

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
    metadata: ZooMetadata,
    *,
    repo_id: str | None = None,
    card_data: DatasetCardData | None = None,
) -> DatasetCard:
    """A dataset card for a zoo dataset: architecture, data, protocol and property statistics.

    ``card_data`` (e.g. the metadata ``push_to_hub`` wrote: ``configs``, ``dataset_info``) is
    kept and completed with a name, tags and a size category.
    """
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
        f"`{DATASET_METADATA_FILE}` to de-normalize generated weights\n"
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
