"""Training losses behind one registry keyed by method name.

Each entry builds an ``nn.Module`` mapping ``(logits, targets) -> scalar loss``. The training stage
adds CSM's loss and the paper's baselines (PAPER.md section 3) to this registry.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["LOSSES", "register_loss", "build_loss"]

LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str):
    """Decorator adding a builder ``fn(**settings) -> nn.Module``."""
    def wrap(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn
    return wrap


def build_loss(name: str, **settings) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**settings)


@register_loss("ce")
def cross_entropy() -> nn.Module:
    """Plain cross-entropy on one-hot labels, the baseline every method is compared with."""
    return nn.CrossEntropyLoss()
