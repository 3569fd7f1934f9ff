"""The CPU fast path of zoo training: stacked ``nn.Sequential`` networks as one network of grouped
layers, and the process-wide glibc heap setting that keeps a CPU step's activations mapped.

On CPU, plain ``nn.Sequential`` networks of convolutions, linear, pooling, activation and dropout
layers (CNN-s, CNN-m, MLPs) skip vmap: they run as one network of grouped layers whose
activations stay ``[batch, models * channels, ...]`` (`GroupedSequential`, ~2x faster than vmap,
whose layout copies dominate a CPU step). Everything else trains through vmap
(`sane_hf.zoo.population`).

`keep_freed_memory_on_the_heap` changes how the whole process allocates memory, so it is opt-in:
``train_zoo(..., keep_freed_memory=True)`` (the zoo benchmark turns it on).
"""

from __future__ import annotations

import ctypes
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sane_hf.zoo.architectures import ACTIVATIONS

# glibc's mallopt parameters, and the values that keep a CPU step's activations on the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_FREED_BYTES, _MMAP_BYTES = 256 * 2**20, 32 * 2**20


# Layers that act on every channel on its own: they run unchanged on grouped activations.
_PER_CHANNEL_LAYERS = (
    nn.Identity,
    nn.Dropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    *ACTIVATIONS.values(),
)
_CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class GroupedSequential:
    """``M`` stacked copies of an ``nn.Sequential`` run as one network of grouped layers.

    vmap turns a convolution of stacked models into one grouped convolution, but then moves the
    model dimension next to the batch dimension for the following layer (bias, pooling), which
    copies the largest activations several times per step: on CPU those copies cost as much as
    the convolutions. Here activations stay ``[batch, M * channels, ...]`` (model ``m`` owns a
    block of channels) through the whole network: convolutions are grouped by model, linear
    layers are batched matmuls, and per-channel layers (activations, pooling, dropout) run as they
    are. Only plain ``Sequential`` networks of such layers without buffers qualify (``supports``);
    everything else trains through vmap.
    """

    def __init__(self, module: nn.Sequential, num_models: int):
        self.layers = list(module.named_children())
        self.num_models = num_models

    @staticmethod
    def supports(module: nn.Module) -> bool:
        if (
            not isinstance(module, nn.Sequential)
            or type(module).forward is not nn.Sequential.forward
        ):
            return False
        return next(module.buffers(), None) is None and all(
            _is_groupable(layer) for layer in module.children()
        )

    @staticmethod
    def inputs(x: Tensor) -> Tensor:
        """``[B, M, C, ...]`` per-model inputs as grouped ``[B, M * C, ...]`` (images channels-last,
        the layout of oneDNN's fast grouped convolutions)."""
        x = x.flatten(1, 2)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def shared_inputs(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits ``[M, B, classes]`` of every model on the same inputs ``x`` ``[B, C, ...]``."""
        models_x = x.unsqueeze(1).expand(-1, self.num_models, *x.shape[1:])
        return self(params, self.inputs(models_x)).transpose(0, 1)

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits ``[B, M, classes]`` of grouped inputs ``x`` (see ``inputs``)."""
        for name, layer in self.layers:
            weight, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
            if type(layer) in _CONVOLUTIONS:
                x = _CONVOLUTIONS[type(layer)](
                    x,
                    weight.flatten(0, 1),
                    None if bias is None else bias.flatten(),
                    layer.stride,
                    layer.padding,
                    layer.dilation,
                    layer.groups * self.num_models,
                )
            elif type(layer) is nn.Linear:
                x = self._linear(x, weight, bias)
            elif type(layer) is nn.Flatten:
                x = x.flatten(1)
            else:
                x = layer(x)
        return x.unflatten(1, (self.num_models, -1))

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if x.dim() != 2:
            raise ValueError(
                f"grouped Linear layers take [batch, features] inputs, got {x.dim()}-d"
            )
        x = x.unflatten(1, (self.num_models, -1)).transpose(0, 1)  # [M, B, in]
        weight = weight.transpose(1, 2)  # [M, in, out]
        out = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight)
        return out.transpose(0, 1).flatten(1)


def _is_groupable(layer: nn.Module) -> bool:
    kind = type(layer)
    if kind in _CONVOLUTIONS:
        return layer.padding_mode == "zeros"
    if kind is nn.Flatten:
        return layer.start_dim == 1 and layer.end_dim == -1
    return kind is nn.Linear or kind in _PER_CHANNEL_LAYERS


def keep_freed_memory_on_the_heap() -> None:
    """Stop glibc from handing freed activation memory back to the OS after every CPU step.

    By default glibc serves the step's multi-MB activations with fresh mmaps or trims them off
    the heap once freed, so every step page-faults them in again: a third of a CNN-s step.
    This is process-wide, like setting ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``
    before starting Python, and keeps at most ``_KEEP_FREED_BYTES`` of freed memory mapped.
    Other C libraries are left alone. Opt-in (``train_zoo(..., keep_freed_memory=True)``): a
    library should not change how its host process allocates memory unasked.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)
