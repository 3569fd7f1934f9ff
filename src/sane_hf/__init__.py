"""sane-hf: SANE weight-space learning as a Hugging Face-style pretrained model package."""

from .architectures import build_model, initialize, list_architectures, register_architecture

__version__ = "0.1.0"

__all__ = [
    "build_model",
    "initialize",
    "list_architectures",
    "register_architecture",
]
