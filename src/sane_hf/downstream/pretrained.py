"""A released SANE applied to the user's own networks: embeddings and predicted properties.

One call each, behind the ``sane-hf embed`` and ``sane-hf predict`` commands: load the model, its
`SaneProcessor` and (for predictions) its probe heads from a folder or Hub id, read the networks
(files, folders, raw zoos, zoo datasets, Hub ids), embed them all at once and write the result::

    result = embed_networks("checkpoints/sane-cnn-mnist", ["my_nets/"], output="emb.parquet")
    table = predict_networks("checkpoints/sane-cnn-mnist", ["my_nets/"])
    print(table.table())   # id, predicted test_acc, epoch, ggap
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sane_hf.downstream.embedding import Embeddings, embed
from sane_hf.downstream.probe_heads import ProbeHeads
from sane_hf.downstream.sharding import concatenate_embeddings, gather_embeddings, my_networks
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.models.sane.network_inputs import NamedWeights, NetworkInput, iter_networks
from sane_hf.models.sane.processing_sane import SaneProcessor
from sane_hf.zoo.distributed import is_main_process, process_device, zoo_processes
from sane_hf.zoo.formats import atomic_output, atomic_write_text

EMBEDDING_SUFFIXES = (".parquet", ".npy")
# Networks read, prepared and encoded at once by one process (`PretrainedSane.embed`).
EMBED_CHUNK_SIZE = 256
PREDICTION_SUFFIXES = (".json", ".csv")


@dataclass
class PretrainedSane:
    """A SANE model with the processor (and probe heads) saved beside it."""

    model: SaneModel
    processor: SaneProcessor
    heads: ProbeHeads | None = None

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, *, device: str | None = None, heads: bool = False
    ) -> PretrainedSane:
        """Load model and processor (and probe heads with ``heads=True``) from one place.

        The model runs in float32 on ``device`` (default cpu): a bfloat16 release is upcast,
        as bfloat16 matrix products are slow on CPUs.
        """
        source = str(path_or_repo_id)
        model = SaneModel.from_pretrained(source).eval()
        check_finite_parameters(model, f"{source}/model.safetensors")
        model = model.to(device or "cpu", torch.float32)
        processor = SaneProcessor.from_pretrained(source)
        return cls(model, processor, ProbeHeads.from_pretrained(source) if heads else None)

    def embed(
        self,
        networks: NetworkInput | Iterable[NetworkInput],
        *,
        batch_size: int = 256,
        chunk_size: int = EMBED_CHUNK_SIZE,
    ) -> Embeddings:
        """Embeddings of ``networks``; under ``torchrun``/``accelerate launch`` every process
        embeds its share and all get the whole result (`sane_hf.downstream.sharding`).

        One process reads, prepares and encodes ``chunk_size`` networks at a time, so memory
        holds one chunk of weights and tokens plus the pooled embeddings of all networks (a
        few KB each), not every network at once.
        """
        with zoo_processes() as ranks:
            if ranks.world == 1:
                return self._embed_in_chunks(networks, batch_size, chunk_size)
            indices, mine = my_networks(networks, ranks)
            part = None
            if mine:  # more processes than networks leaves some without
                features = self.processor(mine, progress=ranks.rank == 0)
                part = embed(self.model, features, batch_size=batch_size, progress=False)
            return gather_embeddings(indices, part, ranks)

    def _embed_in_chunks(
        self, networks: NetworkInput | Iterable[NetworkInput], batch_size: int, chunk_size: int
    ) -> Embeddings:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        named = iter_networks(networks)
        parts = []
        with tqdm(desc="embedding networks", unit="network") as bar:
            while chunk := [
                NamedWeights(*network) for network in itertools.islice(named, chunk_size)
            ]:
                features = self.processor(chunk)
                parts.append(embed(self.model, features, batch_size=batch_size, progress=False))
                bar.update(len(chunk))
        if not parts:
            raise ValueError("no networks to embed (the inputs hold none)")
        return concatenate_embeddings(parts)


def embed_networks(
    model: str | os.PathLike | PretrainedSane,
    networks: NetworkInput | Iterable[NetworkInput],
    *,
    output: str | os.PathLike | None = None,
    layer_means: bool = False,
    batch_size: int = 256,
    device: str | None = None,
    chunk_size: int = EMBED_CHUNK_SIZE,
) -> Embeddings:
    """Embed networks with a pretrained SANE; write ``output`` when given.

    ``output``: ``.parquet`` (default format; one row per network: ``id``, ``embedding``, and
    ``layer_means`` with ``layer_means=True``) or ``.npy`` (the ``[M, D]`` mean embeddings only;
    rows in the order the networks were read).
    """
    if output is not None:
        _check_suffix(output, EMBEDDING_SUFFIXES)
    sane = (
        model
        if isinstance(model, PretrainedSane)
        else PretrainedSane.from_pretrained(model, device=process_device(device))
    )
    embeddings = sane.embed(networks, batch_size=batch_size, chunk_size=chunk_size)
    if output is not None and is_main_process():
        write_embeddings(embeddings, output, layer_means=layer_means)
    return embeddings


def write_embeddings(
    embeddings: Embeddings, path: str | os.PathLike, *, layer_means: bool = False
) -> None:
    """``.parquet`` (id, embedding[, layer_means]) or ``.npy`` (mean embeddings) at ``path``."""
    path = Path(path)
    _check_suffix(path, EMBEDDING_SUFFIXES)
    path.parent.mkdir(parents=True, exist_ok=True)
    mean = embeddings.mean.reshape(-1, embeddings.mean.shape[-1]).float().numpy()
    columns: dict[str, Any] = {
        "id": embeddings.ids or [f"network_{i}" for i in range(len(mean))],
        "embedding": list(mean),
    }
    if layer_means:
        per_layer = embeddings.layer_means.reshape(len(mean), -1, mean.shape[1]).float().numpy()
        columns["layer_means"] = [list(layers) for layers in per_layer]
    # through a temporary file: a kill during the write leaves the previous output whole
    with atomic_output(path) as temporary:
        if path.suffix == ".npy":
            with temporary.open("wb") as file:
                np.save(file, mean)
        else:
            import pyarrow as pa  # here: only writing Parquet needs it
            import pyarrow.parquet as pq

            pq.write_table(pa.table(columns), temporary)


def check_finite_parameters(model: torch.nn.Module, where: str) -> None:
    """``ValueError`` naming ``where`` and the first parameter holding NaN/Inf: a SANE with
    such weights embeds every network as NaN."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{where}: parameter {name!r} holds non-finite values (NaN/Inf)")


@dataclass
class PropertyPredictions:
    """Predicted properties of networks: ``values[property][i]`` for network ``ids[i]``."""

    ids: list[str]
    values: dict[str, np.ndarray]
    units: dict[str, str]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"id": network_id, **{name: _plain(v[i]) for name, v in self.values.items()}}
            for i, network_id in enumerate(self.ids)
        ]

    def table(self) -> str:
        """A terminal table: one row per network, one column per property (units below)."""
        names = list(self.values)
        width = max(len("id"), *(len(i) for i in self.ids))
        cells = {name: max(len(name), 10) for name in names}
        lines = ["  ".join([f"{'id':<{width}}", *(f"{n:>{cells[n]}}" for n in names)])]
        for row in self.rows():
            values = [_cell(row[name], cells[name]) for name in names]
            lines.append("  ".join([f"{row['id']:<{width}}", *values]))
        lines += [f"{name}: {self.units[name]}" for name in names if self.units.get(name)]
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> None:
        """``.json`` (ids, values, units) or ``.csv`` (one row per network)."""
        path = Path(path)
        _check_suffix(path, PREDICTION_SUFFIXES)
        if path.suffix == ".json":
            text = json.dumps({"predictions": self.rows(), "units": self.units}, indent=1)
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=["id", *self.values])
            writer.writeheader()
            writer.writerows(self.rows())
            text = buffer.getvalue()
        atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def predict_networks(
    model: str | os.PathLike | PretrainedSane,
    networks: NetworkInput | Iterable[NetworkInput],
    *,
    output: str | os.PathLike | None = None,
    properties: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> PropertyPredictions:
    """Predicted properties (test accuracy, ...) of networks from the model's probe heads."""
    if output is not None:
        _check_suffix(output, PREDICTION_SUFFIXES)
    sane = (
        model
        if isinstance(model, PretrainedSane)
        else PretrainedSane.from_pretrained(model, device=process_device(device), heads=True)
    )
    if sane.heads is None:
        raise ValueError("predict_networks needs probe heads: load with heads=True")
    heads = sane.heads
    if properties:
        unknown = [name for name in properties if name not in heads.names]
        if unknown:
            raise ValueError(f"no probe head for {unknown}; the model has heads for {heads.names}")
        heads = ProbeHeads([h for h in heads.heads if h.name in properties], heads.zoo_dataset)
    embeddings = sane.embed(networks, batch_size=batch_size)
    mean = embeddings.mean.reshape(-1, embeddings.mean.shape[-1])
    predictions = PropertyPredictions(
        embeddings.ids, heads.predict(mean), {h.name: h.unit for h in heads.heads}
    )
    if output is not None and is_main_process():
        predictions.save(output)
    return predictions


def _check_suffix(path: str | os.PathLike, allowed: Sequence[str]) -> None:
    suffix = Path(path).suffix
    if suffix not in allowed:
        raise ValueError(
            f"{path}: unsupported output format {suffix!r}; use one of {list(allowed)}"
        )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _cell(value: Any, width: int) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, float) else f"{value!s:>{width}}"


__all__ = [
    "PretrainedSane",
    "PropertyPredictions",
    "embed_networks",
    "predict_networks",
    "write_embeddings",
]
