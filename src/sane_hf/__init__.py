"""sane-hf: SANE weight-space learning as a Hugging Face-style pretrained model package.

The package follows the data: ``weights`` (tokens, normalization, alignment) -> ``zoo`` (training,
import, datasets) -> ``models`` (SaneConfig, SaneModel) -> ``hub`` -> ``pretraining`` ->
``downstream`` (embeddings, probes, sampling) -> ``recipes`` (experiments, demo) -> ``cli``,
all on top of ``utils`` (the one config mechanism; presets ship in ``sane_hf/presets``).
Lower layers never import higher ones (an import-linter contract in pyproject.toml checks it).

The public API is re-exported here lazily, as transformers and timm do: ``import sane_hf``
imports no heavy dependency (torch, transformers, datasets, ...); a name is imported from its
module the first time it is used. Importing ``SaneConfig`` registers the "sane" model type with
``AutoConfig``/``AutoModel``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# module (below sane_hf) -> the public names it defines
_PUBLIC_API: dict[str, list[str]] = {
    "weights.layout": ["WeightLayout"],
    "weights.tokenization": ["TokenizedWeights", "WeightTokenizer"],
    "weights.normalization": ["NormalizationStats"],
    "weights.universal": ["TokenScheme", "UniversalTokenizer"],
    "weights.alignment": [
        "AlignmentResult",
        "PermutationSpec",
        "align",
        "apply_permutation",
        "random_permutation",
    ],
    "zoo.architectures": [
        "build_model",
        "initialize",
        "list_architectures",
        "register_architecture",
    ],
    "zoo.tasks": ["ImageDataset", "dataset_from_tensors", "load_dataset_by_name"],
    "zoo.config": ["ZooConfig"],
    "zoo.formats": ["ZooBusyError"],
    "zoo.training": ["fine_tune_population", "train_zoo"],
    "zoo.importing": ["ImportReport", "ZooImportError", "import_zoo"],
    "zoo.dataset": [
        "ZooDataset",
        "ZooMetadata",
        "build_zoo_dataset",
        "load_zoo_dataset",
        "save_zoo_dataset",
    ],
    "models.sane.configuration_sane": ["SaneConfig"],
    "models.sane.modeling_sane": [
        "SaneDecoderModel",
        "SaneDecoderOutput",
        "SaneEncoderModel",
        "SaneEncoderOutput",
        "SaneModel",
        "SaneModelOutput",
        "SanePreTrainedModel",
    ],
    "models.sane.processing_sane": ["SaneProcessor"],
    "models.sane.processing_universal": ["SaneUniversalProcessor"],
    "zoo.mixed": ["build_mixed_dataset", "load_mixed_dataset", "save_mixed_dataset"],
    "hub": ["HubError", "push_folder", "push_model_to_hub", "push_zoo_dataset"],
    "pretraining.augmentation": ["TokenPermutation", "WindowSampler"],
    "pretraining.config": ["PretrainingConfig"],
    "pretraining.loop": ["pretrain"],
    "downstream.embedding": ["Embeddings", "decode_latents", "embed", "encode_tokens"],
    "downstream.probing": [
        "LogisticProbe",
        "ProbeReport",
        "RidgeProbe",
        "probe_features",
        "probe_zoo",
        "weight_statistics",
    ],
    "downstream.property_prediction": [
        "LabelStandardization",
        "SaneForPropertyPrediction",
        "with_labels",
    ],
    "downstream.probe_heads": ["ProbeHeads", "fit_probe_heads"],
    "downstream.pretrained": [
        "PretrainedSane",
        "PropertyPredictions",
        "embed_networks",
        "predict_networks",
    ],
    "downstream.sampling": [
        "SampledModels",
        "SaneSampler",
        "condition_batchnorm",
        "draw_latents",
        "select_prompts",
    ],
    "downstream.novelty": ["NoveltyReport", "misclassified", "misprediction_iou", "novelty_report"],
    "downstream.baselines": ["MemorizationBaselines"],
    "downstream.evaluation": ["SampleEvaluation", "evaluate_samples", "scratch_models"],
    "recipes.pretraining": ["pretrain_with_probe_heads"],
    "recipes.experiments": [
        "SamplingMethod",
        "SamplingResults",
        "SamplingSettings",
        "compare_sampling",
        "probe_pretrained",
    ],
    "recipes.sampling": ["sample_networks"],
    "recipes.demo": ["DemoConfig", "run_demo"],
}
_MODULE_OF = {name: module for module, names in _PUBLIC_API.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sane_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sane_hf.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from sane_hf.downstream.baselines import MemorizationBaselines
    from sane_hf.downstream.embedding import Embeddings, decode_latents, embed, encode_tokens
    from sane_hf.downstream.evaluation import SampleEvaluation, evaluate_samples, scratch_models
    from sane_hf.downstream.novelty import (
        NoveltyReport,
        misclassified,
        misprediction_iou,
        novelty_report,
    )
    from sane_hf.downstream.pretrained import (
        PretrainedSane,
        PropertyPredictions,
        embed_networks,
        predict_networks,
    )
    from sane_hf.downstream.probe_heads import ProbeHeads, fit_probe_heads
    from sane_hf.downstream.probing import (
        LogisticProbe,
        ProbeReport,
        RidgeProbe,
        probe_features,
        probe_zoo,
        weight_statistics,
    )
    from sane_hf.downstream.property_prediction import (
        LabelStandardization,
        SaneForPropertyPrediction,
        with_labels,
    )
    from sane_hf.downstream.sampling import (
        SampledModels,
        SaneSampler,
        condition_batchnorm,
        draw_latents,
        select_prompts,
    )
    from sane_hf.hub import HubError, push_folder, push_model_to_hub, push_zoo_dataset
    from sane_hf.models.sane.configuration_sane import SaneConfig
    from sane_hf.models.sane.modeling_sane import (
        SaneDecoderModel,
        SaneDecoderOutput,
        SaneEncoderModel,
        SaneEncoderOutput,
        SaneModel,
        SaneModelOutput,
        SanePreTrainedModel,
    )
    from sane_hf.models.sane.processing_sane import SaneProcessor
    from sane_hf.models.sane.processing_universal import SaneUniversalProcessor
    from sane_hf.pretraining.augmentation import TokenPermutation, WindowSampler
    from sane_hf.pretraining.config import PretrainingConfig
    from sane_hf.pretraining.loop import pretrain
    from sane_hf.recipes.demo import DemoConfig, run_demo
    from sane_hf.recipes.experiments import (
        SamplingMethod,
        SamplingResults,
        SamplingSettings,
        compare_sampling,
        probe_pretrained,
    )
    from sane_hf.recipes.pretraining import pretrain_with_probe_heads
    from sane_hf.recipes.sampling import sample_networks
    from sane_hf.weights.alignment import (
        AlignmentResult,
        PermutationSpec,
        align,
        apply_permutation,
        random_permutation,
    )
    from sane_hf.weights.layout import WeightLayout
    from sane_hf.weights.normalization import NormalizationStats
    from sane_hf.weights.tokenization import TokenizedWeights, WeightTokenizer
    from sane_hf.weights.universal import TokenScheme, UniversalTokenizer
    from sane_hf.zoo.architectures import (
        build_model,
        initialize,
        list_architectures,
        register_architecture,
    )
    from sane_hf.zoo.config import ZooConfig
    from sane_hf.zoo.dataset import (
        ZooDataset,
        ZooMetadata,
        build_zoo_dataset,
        load_zoo_dataset,
        save_zoo_dataset,
    )
    from sane_hf.zoo.formats import ZooBusyError
    from sane_hf.zoo.importing import ImportReport, ZooImportError, import_zoo
    from sane_hf.zoo.mixed import build_mixed_dataset, load_mixed_dataset, save_mixed_dataset
    from sane_hf.zoo.tasks import ImageDataset, dataset_from_tensors, load_dataset_by_name
    from sane_hf.zoo.training import fine_tune_population, train_zoo
