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
from .configuration_sane import SaneConfig
from .modeling_sane import (
    SaneDecoderModel,
    SaneDecoderOutput,
    SaneEncoderModel,
    SaneEncoderOutput,
    SaneModel,
    SaneModelOutput,
    SanePreTrainedModel,
)
from .tokenization import TokenizedWeights, WeightLayout, WeightTokenizer

# `AutoConfig`/`AutoModel` resolve "sane" checkpoints once sane_hf is imported.
AutoConfig.register("sane", SaneConfig, exist_ok=True)
AutoModel.register(SaneConfig, SaneModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "AlignmentResult",
    "PermutationSpec",
    "SaneConfig",
    "SaneDecoderModel",
    "SaneDecoderOutput",
    "SaneEncoderModel",
    "SaneEncoderOutput",
    "SaneModel",
    "SaneModelOutput",
    "SanePreTrainedModel",
    "TokenizedWeights",
    "WeightLayout",
    "WeightTokenizer",
    "align",
    "apply_permutation",
    "build_model",
    "initialize",
    "list_architectures",
    "random_permutation",
    "register_architecture",
]
