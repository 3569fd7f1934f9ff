"""A released SANE applied to the user's own networks: embeddings and predicted properties.

One call each, behind the ``sane-hf embed`` and ``sane-hf predict`` commands: load the model, its
`SaneProcessor` and (for predictions) its probe heads from a folder or Hub id, read the networks
(files, folders, raw zoos, zoo datasets, Hub ids), embed them all at once and write the result::

    result = embed_networks("checkpoints/sane-cnn-mnist", ["my_nets/"], output="emb.parquet")
    table = predict_networks("checkpoints/sane-cnn-mnist", ["my_nets/"])
    print(table.table())   # id, predicted test_acc, epoch, ggap, in-distribution percentiles

Every embedding and prediction comes with the in-distribution signal of `sane_hf.downstream.ood`
(when the model ships its reference): how unlike the zoo's networks each network is, as
percentiles of the zoo's validation networks, and whether it lies outside the zoo's range.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import cached_file

from sane_hf.downstream.embedding import Embeddings, embed
from sane_hf.downstream.features import SANE, feature_matrices, needs_token_latents
from sane_hf.downstream.ood import SIGNALS, InDistribution, InDistributionReference
from sane_hf.downstream.probe_heads import ProbeHeads, head_inputs
from sane_hf.downstream.sharding import concatenate_embeddings, gather_embeddings, my_networks
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.models.sane.network_inputs import NamedWeights, NetworkInput, iter_networks
from sane_hf.models.sane.processing_sane import SaneProcessor
from sane_hf.zoo.distributed import is_main_process, process_device, zoo_processes
from sane_hf.zoo.formats import DATASET_METADATA_FILE, atomic_output, atomic_write_text
from sane_hf.zoo.metadata import ZooMetadata
from sane_hf.zoo.provenance import provenance_lines, test_accuracy_meaning, zoo_provenance

EMBEDDING_SUFFIXES = (".parquet", ".npy")
# Networks read, prepared and encoded at once by one process (`PretrainedSane.embed`).
EMBED_CHUNK_SIZE = 256
PREDICTION_SUFFIXES = (".json", ".csv")
SCORE_PREFIX, FEATURE_PREFIX = "in_distribution.", "features."


@dataclass
class PretrainedSane:
    """A SANE model with the processor, probe heads and in-distribution reference saved beside
    it (``in_distribution`` is None for models released without one)."""

    model: SaneModel
    processor: SaneProcessor
    heads: ProbeHeads | None = None
    in_distribution: InDistributionReference | None = None

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
        if getattr(processor, "provenance", None) is None:  # released before processors had it
            processor.provenance = _zoo_file_provenance(source)
        return cls(
            model,
            processor,
            ProbeHeads.from_pretrained(source) if heads else None,
            InDistributionReference.from_pretrained(source),
        )

    def embed(
        self,
        networks: NetworkInput | Iterable[NetworkInput],
        *,
        batch_size: int = 256,
        heads: ProbeHeads | None = None,
        chunk_size: int = EMBED_CHUNK_SIZE,
    ) -> Embeddings:
        """Embeddings of ``networks``; under ``torchrun``/``accelerate launch`` every process
        embeds its share and all get the whole result (`sane_hf.downstream.sharding`).

        One process reads, prepares and encodes ``chunk_size`` networks at a time, so memory
        holds one chunk of weights and tokens plus the pooled embeddings of all networks (a
        few KB each), not every network at once.

        ``extras`` holds the in-distribution scores, percentiles and ``outside_zoo_range``
        (with a shipped reference) and, with ``heads``, the feature sets they read.
        """
        with zoo_processes() as ranks:
            if ranks.world == 1:
                embeddings = self._embed_in_chunks(networks, batch_size, chunk_size, heads)
            else:
                indices, mine = my_networks(networks, ranks)
                part = None
                if mine:  # more processes than networks leaves some without
                    features = self.processor(mine, progress=ranks.rank == 0)
                    part = self._embed_features(features, batch_size, heads, progress=False)
                embeddings = gather_embeddings(indices, part, ranks)
        assessed = self.assess(embeddings)
        if assessed is not None:
            embeddings.extras.update(assessed.columns())
        return embeddings

    def assess(self, embeddings: Embeddings) -> InDistribution | None:
        """The in-distribution verdict of embeddings from `embed` (None without a reference)."""
        if self.in_distribution is None:
            return None
        scores = {name: embeddings.extras[SCORE_PREFIX + name] for name in SIGNALS}
        return self.in_distribution.assess(scores)

    def _embed_features(
        self, features, batch_size: int, heads: ProbeHeads | None, progress: bool
    ) -> Embeddings:
        wanted = [] if heads is None else heads.feature_sets
        token_latents = self.in_distribution is not None or needs_token_latents(wanted)
        embeddings = embed(
            self.model,
            features,
            batch_size=batch_size,
            return_token_latents=token_latents,
            progress=progress,
        )
        if self.in_distribution is None and wanted in ([], [SANE]):
            # the mean latent is all that is needed (mixed architectures have no one layout)
            if heads is not None:
                mean = embeddings.mean.reshape(-1, embeddings.mean.shape[-1])
                inputs = feature_matrices([SANE], mean=mean)
                embeddings.extras.update({FEATURE_PREFIX + k: v for k, v in inputs.items()})
            embeddings.token_latents = None
            return embeddings
        mask = self.processor.layout.mask()
        positions = features["positions"][0].long()
        if self.in_distribution is not None:
            scores = self.in_distribution.scores(
                self.model,
                features["tokens"],
                positions,
                mask,
                embeddings=embeddings,
                batch_size=batch_size,
            )
            embeddings.extras.update({SCORE_PREFIX + k: v for k, v in scores.items()})
        if heads is not None:
            inputs = head_inputs(
                self.model, features, heads, mask, batch_size=batch_size, embeddings=embeddings
            )
            embeddings.extras.update({FEATURE_PREFIX + k: v for k, v in inputs.items()})
        embeddings.token_latents = None  # N times the memory; `sane_hf.embed` returns them
        return embeddings

    def _embed_in_chunks(
        self,
        networks: NetworkInput | Iterable[NetworkInput],
        batch_size: int,
        chunk_size: int,
        heads: ProbeHeads | None,
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
                parts.append(self._embed_features(features, batch_size, heads, progress=False))
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

    ``output``: ``.parquet`` (default format; one row per network: ``id``, ``embedding``, the
    in-distribution percentiles and ``outside_zoo_range`` when the model ships a reference, and
    ``layer_means`` with ``layer_means=True``) or ``.npy`` (the ``[M, D]`` mean embeddings only;
    rows in the order the networks were read). The in-distribution columns are in
    ``Embeddings.extras`` either way.
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
    columns.update(
        {
            name: values
            for name, values in embeddings.extras.items()
            if not name.startswith((SCORE_PREFIX, FEATURE_PREFIX))
        }
    )
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
    """Predicted properties of networks: ``values[property][i]`` for network ``ids[i]``.

    Attributes:
        heads: per property, the feature set its head reads and its validation and test scores.
        left_out: properties whose heads were not used, and why.
        in_distribution: the in-distribution verdict per network (None without a reference).
        notes: what the properties refer to and how the zoo's networks were made.
    """

    ids: list[str]
    values: dict[str, np.ndarray]
    units: dict[str, str]
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    in_distribution: InDistribution | None = None
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        columns = dict(self.values)
        if self.in_distribution is not None:
            columns.update(self.in_distribution.columns())
        return [
            {"id": network_id, **{name: _plain(v[i]) for name, v in columns.items()}}
            for i, network_id in enumerate(self.ids)
        ]

    def warning(self) -> str | None:
        """One line when some networks lie outside the zoo's range, else None."""
        if self.in_distribution is None or not self.in_distribution.outside.any():
            return None
        outside = [i for i, flag in enumerate(self.in_distribution.outside) if flag]
        named = ", ".join(self.ids[i] for i in outside[:3]) + (", ..." if len(outside) > 3 else "")
        return (
            f"warning: {len(outside)} of {len(self.ids)} networks ({named}) lie outside the range "
            "of the zoo's validation networks (percentile > 100): their predictions extrapolate"
        )

    def table(self) -> str:
        """A terminal table: one row per network, one column per property and in-distribution
        percentile; below it what each property is, which features its head reads and its test
        score, what was left out, and the warning for networks outside the zoo's range."""
        names = list(self.values)
        signals = {}
        if self.in_distribution is not None:
            signals = {f"{name}_percentile": _short(name) for name in SIGNALS}
            signals["outside_zoo_range"] = "outside"
        headers = {**{n: n for n in names}, **signals}
        width = max(len("id"), *(len(i) for i in self.ids))
        cells = {key: max(len(header), 10) for key, header in headers.items()}
        lines = ["  ".join([f"{'id':<{width}}", *(f"{h:>{cells[k]}}" for k, h in headers.items())])]
        for row in self.rows():
            values = [
                _percentile_cell(row[key], cells[key])
                if key in signals
                else _cell(row[key], cells[key])
                for key in headers
            ]
            lines.append("  ".join([f"{row['id']:<{width}}", *values]))
        for name in names:
            head = self.heads.get(name, {})
            about = f"{name}: {self.units.get(name) or 'value'}"
            if head:
                score = head.get("test_score")
                metric = "R^2" if head["metric"] == "r2" else head["metric"]
                about += f"; head reads {head['features']}, test {metric} {score:.3f}"
            lines.append(about)
        lines += [f"left out {name}: {reason}" for name, reason in self.left_out.items()]
        if self.in_distribution is not None:
            lines.append(
                "percentiles: of the zoo's validation networks' reconstruction error (recon), "
                "embedding distance (emb) and s(W) distance (sW) to the zoo's training networks"
            )
        lines += self.notes
        warning = self.warning()
        return "\n".join(lines + ([warning] if warning else []))

    def save(self, path: str | os.PathLike) -> None:
        """``.json`` (ids, values, units, heads, notes) or ``.csv`` (one row per network)."""
        path = Path(path)
        _check_suffix(path, PREDICTION_SUFFIXES)
        rows = self.rows()
        if path.suffix == ".json":
            description = {
                "predictions": rows,
                "units": self.units,
                "heads": self.heads,
                "left_out": self.left_out,
                "notes": self.notes,
            }
            text = json.dumps(description, indent=1)
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["id"])
            writer.writeheader()
            writer.writerows(rows)
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
    """Predicted properties (test accuracy, ...) of networks from the model's probe heads.

    Without ``properties``, a head no better than predicting the zoo's mean (R^2 <= 0 on its
    validation or test split, `PropertyHead.informative`) is left out and listed in
    ``left_out``; named ``properties`` are predicted whatever their score.
    """
    if output is not None:
        _check_suffix(output, PREDICTION_SUFFIXES)
    sane = (
        model
        if isinstance(model, PretrainedSane)
        else PretrainedSane.from_pretrained(model, device=process_device(device), heads=True)
    )
    if sane.heads is None:
        raise ValueError("predict_networks needs probe heads: load with heads=True")
    heads, left_out = sane.heads, {}
    if properties:
        unknown = [name for name in properties if name not in heads.names]
        if unknown:
            raise ValueError(f"no probe head for {unknown}; the model has heads for {heads.names}")
        heads = ProbeHeads([h for h in heads.heads if h.name in properties], heads.zoo_dataset)
    else:
        left_out = {
            head.name: "its head is no better than the zoo's mean (R^2 <= 0: test "
            f"{head.test_score:.3f}, validation {_score(head.validation_score)})"
            for head in heads.heads
            if not head.informative
        }
        heads = heads.informative()
        if not heads.heads:
            raise ValueError(f"no probe head of this model beats the zoo's mean: {left_out}")
    embeddings = sane.embed(networks, batch_size=batch_size, heads=heads)
    inputs = {
        name[len(FEATURE_PREFIX) :]: values
        for name, values in embeddings.extras.items()
        if name.startswith(FEATURE_PREFIX)
    }
    predictions = PropertyPredictions(
        embeddings.ids,
        heads.predict(inputs),
        {h.name: h.unit for h in heads.heads},
        heads={
            h.name: {
                "features": h.features,
                "metric": h.metric,
                "test_score": h.test_score,
                "validation_score": h.validation_score,
            }
            for h in heads.heads
        },
        left_out=left_out,
        in_distribution=sane.assess(embeddings),
        notes=_notes(sane, heads),
    )
    if output is not None and is_main_process():
        predictions.save(output)
    return predictions


def _zoo_file_provenance(source: str) -> dict[str, Any] | None:
    """The provenance of the ``sane_zoo.json`` saved beside a model, if there is one."""
    try:
        path = cached_file(
            source, DATASET_METADATA_FILE, _raise_exceptions_for_missing_entries=False
        )
    except OSError:
        return None
    if path is None:
        return None
    metadata = ZooMetadata.from_json(Path(path).read_text())
    return zoo_provenance(metadata.zoo, metadata.statistics.get("epochs"))


def _notes(sane: PretrainedSane, heads: ProbeHeads) -> list[str]:
    provenance = sane.processor.provenance
    notes = []
    if "test_acc" in heads.names:
        notes.append(f"test_acc is the {test_accuracy_meaning(provenance)}")
    if provenance:
        notes.append("the zoo's networks: " + "; ".join(provenance_lines(provenance)))
    if sane.in_distribution is None:
        notes.append(
            "this model ships no in-distribution reference: nothing checks that the "
            "networks are like the zoo's"
        )
    return notes


def _percentile_cell(value: Any, width: int) -> str:
    """A percentile as an integer, ``>100`` above every validation network; flags as yes/no."""
    if isinstance(value, bool):
        return f"{'yes' if value else 'no':>{width}}"
    return f"{'>100' if value > 100 else f'{value:.0f}':>{width}}"


def _short(signal: str) -> str:
    return {"reconstruction_error": "recon %", "embedding_distance": "emb %"}.get(signal, "sW %")


def _score(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.3f}"


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
