"""`SaneUniversalProcessor`: networks of any supported architecture to SANE inputs, and back.

The processor of a SANE pretrained on universal tokens (`sane_hf.weights.universal`) holds the
token scheme and the model's position limits, nothing fitted on a zoo: no statistics, no
layout of one architecture, no alignment reference. It reads modules, state_dicts,
``.safetensors`` files, folders (also mixing architectures), zoos and Hub ids
(`network_inputs`), refuses a layer type it does not read in one line naming the module, and
decodes tokens into any target architecture (a module or a registered name)::

    processor = SaneUniversalProcessor.from_pretrained("checkpoints/sane-multi-cpu")
    inputs = processor([mlp, cnn, resnet])          # padded BatchFeature, one row per network
    embeddings = sane_hf.embed(model, inputs)
    networks = processor.decode(tokens, scales, architecture="cnn_s", as_modules=True)

``SaneProcessor.from_pretrained`` returns this class for such a folder.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import BatchFeature
from transformers.feature_extraction_utils import FeatureExtractionMixin

from sane_hf.weights.layout import WeightLayout
from sane_hf.weights.universal import (
    TokenScheme,
    UniversalTokenizer,
    UniversalTokens,
    check_supported_modules,
)
from sane_hf.zoo.architectures import build_model

from .network_inputs import NetworkInput, iter_networks

POSITION_NAMES = ("depth", "layer type", "token in layer")


class SaneUniversalProcessor(FeatureExtractionMixin):
    """Tokenizes networks of any supported architecture under one `TokenScheme`.

    Args:
        token_scheme: the `TokenScheme` (or its dict) the model was pretrained on.
        max_positions: the model's position-table sizes; networks needing more are refused.
    """

    model_input_names: ClassVar[list[str]] = ["tokens", "positions", "attention_mask"]

    def __init__(
        self,
        token_scheme: TokenScheme | Mapping[str, Any],
        max_positions: Sequence[int] | None = None,
        **kwargs: Any,
    ):
        for name in ("feature_extractor_type", "processor_class", "trust_remote_code"):
            kwargs.pop(name, None)
        unknown = sorted(name for name in kwargs if not name.startswith("_"))
        if unknown:
            raise ValueError(f"unknown SaneUniversalProcessor settings {unknown}")
        super().__init__()
        self.token_scheme = (
            token_scheme
            if isinstance(token_scheme, TokenScheme)
            else TokenScheme.from_dict(token_scheme)
        )
        self.max_positions = None if max_positions is None else [int(m) for m in max_positions]

    @property
    def tokensize(self) -> int:
        return self.token_scheme.tokensize

    @cached_property
    def tokenizer(self) -> UniversalTokenizer:
        return UniversalTokenizer(self.token_scheme)

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_extractor_type": type(self).__name__,
            "processor_class": type(self).__name__,
            "token_scheme": self.token_scheme.to_dict(),
            "max_positions": self.max_positions,
        }

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> SaneUniversalProcessor:
        kwargs.pop("trust_remote_code", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # -- processing ------------------------------------------------------------------------

    def __call__(
        self,
        networks: NetworkInput | Iterable[NetworkInput],
        *,
        progress: bool = False,
    ) -> BatchFeature:
        """Tokens of one network or many, padded to the longest.

        Returns a ``BatchFeature`` with ``tokens`` ``[M, N, T]`` (float32), ``positions``
        ``[M, N, 3]``, ``attention_mask`` ``[M, N]`` (False past a network's end),
        ``token_mask`` ``[M, N, T]`` (real values), ``lengths`` ``[M]``, ``scales`` (one tensor
        per network, a value per layer), ``layouts`` (each network's `WeightLayout`) and
        ``network_ids``.
        """
        inputs = [networks] if _is_single(networks) else list(networks)
        for index, item in enumerate(inputs):
            if isinstance(item, nn.Module):
                try:
                    check_supported_modules(item)
                except ValueError as error:
                    raise ValueError(f"input {index}: {error}") from None
        ids, encoded = [], []
        named = tqdm(
            iter_networks(inputs), desc="tokenizing networks", unit="network", disable=not progress
        )
        for network_id, state_dict in named:
            try:
                tokens = self.tokenizer(state_dict)
                self._check_limits(tokens)
            except ValueError as error:
                raise ValueError(f"network {network_id!r}: {error}") from None
            ids.append(network_id)
            encoded.append(tokens)
        return _padded_batch(encoded, ids, self.tokensize)

    def _check_limits(self, tokens: UniversalTokens) -> None:
        if self.max_positions is None:
            return
        largest = tokens.positions.amax(dim=0).tolist()
        for name, high, limit in zip(POSITION_NAMES, largest, self.max_positions):
            if high >= limit:
                raise ValueError(
                    f"needs {name} positions up to {high}, but the model's table has {limit} "
                    "entries: a layer this large needs a SANE pretrained with larger max_positions"
                )

    # -- decoding --------------------------------------------------------------------------

    def layout(
        self, architecture: nn.Module | str, architecture_kwargs: Mapping[str, Any] | None = None
    ) -> WeightLayout:
        """The row layout of a target architecture (a module or a registered name)."""
        return self.tokenizer.layout(_target_module(architecture, architecture_kwargs))

    def target_positions(
        self, architecture: nn.Module | str, architecture_kwargs: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """Positions ``[N, 3]`` of the target architecture's tokens: what a decoder needs to
        generate a network of it."""
        module = _target_module(architecture, architecture_kwargs)
        return self.tokenizer(module).positions

    def decode(
        self,
        tokens: torch.Tensor,
        scales: torch.Tensor | Sequence[torch.Tensor] | None,
        architecture: nn.Module | str,
        architecture_kwargs: Mapping[str, Any] | None = None,
        *,
        as_modules: bool = False,
    ) -> list[dict[str, torch.Tensor]] | list[nn.Module]:
        """State_dicts (or modules) of ``architecture`` from tokens ``[N, T]`` / ``[M, N, T]``.

        ``scales`` are the per-layer scales (one row per network); ``None`` uses the scheme's
        fixed scales of the architecture (``scale="fan_in"`` / ``"none"``), e.g. for samples.
        Tokens longer than the architecture's sequence (padding) are cut.
        """
        module = _target_module(architecture, architecture_kwargs)
        layout = self.tokenizer.layout(module)
        tokens = torch.as_tensor(tokens).detach().float().cpu()
        tokens = tokens[None] if tokens.dim() == 2 else tokens
        num_tokens = self.tokenizer.num_tokens(layout)
        if tokens.dim() != 3 or tokens.shape[1] < num_tokens:
            raise ValueError(
                f"tokens must be [N, T] or [M, N, T] with N >= {num_tokens} for this "
                f"architecture, got {tuple(tokens.shape)}"
            )
        if scales is None:
            if self.token_scheme.scale == "layer":
                raise ValueError("scale='layer' tokens need their scales to be decoded")
            scales = [self.tokenizer(module).scales] * len(tokens)
        elif isinstance(scales, torch.Tensor) and scales.dim() == 1:
            scales = [scales]
        state_dicts = [
            self.tokenizer.decode(t[:num_tokens], layout, torch.as_tensor(s))
            for t, s in zip(tokens, scales, strict=True)
        ]
        if not as_modules:
            return state_dicts
        modules = []
        for state_dict in state_dicts:
            target = _target_module(architecture, architecture_kwargs, fresh=True)
            target.load_state_dict(state_dict)
            modules.append(target)
        return modules

    def __repr__(self) -> str:
        return f"{type(self).__name__}(token_scheme={self.token_scheme.to_dict()})"


def _is_single(item: Any) -> bool:
    return not isinstance(item, list | tuple)


def _target_module(
    architecture: nn.Module | str,
    architecture_kwargs: Mapping[str, Any] | None,
    fresh: bool = False,
) -> nn.Module:
    if isinstance(architecture, nn.Module):
        return copy.deepcopy(architecture) if fresh else architecture
    return build_model(architecture, **dict(architecture_kwargs or {}))


def _padded_batch(encoded: list[UniversalTokens], ids: list[str], tokensize: int) -> BatchFeature:
    lengths = torch.tensor([len(e.tokens) for e in encoded])
    count, longest = len(encoded), int(lengths.max())
    tokens = torch.zeros(count, longest, tokensize)
    positions = torch.zeros(count, longest, 3, dtype=torch.long)
    token_mask = torch.zeros(count, longest, tokensize, dtype=torch.bool)
    for index, item in enumerate(encoded):
        length = len(item.tokens)
        tokens[index, :length] = item.tokens
        positions[index, :length] = item.positions
        token_mask[index, :length] = item.mask
    return BatchFeature(
        {
            "tokens": tokens,
            "positions": positions,
            "attention_mask": torch.arange(longest) < lengths[:, None],
            "token_mask": token_mask,
            "lengths": lengths,
            "scales": [item.scales for item in encoded],
            "layouts": [item.layout for item in encoded],
            "network_ids": ids,
        }
    )


__all__ = [
    "SaneUniversalProcessor",
]
