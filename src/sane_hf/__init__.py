"""sane-hf: SANE weight-space learning as a Hugging Face-style pretrained model package."""

from transformers import AutoConfig, AutoModel

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
    "build_model",
    "initialize",
    "list_architectures",
    "register_architecture",
]
