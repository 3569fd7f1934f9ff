"""One SANE for many architectures as a user runs it: `sane-hf probe` on a mixed zoo.

``probe_mixed_pretrained(model, mixed_dataset)`` embeds every split of a mixed zoo with a
universal SANE and fits one probe of test accuracy over all architectures, scored on the whole
test split and per architecture (R^2, Kendall tau), next to s(W) for mixed zoos. With
``per_architecture_models`` (``{architecture: SANE folder}``, SANEs pretrained on one
architecture each) their probes, fitted and scored on that architecture alone, stand beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sane_hf.downstream.mixed import MixedProbeResult, mixed_probe_inputs, probe_mixed
from sane_hf.models.sane.modeling_sane import SaneEncoderModel
from sane_hf.zoo.dataset import SPLITS
from sane_hf.zoo.mixed import MixedZooDataset, load_mixed_dataset


def probe_mixed_pretrained(
    model: str | Path,
    dataset: str | Path | MixedZooDataset,
    *,
    output_dir: str | Path | None = None,
    per_architecture_models: Mapping[str, str | Path] | None = None,
    property_name: str = "test_acc",
    device: str | None = None,
) -> dict[str, Any]:
    """Probe results as ``{"universal": [...], "per_architecture_sane": {...}}`` (dicts of
    `MixedProbeResult`); ``probe.json`` in ``output_dir`` when given."""
    mixed = dataset if isinstance(dataset, MixedZooDataset) else load_mixed_dataset(dataset)
    encoder = _encoder(model, device)
    features, targets, architectures = mixed_probe_inputs(encoder, mixed, property_name)
    universal = probe_mixed(features, targets, architectures, property_name)
    own_probes = _per_architecture_probes(features, targets, architectures, property_name)
    result = {
        "model": str(model),
        "universal": [r.to_dict() for r in universal],
        "universal_per_architecture_probe": own_probes,
        "per_architecture_sane": {},
    }
    for architecture, path in (per_architecture_models or {}).items():
        single = _only(mixed, architecture)
        own_features, own_targets, own_labels = mixed_probe_inputs(
            _encoder(path, device), single, property_name
        )
        own = probe_mixed({"SANE": own_features["SANE"]}, own_targets, own_labels, property_name)
        result["per_architecture_sane"][architecture] = own[0].to_dict()
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "probe.json").write_text(json.dumps(result, indent=1))
    return result


def mixed_probe_table(result: Mapping[str, Any]) -> str:
    """A terminal table: test R^2 / Kendall tau overall and per architecture, per feature set."""
    rows = [MixedProbeResult(**r) for r in result["universal"]]
    architectures = sorted(rows[0].per_architecture)
    header = ["features", "all", *architectures]
    lines = ["  ".join(f"{h:>16}" for h in header)]
    for row in rows:
        cells = [f"{row.features:>16}", _pair(row.r2, row.kendall_tau)]
        cells += [_pair(**row.per_architecture[a]) for a in architectures]
        lines.append("  ".join(f"{c:>16}" for c in cells))
    for name, table in (
        ("SANE, own probe", result["universal_per_architecture_probe"]),
        ("per-arch SANE", result["per_architecture_sane"]),
    ):
        if table:
            cells = [f"{name:>16}", f"{'':>16}"]
            cells += [
                _pair(table[a]["r2"], table[a]["kendall_tau"]) if a in table else "-"
                for a in architectures
            ]
            lines.append("  ".join(f"{c:>16}" for c in cells))
    lines.append("cells: test R^2 / Kendall tau of " + rows[0].property)
    return "\n".join(lines)


def _pair(r2: float, kendall_tau: float) -> str:
    return f"{r2:.3f}/{kendall_tau:.3f}"


def _per_architecture_probes(features, targets, architectures, property_name) -> dict:
    """The universal SANE's embeddings, but one probe per architecture (fitted on it alone)."""
    results = {}
    for architecture in sorted(set(architectures["test"])):
        keep = {split: architectures[split] == architecture for split in SPLITS}
        own = probe_mixed(
            {"SANE": {s: features["SANE"][s][keep[s]] for s in SPLITS}},
            {s: targets[s][keep[s]] for s in SPLITS},
            {s: architectures[s][keep[s]] for s in SPLITS},
            property_name,
        )
        results[architecture] = {"r2": own[0].r2, "kendall_tau": own[0].kendall_tau}
    return results


def _only(mixed: MixedZooDataset, architecture: str) -> MixedZooDataset:
    splits = {
        name: split.filter(lambda names: np.asarray(names) == architecture, batched=True,
                           input_columns="architecture")
        for name, split in mixed.splits.items()
    }  # fmt: skip
    return MixedZooDataset(type(mixed.splits)(splits), mixed.metadata)


def _encoder(path: str | Path, device: str | None) -> SaneEncoderModel:
    encoder = SaneEncoderModel.from_pretrained(path).eval()
    return encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


__all__ = [
    "mixed_probe_table",
    "probe_mixed_pretrained",
]
