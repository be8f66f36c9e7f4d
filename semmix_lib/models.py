"""Classifier architectures behind one registry keyed by name (torchvision-style builders).

``build_model(name, num_classes, in_channels, image_size)`` is the one entry point. The paper's
CIFAR / Tiny-ImageNet architectures join this registry with the training stage; for now it holds the
small network the embedded digits study and the CPU tests use.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["MODELS", "register_model", "build_model", "count_parameters", "SmallCNN"]

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
