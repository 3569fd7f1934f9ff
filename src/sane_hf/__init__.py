"""sane-hf: SANE weight-space learning as a Hugging Face-style pretrained model package."""

from transformers import AutoConfig, AutoModel

from .alignment import (
    AlignmentResult,
    PermutationSpec,
    align,
    apply_permutation,
    random_permutation,
)
from .architectures import build_model, initialize, list_architectures, register_architecture
from .augmentation import TokenPermutation, WindowSampler
from .configuration_sane import SaneConfig
from .data import ImageDataset, dataset_from_tensors, load_dataset_by_name
from .demo import DemoConfig, run_demo
from .embedding import Embeddings, decode_latents, embed, encode_tokens
from .evaluation import SampleEvaluation, evaluate_samples, scratch_models
from .experiments import SamplingMethod, SamplingResults, SamplingSettings, compare_sampling
from .modeling_sane import (
    SaneDecoderModel,
    SaneDecoderOutput,
    SaneEncoderModel,
    SaneEncoderOutput,
    SaneModel,
    SaneModelOutput,
    SanePreTrainedModel,
)
from .pretraining import PretrainingConfig, pretrain
from .probing import (
    LogisticProbe,
    ProbeReport,
    RidgeProbe,
    SaneForPropertyPrediction,
    probe_features,
    probe_zoo,
    weight_statistics,
)
from .sampling import (
    NoveltyReport,
    SampledModels,
    SaneSampler,
    condition_batchnorm,
    draw_latents,
    novelty_report,
    select_prompts,
)
from .tokenization import TokenizedWeights, WeightLayout, WeightTokenizer
from .zoo import ZooConfig, fine_tune_population, train_zoo
from .zoo_dataset import (
    NormalizationStats,
    ZooDataset,
    ZooMetadata,
    build_zoo_dataset,
    load_zoo_dataset,
    push_zoo_dataset,
    save_zoo_dataset,
)
from .zoo_import import ImportReport, ZooImportError, import_zoo

# `AutoConfig`/`AutoModel` resolve "sane" checkpoints once sane_hf is imported.
AutoConfig.register("sane", SaneConfig, exist_ok=True)
AutoModel.register(SaneConfig, SaneModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "AlignmentResult",
    "DemoConfig",
    "Embeddings",
    "ImageDataset",
    "ImportReport",
    "LogisticProbe",
    "NormalizationStats",
    "NoveltyReport",
    "PermutationSpec",
    "PretrainingConfig",
    "ProbeReport",
    "RidgeProbe",
    "SampleEvaluation",
    "SampledModels",
    "SamplingMethod",
    "SamplingResults",
    "SamplingSettings",
    "SaneConfig",
    "SaneDecoderModel",
    "SaneDecoderOutput",
    "SaneEncoderModel",
    "SaneEncoderOutput",
    "SaneForPropertyPrediction",
    "SaneModel",
    "SaneModelOutput",
    "SanePreTrainedModel",
    "SaneSampler",
    "TokenPermutation",
    "TokenizedWeights",
    "WeightLayout",
    "WeightTokenizer",
    "WindowSampler",
    "ZooConfig",
    "ZooDataset",
    "ZooImportError",
    "ZooMetadata",
    "align",
    "apply_permutation",
    "build_model",
    "build_zoo_dataset",
    "compare_sampling",
    "condition_batchnorm",
    "dataset_from_tensors",
    "decode_latents",
    "draw_latents",
    "embed",
    "encode_tokens",
    "evaluate_samples",
    "fine_tune_population",
    "import_zoo",
    "initialize",
    "list_architectures",
    "load_dataset_by_name",
    "load_zoo_dataset",
    "novelty_report",
    "pretrain",
    "probe_features",
    "probe_zoo",
    "push_zoo_dataset",
    "random_permutation",
    "register_architecture",
    "run_demo",
    "save_zoo_dataset",
    "scratch_models",
    "select_prompts",
    "train_zoo",
    "weight_statistics",
]
