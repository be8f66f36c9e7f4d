"""Tests for semmix_lib.models: shapes, parameter counts, the registry."""

from __future__ import annotations

import pytest
import torch

from semmix_lib.models import MODELS, build_model, count_parameters


def test_small_cnn_digits_shape():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 8)
    out = model(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_small_cnn_three_channel_32x32():
    torch.manual_seed(0)
    model = build_model("small_cnn", 100, in_channels=3, image_size=32)
    model.eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    # a one-channel model does not accept three channels: the builder really used in_channels
    with pytest.raises(RuntimeError):
        build_model("small_cnn", 10, 1, 32)(torch.randn(2, 3, 32, 32))


def test_small_cnn_parameter_count():
    # width 32, 3x3 convs without bias, BatchNorm = 2 parameters (weight, bias) per channel:
    #   conv 1 -> 32:   1*32*9 =   288   BN 32:  64
    #   conv 32 -> 32: 32*32*9 =  9216   BN 32:  64
    #   conv 32 -> 64: 32*64*9 = 18432   BN 64: 128
    #   conv 64 -> 64: 64*64*9 = 36864   BN 64: 128
    #   linear 64 -> 10: 64*10 + 10 = 650
    # total: 288 + 9216 + 18432 + 36864 + 64 + 64 + 128 + 128 + 650 = 65834
    assert count_parameters(build_model("small_cnn", 10, 1, 8)) == 65834
    # three input channels add 2*32*9 = 576 weights to the first conv
    assert count_parameters(build_model("small_cnn", 10, 3, 32)) == 65834 + 576
    # each extra class adds 64 weights + 1 bias to the head
    assert count_parameters(build_model("small_cnn", 11, 1, 8)) == 65834 + 65


def test_build_model_is_seeded_by_torch():
    torch.manual_seed(3)
    a = build_model("small_cnn", 10, 1, 8)
    torch.manual_seed(3)
    b = build_model("small_cnn", 10, 1, 8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_unknown_model_lists_valid_names():
    assert "small_cnn" in MODELS
    with pytest.raises(ValueError, match="nope") as info:
        build_model("nope", 10)
    for name in MODELS:
        assert name in str(info.value)


def test_too_few_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", 1)


