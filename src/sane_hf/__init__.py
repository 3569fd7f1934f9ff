"""sane-hf: SANE weight-space learning as a Hugging Face-style pretrained model package."""

from .architectures import build_model, initialize, list_architectures, register_architecture
from .tokenization import TokenizedWeights, WeightLayout, WeightTokenizer

__version__ = "0.1.0"

__all__ = [
    "TokenizedWeights",
    "WeightLayout",
    "WeightTokenizer",
    "build_model",
    "initialize",
    "list_architectures",
    "register_architecture",
]
