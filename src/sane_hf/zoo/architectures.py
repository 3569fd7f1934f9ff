"""Network architectures of the Model Zoos protocol, and a registry for user architectures.

Zoos are populations of one architecture, so everything downstream (training many models at
once, tokenizing, aligning, sampling into a new network) needs to build that architecture
from a name and a few keyword arguments. ``build_model("cnn_s", in_channels=1)`` does that;
``register_architecture`` adds a user's own ``nn.Module`` factory under a new name.

Architectures (Schürholt et al. 2022, "Model Zoos"; parameter counts for 10 classes):

- ``cnn_s``: 2,464 parameters on 28x28 grayscale (2,864 on RGB).
- ``cnn_m``: 10,853 parameters on 32x32 RGB.
- ``cnn_wide``: CNN-s with 16/12/8 channels (7,290 parameters on 28x28 grayscale).
- ``mlp``: fully connected network (e.g. for MNIST-1D, 40 features).
- ``resnet18``: ResNet-18 with the CIFAR stem (3x3 stride-1 conv without bias, no max-pool).
- ``resnet_bottleneck``: a small ResNet-50-style network of bottleneck blocks.
- ``resnet_small``: a ResNet of one basic block per stage and widths 4..16 (6,406 parameters on
  8x8 grayscale digits): residual blocks and BatchNorm a 2-core CPU trains in minutes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}

INITIALIZATIONS = (
    "default",
    "uniform",
    "normal",
    "kaiming_uniform",
    "kaiming_normal",
    "xavier_uniform",
    "xavier_normal",
)


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (one of ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def _activation_and_dropout(activation: str, dropout: float) -> tuple[nn.Module, nn.Module]:
    """The ``act, Dropout`` pair that follows every hidden layer of the Model Zoos CNNs."""
    return make_activation(activation), nn.Dropout(dropout)


class CNNSmall(nn.Sequential):
    """CNN-s of the Model Zoos: 2,464 parameters on 28x28 grayscale, 2,864 on RGB.

    ``channels`` are the three convolutions' widths (the Model Zoos' 8, 6, 4 by default).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        activation: str = "tanh",
        dropout: float = 0.0,
        channels: Sequence[int] = (8, 6, 4),
    ):
        first, second, third = channels
        super().__init__(
            nn.Conv2d(in_channels, first, 5),
            nn.MaxPool2d(2),
            *_activation_and_dropout(activation, dropout),
            nn.Conv2d(first, second, 5),
            nn.MaxPool2d(2),
            *_activation_and_dropout(activation, dropout),
            nn.Conv2d(second, third, 2),
            *_activation_and_dropout(activation, dropout),
            nn.Flatten(),
            nn.Linear(third * 9, 20),
            *_activation_and_dropout(activation, dropout),
            nn.Linear(20, num_classes),
        )


class CNNMedium(nn.Sequential):
    """CNN-m of the Model Zoos: 10,853 parameters on 32x32 RGB."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "tanh",
        dropout: float = 0.0,
    ):
        super().__init__(
            nn.Conv2d(in_channels, 16, 3),
            nn.MaxPool2d(2),
            *_activation_and_dropout(activation, dropout),
            nn.Conv2d(16, 32, 3),
            nn.MaxPool2d(2),
            *_activation_and_dropout(activation, dropout),
            nn.Conv2d(32, 15, 3),
            nn.MaxPool2d(2),
            *_activation_and_dropout(activation, dropout),
            nn.Flatten(),
            nn.Linear(60, 20),
            *_activation_and_dropout(activation, dropout),
            nn.Linear(20, num_classes),
        )


class MLP(nn.Sequential):
    """Fully connected network: ``in_features -> hidden... -> num_classes``."""

    def __init__(
        self,
        in_features: int = 40,
        num_classes: int = 10,
        hidden: Sequence[int] = (100, 100),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), *_activation_and_dropout(activation, dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions); a 1x1 projection when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation)
        self.act2 = make_activation(activation)
        self.downsample = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet-50-style bottleneck block (1x1 reduce, 3x3, 1x1 expand by 4)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu"):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.act1 = make_activation(activation)
        self.act2 = make_activation(activation)
        self.act3 = make_activation(activation)
        self.downsample = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.downsample(x))


class ResNet(nn.Module):
    """ResNet with the CIFAR stem: 3x3 stride-1 convolution without bias, no max-pool."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = make_activation(activation)
        in_planes = widths[0]
        stages = []
        for stage, (planes, blocks) in enumerate(zip(widths, num_blocks, strict=True)):
            stride = 1 if stage == 0 else 2
            layers = []
            for i in range(blocks):
                layers.append(block(in_planes, planes, stride if i == 0 else 1, activation))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet18(in_channels: int = 3, num_classes: int = 10, activation: str = "relu") -> ResNet:
    """ResNet-18 with the CIFAR stem (11.2M parameters for 10 classes)."""
    return ResNet(
        BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), in_channels, num_classes, activation
    )


def resnet_bottleneck(
    in_channels: int = 3,
    num_classes: int = 10,
    widths: Sequence[int] = (8, 16, 32, 64),
    num_blocks: Sequence[int] = (1, 1, 1, 1),
    activation: str = "relu",
) -> ResNet:
    """A ResNet-50-style network of bottleneck blocks (ResNet-50 is widths 64..512, blocks 3,4,6,3)."""
    return ResNet(Bottleneck, num_blocks, widths, in_channels, num_classes, activation)


def cnn_wide(
    in_channels: int = 1, num_classes: int = 10, activation: str = "tanh", dropout: float = 0.0
) -> CNNSmall:
    """CNN-s with 16/12/8 channels: the same layers, about 2.9x the parameters."""
    return CNNSmall(in_channels, num_classes, activation, dropout, channels=(16, 12, 8))


def resnet_small(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: Sequence[int] = (4, 8, 8, 16),
    activation: str = "relu",
) -> ResNet:
    """A ResNet of one basic block per stage (6,406 parameters for 8x8 grayscale, 10 classes)."""
    return ResNet(BasicBlock, (1, 1, 1, 1), widths, in_channels, num_classes, activation)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(
    name: str, factory: Callable[..., nn.Module], overwrite: bool = False
) -> None:
    """Make ``factory(**kwargs) -> nn.Module`` buildable as ``build_model(name, **kwargs)``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"architecture {name!r} is already registered (pass overwrite=True to replace it)"
        )
    _REGISTRY[name] = factory


def list_architectures() -> list[str]:
    """Names accepted by ``build_model``."""
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture by name, e.g. ``build_model("cnn_s", in_channels=1)``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; registered: {list_architectures()}"
        ) from None
    return factory(**kwargs)


register_architecture("cnn_s", CNNSmall)
register_architecture("cnn_m", CNNMedium)
register_architecture("mlp", MLP)
register_architecture("resnet18", resnet18)
register_architecture("resnet_bottleneck", resnet_bottleneck)
register_architecture("cnn_wide", cnn_wide)
register_architecture("resnet_small", resnet_small)


@torch.no_grad()
def initialize(
    model: nn.Module, scheme: str = "default", generator: torch.Generator | None = None
) -> nn.Module:
    """Re-initialize weights of Linear/Conv layers with one of ``INITIALIZATIONS``; biases to zero.

    ``default`` keeps PyTorch's own initialization. ``uniform``/``normal`` follow the Model Zoos
    protocol (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and N(0, 1/sqrt(fan_in))). Normalization layers keep
    weight 1 and bias 0.
    """
    if scheme not in INITIALIZATIONS:
        raise ValueError(f"unknown initialization {scheme!r}; choose one of {INITIALIZATIONS}")
    if scheme == "default":
        return model
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            continue
        weight = module.weight
        fan_in = weight[0].numel()
        if scheme == "uniform":
            bound = 1.0 / math.sqrt(fan_in)
            weight.uniform_(-bound, bound, generator=generator)
        elif scheme == "normal":
            weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        elif scheme == "kaiming_uniform":
            nn.init.kaiming_uniform_(weight, nonlinearity="relu", generator=generator)
        elif scheme == "kaiming_normal":
            nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(weight, generator=generator)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(weight, generator=generator)
        if module.bias is not None:
            module.bias.zero_()
    return model


__all__ = [
    "MLP",
    "BasicBlock",
    "Bottleneck",
    "CNNMedium",
    "CNNSmall",
    "ResNet",
    "build_model",
    "initialize",
    "list_architectures",
    "make_activation",
    "register_architecture",
    "resnet18",
    "resnet_bottleneck",
]
