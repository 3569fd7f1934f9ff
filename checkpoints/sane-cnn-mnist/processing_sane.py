"""SANE's processor for ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``.

`SaneProcessor.save_pretrained` copies this file beside a model as ``processing_sane.py`` and
names it in ``preprocessor_config.json``'s ``auto_map``. The processor itself (alignment,
normalization and tokenization of networks) lives in the sane-hf package: with the package
installed, transformers uses it directly; without, this file says how to get it instead of
transformers' "Unrecognized processing class".
"""

try:
    from sane_hf.models.sane.processing_sane import SaneProcessor
except ImportError as error:
    raise ImportError(
        "this SANE model's processor (SaneProcessor, which aligns, normalizes and tokenizes "
        "networks) comes with the sane-hf package: pip install sane-hf"
    ) from error

__all__ = ["SaneProcessor"]
