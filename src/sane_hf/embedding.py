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
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


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


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate without dropout, and leave the module in the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


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
    index, content = index.to(inputs.device), content.to(inputs.device)
    positions = positions.to(inputs.device)
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
        if outputs is None:
            outputs = window_outputs.new_empty(num_sequences, num_tokens, window_outputs.shape[-1])
        keep = content[local]  # [B, L]
        rows = sequence[:, None].expand_as(token_index)[keep]
        outputs[rows, token_index[keep]] = window_outputs[keep]
    return outputs[0] if single else outputs


def _module_device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def _half(model: nn.Module, name: str) -> nn.Module:
    """The encoder or decoder transformer of a SANE model (or the transformer itself)."""
    return getattr(model, name, model)


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

    ``model`` is a ``SaneModel``, a ``SaneEncoderModel`` or their ``encoder`` module; tokens must
    already be normalized with the zoo's statistics. ``window``/``halo`` default to
    ``default_window_and_halo(config.windowsize)``.
    """
    encoder = _half(model, "encoder")
    window, halo = _resolve_window(model, window, halo)
    device, dtype = _module_device_and_dtype(encoder)
    with _eval_mode(encoder):
        return apply_in_halo_windows(
            encoder,
            tokens.to(device, dtype),
            positions.to(device),
            window,
            halo,
            batch_size,
            progress,
        )


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

    ``decoder`` is a ``SaneModel``, a ``SaneDecoderModel`` or their ``decoder`` module.
    """
    decoder_module = _half(decoder, "decoder")
    window, halo = _resolve_window(decoder, window, halo)
    device, dtype = _module_device_and_dtype(decoder_module)
    with _eval_mode(decoder_module):
        return apply_in_halo_windows(
            decoder_module,
            latents.to(device, dtype),
            positions.to(device),
            window,
            halo,
            batch_size,
            progress,
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
