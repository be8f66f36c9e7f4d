"""Classifier architectures behind one registry keyed by name (torchvision-style builders).

``build_model(name, num_classes, in_channels, image_size)`` is the one entry point. Besides the small
network the embedded digits study and the CPU tests use, the registry holds the paper's CIFAR /
Tiny-ImageNet architectures, laid out as in the RankMixup code the CSM code forks (itself from the
focal-calibration code of Mukhoti et al., 2020):

* ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``: ResNets with a 3x3 stride-1 stem and
  no max-pool, widths 64-128-256-512. For ``image_size >= 64`` (Tiny-ImageNet) the head average-pools
  to 2x2 instead of 1x1 and the linear layer sees 4x the features, as RankMixup's Tiny variant.
* ``resnet110``: the CIFAR ResNet of He et al. (2016): 3 stages of 18 basic blocks, widths 16-32-64,
  parameter-free (option A) shortcuts.
* ``wrn26_10``: RankMixup's Wide-ResNet-26-10 (4 basic blocks per stage, widths 160-320-640,
  conv-BN-ReLU blocks with 1x1 conv + BN projection shortcuts, no dropout). Tiny variant as ResNet's.
* ``densenet121``: DenseNet-BC-121 for CIFAR (growth 32, blocks 6-12-24-16, compression 0.5).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODELS", "register_model", "build_model", "count_parameters", "SmallCNN",
    "BasicBlock", "Bottleneck", "ResNet", "CifarBasicBlock", "CifarResNet", "WideResNet",
    "DenseLayer", "Transition", "DenseNet",
]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator adding a builder ``fn(num_classes, in_channels, image_size) -> nn.Module``."""
    def wrap(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn
    return wrap


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a registered architecture; an unknown name lists the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers, one 2x max-pool, global average pooling, a linear head.

    With ``width=32`` it has about 65k parameters: large enough to overfit the 8x8 digits and be
    overconfident, small enough to train in seconds on a CPU.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width), _conv_bn_relu(width, width), nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width), _conv_bn_relu(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


@register_model("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, image_size: int = 8) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width=32)


# ------------------------------------------------------------------------------------------------
# The paper's architectures. Layouts follow the RankMixup network definitions (a fork of the
# focal-calibration code of Mukhoti et al., 2020); the code is written afresh, torchvision style.

TINY_IMAGE_SIZE = 64
"""From this input size on, ResNets and Wide-ResNets use RankMixup's Tiny-ImageNet head."""


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """1x1 conv + BN shortcut where the shape changes, identity otherwise (He et al.'s option B)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


def _kaiming_fan_out_init(model: nn.Module) -> None:
    """Convs ~ N(0, 2 / (k*k*out_channels)), BN weight 1 and bias 0; linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _head_grid(image_size: int) -> int:
    """Side of the pooled feature grid the linear head sees: 1 for CIFAR, 2 for Tiny-ImageNet."""
    return 2 if image_size >= TINY_IMAGE_SIZE else 1


# --- ResNet-18/34/50/101 (CIFAR stem) ---------------------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers, ReLU after the residual sum (post-activation)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout_rate: float = 0.0):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.dropout(out)))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4; ReLU after the residual sum."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with the CIFAR stem: a 3x3 stride-1 conv-BN-ReLU and no max-pool, then four stages of
    widths 64-128-256-512 (strides 1, 2, 2, 2), average pooling to ``head_grid`` x ``head_grid``, linear.

    ``head_grid=1`` is RankMixup's CIFAR ResNet (PyTorch's default initialisation); ``head_grid=2`` is
    its Tiny-ImageNet ResNet (kaiming-normal fan-out convs), whose linear layer sees 4x the features.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int, in_channels: int = 3, head_grid: int = 1, kaiming_init: bool = False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(head_grid)
        self.fc = nn.Linear(512 * block.expansion * head_grid * head_grid, num_classes)
        if kaiming_init:
            _kaiming_fan_out_init(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block, layers, num_classes: int, in_channels: int, image_size: int) -> ResNet:
    tiny = image_size >= TINY_IMAGE_SIZE
    return ResNet(block, layers, num_classes, in_channels, head_grid=_head_grid(image_size), kaiming_init=tiny)


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2]."""
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, image_size)


@register_model("resnet34")
def resnet34(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet-34: basic blocks [3, 4, 6, 3]."""
    return _resnet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, image_size)


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet-50: bottleneck blocks [3, 4, 6, 3] (the CSM paper's main network)."""
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, image_size)


@register_model("resnet101")
def resnet101(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet-101: bottleneck blocks [3, 4, 23, 3]."""
    return _resnet(Bottleneck, (3, 4, 23, 3), num_classes, in_channels, image_size)


# --- ResNet-110 (He et al. 2016, CIFAR) -----------------------------------------------------

class _ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut (He et al.'s option A): subsample by ``stride``, zero-pad new channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_front = (out_planes - in_planes) // 2
        self.pad_back = out_planes - in_planes - self.pad_front

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class CifarBasicBlock(nn.Module):
    """He et al.'s CIFAR basic block: two 3x3 conv-BN layers, option-A shortcut, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = _ZeroPadShortcut(in_planes, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet of He et al. (2016): 3x3 conv-BN-ReLU stem with 16 channels,
    three stages of n basic blocks with widths 16-32-64 (strides 1, 2, 2), global average pool, linear.
    Shortcuts are parameter-free, so it has exactly the parameters of its plain counterpart."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.in_planes = widths[0]
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], n, stride=1)
        self.layer2 = self._make_layer(widths[1], n, stride=2)
        self.layer3 = self._make_layer(widths[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        _kaiming_fan_out_init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet110")
def resnet110(num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
    """ResNet-110 of He et al. (2016): 3 stages of 18 basic blocks, widths 16-32-64.

    Fully convolutional up to a global average pool, so a 64x64 input only grows the last feature map
    (16x16 instead of 8x8); the parameters do not depend on ``image_size``.
    """
    return CifarResNet(110, num_classes, in_channels)


# --- Wide-ResNet-26-10 -------------------------------------------------------------------------

class WideResNet(nn.Module):
    """RankMixup's Wide-ResNet: a 3x3 conv-BN-ReLU stem with 16 channels, three stages of
    ``(depth - 2) / 6`` post-activation basic blocks of widths 16k-32k-64k (strides 1, 2, 2) whose first
    block has a 1x1 conv + BN projection, average pooling to ``head_grid`` x ``head_grid``, linear.

    Depth counts the stem, the 3x3 convs and the head, not the three 1x1 shortcut convs: with four
    blocks per stage it is "26" here and "28" in Zagoruyko & Komodakis' count. RankMixup uses no dropout
    (``dropout_rate=0``); its CIFAR and Tiny-ImageNet variants both use kaiming-normal fan-out convs.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
                 head_grid: int = 1, dropout_rate: float = 0.0):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.in_planes = 16
        self.conv1 = _conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], n, 1, dropout_rate)
        self.layer2 = self._make_layer(widths[1], n, 2, dropout_rate)
        self.layer3 = self._make_layer(widths[2], n, 2, dropout_rate)
        self.avgpool = nn.AdaptiveAvgPool2d(head_grid)
        self.fc = nn.Linear(widths[2] * head_grid * head_grid, num_classes)
        _kaiming_fan_out_init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int, dropout_rate: float) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, dropout_rate))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("wrn26_10")
def wrn26_10(num_classes: int, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """Wide-ResNet-26-10 as in RankMixup: 4 blocks per stage, widths 160-320-640, no dropout."""
    return WideResNet(26, 10, num_classes, in_channels, head_grid=_head_grid(image_size))


# --- DenseNet-121 (CIFAR stem) ----------------------------------------------------------------

class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to ``bn_size * growth_rate`` channels, BN-ReLU-3x3 conv to ``growth_rate``
    channels; the output is the input with the new features appended."""

    def __init__(self, in_planes: int, growth_rate: int, bn_size: int = 4):
        super().__init__()
        inner = bn_size * growth_rate
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv1x1(in_planes, inner)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = _conv3x3(inner, growth_rate)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv, then a 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = _conv1x1(in_planes, out_planes)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(F.relu(self.bn(x))))


class DenseNet(nn.Module):
    """DenseNet-BC with the CIFAR stem of RankMixup: one 3x3 stride-1 conv to ``2 * growth_rate``
    channels (no BN, no pooling), dense blocks joined by transitions that keep ``floor(compression * C)``
    channels, then BN-ReLU, global average pool and a linear layer. PyTorch's default initialisation,
    as the reference. RankMixup's Tiny-ImageNet DenseNet only pools an 8x8 instead of a 4x4 final map,
    which the global pool does for any input size; the parameters are the same.
    """

    def __init__(self, block_config: tuple[int, ...], growth_rate: int, num_classes: int, in_channels: int = 3,
                 compression: float = 0.5, bn_size: int = 4):
        super().__init__()
        planes = 2 * growth_rate
        self.conv1 = _conv3x3(in_channels, planes)
        stages: list[nn.Module] = []
        for i, n_layers in enumerate(block_config):
            layers = []
            for _ in range(n_layers):
                layers.append(DenseLayer(planes, growth_rate, bn_size))
                planes += growth_rate
            stages.append(nn.Sequential(*layers))
            if i < len(block_config) - 1:
                out_planes = int(math.floor(planes * compression))
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.features(self.conv1(x))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("densenet121")
def densenet121(num_classes: int, in_channels: int = 3, image_size: int = 32) -> DenseNet:
    """DenseNet-121 (BC): growth rate 32, blocks [6, 12, 24, 16], compression 0.5, 4x bottlenecks."""
    return DenseNet((6, 12, 24, 16), 32, num_classes, in_channels)
