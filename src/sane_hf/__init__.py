"""sane-hf: SANE weight-space learning as a Hugging Face-style pretrained model package.

The package follows the data: ``weights`` (tokens, normalization, alignment) -> ``zoo`` (training,
import, datasets) -> ``models`` (SaneConfig, SaneModel) -> ``hub`` -> ``pretraining`` ->
``downstream`` (embeddings, probes, sampling) -> ``recipes`` (experiments, demo) -> ``cli``,
all on top of ``utils`` (the one config mechanism; presets ship in ``sane_hf/presets``).
Lower layers never import higher ones (an import-linter contract in pyproject.toml checks it).

The names here are what a user needs; everything else is imported from its module (each name
has one import path: the module that defines it, listed in that module's ``__all__``). They are
re-exported lazily, as transformers and timm do: ``import sane_hf`` imports no heavy dependency
(torch, transformers, datasets, ...); a name is imported from its module the first time it is
used. Importing ``SaneConfig`` registers the "sane" model type with ``AutoConfig``/``AutoModel``.
The ``TYPE_CHECKING`` imports below mirror the table for type checkers and IDEs;
``tests/test_package.py`` checks that both list the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# module (below sane_hf) -> the public names it defines
_PUBLIC_API: dict[str, list[str]] = {
    "weights.tokenization": ["WeightTokenizer"],
    "weights.universal": ["UniversalTokenizer"],
    "weights.alignment": ["PermutationSpec", "align"],
    "zoo.architectures": ["build_model", "register_architecture"],
    "zoo.config": ["ZooConfig"],
    "zoo.training": ["train_zoo"],
    "zoo.importing": ["import_zoo"],
    "zoo.dataset": ["build_zoo_dataset"],
    "zoo.metadata": ["ZooDataset"],
    "zoo.storage": ["load_zoo_dataset", "save_zoo_dataset"],
    "models.sane.configuration_sane": ["SaneConfig"],
    "models.sane.modeling_sane": ["SaneForPropertyPrediction", "SaneModel"],
    "models.sane.processing_sane": ["SaneProcessor"],
    "models.sane.processing_universal": ["SaneUniversalProcessor"],
    "zoo.mixed": ["build_mixed_dataset", "load_mixed_dataset"],
    "hub": ["push_model_to_hub", "push_zoo_dataset"],
    "pretraining.config": ["PretrainingConfig"],
    "downstream.embedding": ["embed"],
    "downstream.probing": ["probe_zoo"],
    "downstream.property_prediction": ["with_labels"],
    "downstream.probe_heads": ["ProbeHeads", "fit_probe_heads"],
    "downstream.pretrained": ["PretrainedSane", "embed_networks", "predict_networks"],
    "downstream.sampling": ["SaneSampler"],
    "recipes.settings": ["SamplingMethod", "SamplingSettings"],
    "recipes.pretraining": ["pretrain"],
    "recipes.sampling": ["sample_networks"],
    "recipes.experiments": ["ExperimentSpec", "run_experiment"],
    "recipes.demo": ["DemoConfig", "run_demo"],
}
_MODULE_OF = {name: module for module, names in _PUBLIC_API.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sane_hf' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"sane_hf.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    """The public names and the module's own attributes (``__version__``), not its helpers."""
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


if TYPE_CHECKING:
    from sane_hf.downstream.embedding import embed
    from sane_hf.downstream.pretrained import PretrainedSane, embed_networks, predict_networks
    from sane_hf.downstream.probe_heads import ProbeHeads, fit_probe_heads
    from sane_hf.downstream.probing import probe_zoo
    from sane_hf.downstream.property_prediction import with_labels
    from sane_hf.downstream.sampling import SaneSampler
    from sane_hf.hub import push_model_to_hub, push_zoo_dataset
    from sane_hf.models.sane.configuration_sane import SaneConfig
    from sane_hf.models.sane.modeling_sane import SaneForPropertyPrediction, SaneModel
    from sane_hf.models.sane.processing_sane import SaneProcessor
    from sane_hf.models.sane.processing_universal import SaneUniversalProcessor
    from sane_hf.pretraining.config import PretrainingConfig
    from sane_hf.recipes.demo import DemoConfig, run_demo
    from sane_hf.recipes.experiments import ExperimentSpec, run_experiment
    from sane_hf.recipes.pretraining import pretrain
    from sane_hf.recipes.sampling import sample_networks
    from sane_hf.recipes.settings import SamplingMethod, SamplingSettings
    from sane_hf.weights.alignment import PermutationSpec, align
    from sane_hf.weights.tokenization import WeightTokenizer
    from sane_hf.weights.universal import UniversalTokenizer
    from sane_hf.zoo.architectures import build_model, register_architecture
    from sane_hf.zoo.config import ZooConfig
    from sane_hf.zoo.dataset import build_zoo_dataset
    from sane_hf.zoo.importing import import_zoo
    from sane_hf.zoo.metadata import ZooDataset
    from sane_hf.zoo.mixed import build_mixed_dataset, load_mixed_dataset
    from sane_hf.zoo.storage import load_zoo_dataset, save_zoo_dataset
    from sane_hf.zoo.training import train_zoo
