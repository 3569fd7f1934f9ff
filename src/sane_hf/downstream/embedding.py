"""Embeddings of whole networks, and decoding of whole latent sequences (paper Alg. 2).

SANE's transformer only ever sees a window of the token sequence, so a full network (93 tokens
for CNN-m, ~54k for ResNet-18) is encoded window by window. A window cut out of the sequence loses
the context beyond its edges, so every window of ``window`` *content* tokens is encoded together
with up to ``halo`` context tokens on both sides, and only the content latents are kept ("halo"
windows; the reference uses window 128, halo 64).

All windows have the same length ``min(N, window + 2 * halo)``: windows at the ends of the sequence
shift their context inwards instead of padding, so there is no padding compute and every content
token keeps at least ``halo`` tokens of context on the side where the sequence continues. Windows of
all models and all positions are built with one gather and encoded in batches of ``batch_size``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import BatchFeature

from sane_hf.models.sane.modeling_sane import check_positions, set_position_checks
from sane_hf.models.sane.network_inputs import is_dataset
from sane_hf.weights.universal import LAYER_TYPES

TOKEN_COLUMNS = ("tokens", "positions", "counts", "scales")

if TYPE_CHECKING:
    from datasets import Dataset


def halo_windows(num_tokens: int, window: int, halo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of every halo window of a sequence and which of them are content.

    Returns:
        ``(index [num_windows, L], content [num_windows, L])`` with ``L = min(num_tokens,
        window + 2 * halo)``: ``index`` holds sequence positions, ``content`` is True on the
        ``window`` tokens (fewer in the last window) whose latents the window provides. Every
        token is content of exactly one window.
    """
    if window < 1 or halo < 0:
        raise ValueError(f"window must be >= 1 and halo >= 0, got window={window}, halo={halo}")
    if num_tokens < 1:
        raise ValueError(f"cannot cut windows out of an empty sequence (num_tokens={num_tokens})")
    length = min(num_tokens, window + 2 * halo)
    content_start = torch.arange(0, num_tokens, window)
    context_start = (content_start - halo).clamp(0, num_tokens - length)
    index = context_start[:, None] + torch.arange(length)
    content = (index >= content_start[:, None]) & (index < content_start[:, None] + window)
    return index, content


def default_window_and_halo(windowsize: int) -> tuple[int, int]:
    """Content window and halo whose total length is the training window of the model.

    The model saw windows of ``windowsize`` tokens during training; encoding windows of that
    length keeps attention in the regime it was trained for (half content, a quarter of context
    on each side).
    """
    halo = windowsize // 4
    return windowsize - 2 * halo, halo


def _content_slots(content: torch.Tensor) -> torch.Tensor:
    """Where each halo window's content lies in it: ``[num_windows, C]`` window slots.

    ``content`` is the mask of `halo_windows`; content is one run of slots per window. Windows
    with fewer than ``C`` content tokens (the last one) repeat their last slot, so that gathering
    and scattering by slot needs no boolean indexing (which waits for the device) and writes a
    repeated token twice with the same value.
    """
    count = content.sum(dim=1, keepdim=True)
    first = content.int().argmax(dim=1, keepdim=True)
    return first + torch.minimum(torch.arange(int(count.max())), count - 1)


@contextlib.contextmanager
def _eval_mode(module: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Evaluate without dropout, and leave the module in the mode it had.

    The positions of the whole sequence are range-checked once here instead of in every window's
    forward pass, where each check would be a device synchronization.
    """
    embeddings = module.position_embeddings
    check_positions(positions.reshape(1, -1, 3), embeddings.max_positions)
    was_training, was_checking = module.training, embeddings.check_range
    module.eval()
    set_position_checks(module, False)
    try:
        yield
    finally:
        module.train(was_training)
        set_position_checks(module, was_checking)


def _model_batch(values: torch.Tensor, positions: torch.Tensor, name: str):
    """``[N, F]``/``[M, N, F]`` values and ``[N, 3]``/``[M, N, 3]`` positions -> batched views."""
    single = values.dim() == 2
    values = values[None] if single else values
    if values.dim() != 3:
        raise ValueError(f"{name} must be [N, F] or [M, N, F], got {tuple(values.shape)}")
    if positions.dim() == 2:
        positions = positions.expand(len(values), *positions.shape)
    if positions.shape != (*values.shape[:2], 3):
        raise ValueError(
            f"positions must be [N, 3] or [M, N, 3] matching {name} {tuple(values.shape)}, "
            f"got {tuple(positions.shape)}"
        )
    return values, positions, single


@torch.no_grad()
def apply_in_halo_windows(
    transformer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    positions: torch.Tensor,
    window: int,
    halo: int,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``transformer(inputs [B, L, F], positions [B, L, 3]) -> [B, L, F']`` over halo windows.

    ``inputs`` is ``[N, F]`` (one sequence) or ``[M, N, F]`` (sequences sharing one length); the
    result has the same leading shape with ``F'`` features, each token taken from the one window
    in which it is content. Windows of all sequences are stacked and run ``batch_size`` at a time.
    """
    inputs, positions, single = _model_batch(inputs, positions, "inputs")
    num_sequences, num_tokens, _ = inputs.shape
    index, content = halo_windows(num_tokens, window, halo)
    slots = _content_slots(content).to(inputs.device)
    index, positions = index.to(inputs.device), positions.to(inputs.device)
    windows_per_sequence = len(index)
    total_windows = num_sequences * windows_per_sequence

    outputs = None
    batches = range(0, total_windows, batch_size)
    for start in tqdm(batches, desc="windows", unit="batch", disable=not progress):
        window_ids = torch.arange(
            start, min(start + batch_size, total_windows), device=inputs.device
        )
        sequence, local = window_ids // windows_per_sequence, window_ids % windows_per_sequence
        token_index = index[local]  # [B, L]
        window_outputs = transformer(
            inputs[sequence[:, None], token_index], positions[sequence[:, None], token_index]
        )
        num_features = window_outputs.shape[-1]
        if outputs is None:
            outputs = window_outputs.new_empty(num_sequences, num_tokens, num_features)
        keep = slots[local]  # [B, C]
        kept_outputs = window_outputs.gather(1, keep[..., None].expand(-1, -1, num_features))
        outputs[sequence[:, None], token_index.gather(1, keep)] = kept_outputs
    return outputs[0] if single else outputs


def _module_device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def encode_tokens(
    model: nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Token latents ``[N, latent_dim]`` (or ``[M, N, latent_dim]``) of full token sequences.

    ``model`` is a ``SaneModel`` or a ``SaneEncoderModel``; tokens must
    already be normalized with the zoo's statistics. ``window``/``halo`` default to
    ``default_window_and_halo(config.windowsize)``.
    """
    return _apply_half(model, model.encode, tokens, positions, window, halo, batch_size, progress)


def decode_latents(
    decoder: nn.Module,
    latents: torch.Tensor,
    positions: torch.Tensor,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Normalized tokens ``[N, tokensize]`` (or ``[M, N, tokensize]``) decoded from full latent
    sequences with halo windows, the inverse of ``encode_tokens``.

    ``decoder`` is a ``SaneModel`` or a ``SaneDecoderModel``.
    """
    return _apply_half(
        decoder, decoder.decode, latents, positions, window, halo, batch_size, progress
    )


def _apply_half(
    model: nn.Module,
    half: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    values: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    halo: int | None,
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    """Run ``half`` (``model.encode`` or ``model.decode``) over full sequences in halo windows."""
    window, halo = _resolve_window(model, window, halo)
    device, dtype = _module_device_and_dtype(model)
    with _eval_mode(model, positions):
        return apply_in_halo_windows(
            half, values.to(device, dtype), positions.to(device), window, halo, batch_size, progress
        )


def _resolve_window(model: nn.Module, window: int | None, halo: int | None) -> tuple[int, int]:
    if window is not None and halo is not None:
        return window, halo
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("pass window and halo explicitly: the model has no config.windowsize")
    default_window, default_halo = default_window_and_halo(config.windowsize)
    window = default_window if window is None else window
    halo = default_halo if halo is None else halo
    return window, halo


def pool_latents(
    latents: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model embeddings from token latents: the mean over all tokens and the mean per layer.

    Args:
        latents: ``[N, D]`` or ``[M, N, D]`` token latents.
        positions: ``[N, 3]`` (shared layout) or ``[M, N, 3]``; column 1 is the layer index.

    Returns:
        ``(mean [M, D], layer_means [M, L, D])`` (without the model axis for ``[N, D]`` input),
        with one entry per distinct layer index, in increasing order.
    """
    latents, positions, single = _model_batch(latents, positions, "latents")
    _, layer = torch.unique(positions[..., 1].to(latents.device), return_inverse=True)
    num_models, _, latent_dim = latents.shape
    num_layers = int(layer.max()) + 1
    flat_layer = layer + num_layers * torch.arange(num_models, device=latents.device)[:, None]
    sums = latents.new_zeros(num_models * num_layers, latent_dim)
    sums.index_add_(0, flat_layer.flatten(), latents.flatten(0, 1))
    counts = torch.bincount(flat_layer.flatten(), minlength=num_models * num_layers)
    layer_means = (sums / counts[:, None].clamp_min(1)).view(num_models, num_layers, latent_dim)
    mean = latents.mean(1)
    return (mean[0], layer_means[0]) if single else (mean, layer_means)


@dataclass
class Embeddings:
    """Embeddings of one network (no model axis) or of many networks (axis ``M``).

    Attributes:
        mean: ``[D]`` / ``[M, D]`` mean of the token latents: SANE's model embedding.
        layer_means: ``[L, D]`` / ``[M, L, D]`` mean latent of every layer (by layer index).
        token_latents: ``[N, D]`` / ``[M, N, D]`` all token latents; for many networks only when
            asked for (``return_token_latents=True``), as they take ``N`` times the memory.
        properties: for a zoo, every non-token column as an array of length ``M`` (struct
            columns such as ``hyperparameters`` are flattened into their fields).
        ids: which network each row is (``network_ids`` of the processor, or
            ``<model_id>_epoch_<epoch>`` for a zoo split); empty for one network.
        extras: further per-network arrays ``[M, ...]`` computed beside the embedding by
            `PretrainedSane.embed` (in-distribution scores, the probe heads' features).
    """

    mean: torch.Tensor
    layer_means: torch.Tensor
    token_latents: torch.Tensor | None = None
    properties: dict[str, np.ndarray] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def embed(
    model: nn.Module,
    weights: Dataset | BatchFeature | Any,
    *,
    processor: Callable[[Any], BatchFeature] | None = None,
    window: int | None = None,
    halo: int | None = None,
    batch_size: int = 256,
    models_per_chunk: int = 256,
    return_token_latents: bool = False,
    progress: bool = True,
) -> Embeddings:
    """Embed networks, or every model of a zoo dataset split, with halo windows.

    Many networks are embedded in one call: the windows of all networks of a chunk are stacked
    and encoded ``batch_size`` windows at a time (`apply_in_halo_windows`). Results always have
    the network axis ``M``, also for one network.

    Args:
        model: a ``SaneModel`` or ``SaneEncoderModel``.
        weights: the output of a ``SaneProcessor`` (``BatchFeature`` of normalized tokens and
            ``network_ids``); anything the processor reads (modules, state_dicts, files, folders,
            zoos, Hub ids) when ``processor`` is given; or a zoo dataset split
            (``datasets.Dataset`` with ``tokens``/``positions`` columns, already normalized).
        processor: the model's ``SaneProcessor``: checks each network's layout, aligns,
            normalizes and tokenizes it. Raw weights are never embedded without it: statistics
            matched to parameters by name alone would silently normalize another architecture.
        window, halo: content window and context per side; default: halo windows as long as the
            model's training window (``default_window_and_halo``).
        batch_size: windows encoded at once (across networks and positions).
        models_per_chunk: networks (or zoo rows) encoded at once.
        return_token_latents: keep all token latents ``[M, N, D]`` (``N`` times the memory).
        progress: progress bar over the chunks of networks.
    """
    if processor is not None and not (is_dataset(weights) or isinstance(weights, BatchFeature)):
        weights = processor(weights)
    if not (is_dataset(weights) or isinstance(weights, BatchFeature)):
        raise TypeError(
            f"embed() got {type(weights).__name__}: pass processor=SaneProcessor.from_pretrained"
            "(<model>) to embed networks (it checks their layout, aligns and normalizes them "
            "like the zoo), its output, or a zoo dataset split"
        )
    embed_many = _embed_zoo_split if is_dataset(weights) else _embed_features
    return embed_many(
        model,
        weights,
        window,
        halo,
        batch_size,
        models_per_chunk,
        return_token_latents,
        progress,
    )


def _embed_chunks(
    model: nn.Module,
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    window: int | None,
    halo: int | None,
    batch_size: int,
    return_token_latents: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Encode chunks of ``(tokens [M, N, T], positions [M, N, 3])`` and pool every network."""
    means, layer_means, token_latents = [], [], []
    for tokens, positions in chunks:
        positions = positions.long()
        latents = encode_tokens(model, tokens, positions, window, halo, batch_size)
        mean, per_layer = pool_latents(latents, positions[0])
        means.append(mean.cpu())
        layer_means.append(per_layer.cpu())
        if return_token_latents:
            token_latents.append(latents.cpu())
    return (
        torch.cat(means),
        torch.cat(layer_means),
        torch.cat(token_latents) if return_token_latents else None,
    )


def _embed_features(
    model: nn.Module,
    features: BatchFeature,
    window: int | None,
    halo: int | None,
    batch_size: int,
    models_per_chunk: int,
    return_token_latents: bool,
    progress: bool,
) -> Embeddings:
    """Embed the networks of a ``SaneProcessor`` output, ``models_per_chunk`` at a time."""
    if "lengths" in features:
        return _embed_universal_features(
            model, features, window, halo, batch_size, return_token_latents, progress
        )
    tokens, positions = features["tokens"], features["positions"]
    if tokens.dim() == 2:
        tokens, positions = tokens[None], positions.reshape(1, *positions.shape[-2:])
    if positions.dim() == 2:
        positions = positions.expand(len(tokens), -1, -1)
    starts = range(0, len(tokens), models_per_chunk)
    chunks = (
        (tokens[start : start + models_per_chunk], positions[start : start + models_per_chunk])
        for start in tqdm(starts, desc="embedding networks", unit="chunk", disable=not progress)
    )
    mean, layer_means, latents = _embed_chunks(
        model, chunks, window, halo, batch_size, return_token_latents
    )
    ids = list(features.get("network_ids", [f"network_{i}" for i in range(len(tokens))]))
    return Embeddings(mean, layer_means, latents, ids=ids)


def _embed_universal_features(
    model: nn.Module,
    features: BatchFeature,
    window: int | None,
    halo: int | None,
    batch_size: int,
    return_token_latents: bool,
    progress: bool,
) -> Embeddings:
    """Embed a ``SaneUniversalProcessor`` output: networks of several architectures, padded.

    Networks with the same positions (one architecture) are encoded together without their
    padding; ``layer_means`` are then per layer type (``LAYER_TYPES``, zero where a network has
    none), so the embeddings of all architectures share one space.
    """
    tokens, positions, lengths = features["tokens"], features["positions"], features["lengths"]
    groups: dict[bytes, list[int]] = {}
    for index, length in enumerate(lengths.tolist()):
        key = positions[index, :length].numpy().tobytes()
        groups.setdefault(key, []).append(index)
    count, latent_dim = len(tokens), model.config.latent_dim
    mean = torch.zeros(count, latent_dim)
    layer_means = torch.zeros(count, len(LAYER_TYPES), latent_dim)
    token_latents = (
        torch.zeros(count, tokens.shape[1], latent_dim) if return_token_latents else None
    )
    for members in tqdm(groups.values(), desc="architectures", disable=not progress):
        length = int(lengths[members[0]])
        group_positions = positions[members, :length].long()
        latents = (
            encode_tokens(
                model, tokens[members, :length], group_positions, window, halo, batch_size
            )
            .cpu()
            .float()
        )
        mean[members] = latents.mean(1)
        types = group_positions[0, :, 1]
        for type_id in types.unique().tolist():
            layer_means[members, type_id] = latents[:, types == type_id].mean(1)
        if token_latents is not None:
            token_latents[members, :length] = latents
    ids = list(features.get("network_ids", [f"network_{i}" for i in range(count)]))
    return Embeddings(mean, layer_means, token_latents, ids=ids)


def _embed_zoo_split(
    model: nn.Module,
    split: Dataset,
    window: int | None,
    halo: int | None,
    batch_size: int,
    models_per_chunk: int,
    return_token_latents: bool,
    progress: bool,
) -> Embeddings:
    missing = [name for name in ("tokens", "positions") if name not in split.column_names]
    if missing:
        raise ValueError(f"the dataset split lacks the zoo columns {missing}")
    if "scales" in split.column_names:  # a mixed zoo: several architectures, padded
        from sane_hf.zoo.mixed import padded_split

        tokens, _, positions, lengths = padded_split(split)
        features = BatchFeature(
            {"tokens": tokens, "positions": positions, "lengths": lengths,
             "network_ids": list(split["network_id"])}
        )  # fmt: skip
        embeddings = _embed_universal_features(
            model, features, window, halo, batch_size, return_token_latents, progress
        )
        embeddings.properties = zoo_properties(split)
        return embeddings
    rows = split.with_format("torch", columns=["tokens", "positions"])
    starts = range(0, len(split), models_per_chunk)
    chunks = (
        (chunk["tokens"], chunk["positions"])
        for start in tqdm(starts, desc="embedding models", unit="chunk", disable=not progress)
        for chunk in [rows[start : start + models_per_chunk]]
    )
    mean, layer_means, latents = _embed_chunks(
        model, chunks, window, halo, batch_size, return_token_latents
    )
    properties = zoo_properties(split)
    ids = []
    if "model_id" in properties and "epoch" in properties:
        ids = [
            f"{model_id}_epoch_{int(epoch):03d}"
            for model_id, epoch in zip(properties["model_id"], properties["epoch"])
        ]
    return Embeddings(mean, layer_means, latents, properties, ids)


def zoo_properties(split: Dataset) -> dict[str, np.ndarray]:
    """Every non-token column of a zoo split as an array, struct columns flattened into fields.

    A struct field takes the field's name (``hyperparameters.activation`` -> ``activation``)
    unless a top-level column has that name, in which case it keeps the dotted name.
    """
    columns = split.remove_columns([c for c in TOKEN_COLUMNS if c in split.column_names])
    table = columns.to_dict()
    properties = {}
    for name, values in table.items():
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, dict) for v in present):
            for key in dict.fromkeys(k for v in present for k in v):
                flat_name = f"{name}.{key}" if key in table else key
                field_values = [None if v is None else v.get(key) for v in values]
                properties[flat_name] = _column_array(field_values)
        else:
            properties[name] = _column_array(values)
    return properties


def _column_array(values: list) -> np.ndarray:
    """Numbers become float64 with missing values as NaN (a column of only missing values too);
    anything else keeps its type."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.array(values)


__all__ = [
    "Embeddings",
    "apply_in_halo_windows",
    "decode_latents",
    "default_window_and_halo",
    "embed",
    "encode_tokens",
    "halo_windows",
    "pool_latents",
    "zoo_properties",
]
