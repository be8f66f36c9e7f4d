"""Tests for the paper's CIFAR / Tiny-ImageNet architectures in semmix_lib.models.

Parameter counts are checked against numbers derived by hand from the reference layouts (RankMixup's
``calibrate/net`` definitions, the papers' tables) and, where torchvision has the same network with an
ImageNet stem, against torchvision's own builders. Counting builds on the meta device (no memory, no
initialisation cost); forward passes use batches of 2 so the file runs in well under a minute on one thread.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from semmix_lib.models import MODELS, build_model, count_parameters

ARCHITECTURES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet110", "wrn26_10", "densenet121"]


def _count(name: str, num_classes: int, image_size: int = 32, in_channels: int = 3) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(name, num_classes, in_channels, image_size))


# Exact counts for 32x32 inputs, (CIFAR-10, CIFAR-100). Notation: BN(c) = 2c parameters; a linear head
# from f features to k classes has f*k + k. Each 10 -> 100 class step adds 90 * (features + 1).
CIFAR_COUNTS = {
    # ResNet-18/34/50/101 with the CIFAR stem (3x3 conv 3->64 = 1,728 weights, BN, no max-pool): the
    # torchvision ImageNet ResNets (11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 for 1000 classes)
    # with the 7x7 stem (9,408 weights) replaced by the 3x3 one (-7,680) and the 1000-class head
    # (513,000 for 512 features, 2,049,000 for 2048) replaced by a 10-class one (5,130 / 20,490).
    # 11,173,962 and 23,520,842 are also the usual "ResNet18 11.2M / ResNet50 23.5M" CIFAR counts.
    "resnet18": (11_173_962, 11_220_132),
    "resnet34": (21_282_122, 21_328_292),
    "resnet50": (23_520_842, 23_705_252),
    "resnet101": (42_512_970, 42_697_380),
    # ResNet-110 of He et al. 2016 (their Table 6: 1.7M), 18 basic blocks per stage, widths 16-32-64,
    # identity / zero-padding shortcuts ("option A": the paper uses it on CIFAR "so our residual models
    # have exactly the same ... number of parameters as the plain counterparts"):
    #   stem 432 + 32; stage 1: 18 * (2*2,304 + 64) = 84,096;
    #   stage 2: (4,608 + 9,216 + 128) + 17 * (2*9,216 + 128) = 329,472;
    #   stage 3: (18,432 + 36,864 + 256) + 17 * (2*36,864 + 256) = 1,313,280; head 64*10 + 10 = 650
    #   -> 1,727,962. (1,730,714, another figure in circulation, is the same net with 1x1 conv + BN
    #   projections where the shape changes: + 512 + 64 + 2,048 + 128 = 2,752.)
    "resnet110": (1_727_962, 1_733_812),
    # Wide-ResNet-26-10 as RankMixup builds it: conv-BN-ReLU stem (16 ch), 4 post-activation basic
    # blocks per stage (widths 160-320-640), 1x1 conv + BN projection in each stage's first block:
    #   stem 432 + 32; stage 1: (23,040 + 230,400 + 2,560 + 3*320) + 3 * (2*230,400 + 640) = 1,641,280;
    #   stage 2: (460,800 + 921,600 + 51,200 + 3*640) + 3 * (2*921,600 + 1,280) = 6,968,960;
    #   stage 3: (1,843,200 + 3,686,400 + 204,800 + 3*1,280) + 3 * (2*3,686,400 + 2,560) = 27,864,320;
    #   head 640*10 + 10 = 6,410 -> 36,481,434.
    # Zagoruyko & Komodakis' pre-activation WRN-28-10 (the same 4 blocks per stage; they count the 1x1
    # shortcuts in the depth) has 36,479,194 ("36.5M"): its BNs sit before the convs (17,952 BN
    # parameters instead of 20,192, no BN on shortcuts, one final BN), 2,240 fewer.
    "wrn26_10": (36_481_434, 36_539_124),
    # DenseNet-121 (BC), growth 32, 4x bottlenecks, compression 0.5, CIFAR stem 3x3 conv 3->64 (1,728,
    # no BN). A dense layer with c inputs has 2c + 128c + 256 + 36,864 = 130c + 37,120 parameters:
    #   block 1 (c = 64..224): 335,040 -> 256 ch, transition 512 + 32,768 -> 128 ch;
    #   block 2 (c = 128..480): 919,680 -> 512 ch, transition 1,024 + 131,072 -> 256 ch;
    #   block 3 (c = 256..992): 2,837,760 -> 1024 ch, transition 2,048 + 524,288 -> 512 ch;
    #   block 4 (c = 512..992): 2,158,080 -> 1024 ch; final BN 2,048; head 10,250 -> 6,956,298.
    # torchvision's densenet121 (7,978,856 for 1000 classes) minus its 7x7 stem + BN (9,536) and
    # 1000-class head (1,025,000), plus the 3x3 stem and the 10-class head, gives the same.
    "densenet121": (6_956_298, 7_048_548),
}

# Features entering the linear head; for image_size >= 64 RankMixup's Tiny-ImageNet ResNets and
# Wide-ResNets pool to 2x2 instead of 1x1, so their head sees 4x the features.
HEAD_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
                 "resnet110": 64, "wrn26_10": 640, "densenet121": 1024}
TINY_HEAD_GRID = {"resnet18": 2, "resnet34": 2, "resnet50": 2, "resnet101": 2, "wrn26_10": 2,
                  "resnet110": 1, "densenet121": 1}


def test_all_architectures_registered():
    assert set(ARCHITECTURES) <= set(MODELS)
    assert "small_cnn" in MODELS


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cifar_parameter_counts(name):
    c10, c100 = CIFAR_COUNTS[name]
    assert _count(name, 10) == c10
    assert _count(name, 100) == c100
    # the 10 -> 100 class difference is exactly 90 rows of the head
    assert c100 - c10 == 90 * (HEAD_FEATURES[name] + 1)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tiny_imagenet_parameter_counts(name):
    grid = TINY_HEAD_GRID[name]
    features = HEAD_FEATURES[name]
    for k in (10, 200):
        head_32 = features * k + k
        head_64 = features * grid * grid * k + k
        assert _count(name, k, image_size=64) == _count(name, k, image_size=32) - head_32 + head_64
    # e.g. Tiny-ImageNet ResNet-50: 23,520,842 - 20,490 + (8,192 * 200 + 200) = 25,138,952
    if name == "resnet50":
        assert _count(name, 200, image_size=64) == 25_138_952


@pytest.mark.parametrize("name, tv_name", [("resnet18", "resnet18"), ("resnet34", "resnet34"),
                                           ("resnet50", "resnet50"), ("resnet101", "resnet101"),
                                           ("densenet121", "densenet121")])
def test_counts_match_torchvision_with_cifar_stem(name, tv_name):
    with torch.device("meta"):
        tv = count_parameters(getattr(torchvision.models, tv_name)(num_classes=10))
    imagenet_stem = 3 * 64 * 7 * 7 + (2 * 64 if name.startswith("densenet") else 0)  # DenseNet: + stem BN
    cifar_stem = 3 * 64 * 3 * 3
    assert _count(name, 10) == tv - imagenet_stem + cifar_stem


def _depth(model: nn.Module) -> tuple[int, int]:
    """(number of 3x3 / 1x1 convs on the main path + linear layers, number of shortcut 1x1 convs)."""
    shortcut = sum(1 for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" in n)
    weighted = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return weighted - shortcut, shortcut


@pytest.mark.parametrize("name, depth, shortcuts", [
    ("resnet18", 18, 3), ("resnet34", 34, 3), ("resnet50", 50, 4), ("resnet101", 101, 4),
    ("resnet110", 110, 0),   # option A: no projection convs
    ("wrn26_10", 26, 3),     # 1 + 3 * 4 * 2 + 1; Zagoruyko's count adds the 3 shortcuts: 28
    ("densenet121", 121, 0),  # 1 + 58 * 2 + 3 transitions + 1
])
def test_depth_matches_name(name, depth, shortcuts):
    with torch.device("meta"):
        assert _depth(build_model(name, 10)) == (depth, shortcuts)


def test_cifar_stem_is_3x3_stride_1_without_max_pool():
    with torch.device("meta"):
        for name in ARCHITECTURES:
            model = build_model(name, 10, in_channels=1)
            first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
            assert first.kernel_size == (3, 3) and first.stride == (1, 1) and first.in_channels == 1, name
            assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules()), name


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_output_shapes_32_and_64(name):
    torch.manual_seed(0)
    cifar = build_model(name, 10, 3, 32).eval()
    tiny = build_model(name, 200, 3, 64).eval()
    with torch.no_grad():
        out32 = cifar(torch.randn(2, 3, 32, 32))
        out64 = tiny(torch.randn(2, 3, 64, 64))
        # the CIFAR build also accepts 64x64 inputs (its head pools globally)
        out_cross = cifar(torch.randn(2, 3, 64, 64))
    assert out32.shape == (2, 10) and out_cross.shape == (2, 10)
    assert out64.shape == (2, 200)
    assert torch.isfinite(out32).all() and torch.isfinite(out64).all() and torch.isfinite(out_cross).all()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_training_step_updates_weights(name):
    torch.manual_seed(0)
    model = build_model(name, 10, 3, 32).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert "conv1.weight" in changed and any(n.startswith("fc.") for n in changed)
    assert len(changed) == len(before)  # every parameter receives a gradient
    assert torch.isfinite(F.cross_entropy(model(x), y))


def test_reference_initialisation():
    torch.manual_seed(0)
    # kaiming normal, fan-out: std sqrt(2 / (9 * out_channels)); BN weight 1, bias 0
    # (RankMixup's Wide-ResNet, its Tiny-ImageNet ResNet, and He et al.'s ResNet-110)
    for name, image_size in [("wrn26_10", 32), ("resnet18", 64), ("resnet110", 32)]:
        model = build_model(name, 10, 3, image_size)
        conv = model.layer3[1].conv2
        expected = math.sqrt(2.0 / (9 * conv.out_channels))
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.05), name
        assert conv.weight.mean().abs().item() < 0.1 * expected, name
        bn = model.layer3[1].bn2
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0), name
    # RankMixup's CIFAR ResNet keeps PyTorch's default conv init (kaiming uniform, a=sqrt(5)):
    # uniform on +-1/sqrt(fan_in), std 1/sqrt(3 * fan_in)
    conv = build_model("resnet18", 10, 3, 32).layer3[1].conv2
    fan_in = 9 * conv.in_channels
    assert conv.weight.abs().max().item() <= 1 / math.sqrt(fan_in) + 1e-6
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)


def test_resnet110_shortcut_is_parameter_free_and_keeps_input():
    model = build_model("resnet110", 10)
    block = model.layer2[0]  # 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    # the input channels pass through (subsampled), the 16 new ones are zeros
    kept = [c for c in range(32) if s[:, c].abs().sum() > 0]
    assert len(kept) == 16
    assert torch.equal(s[:, kept], x[:, :, ::2, ::2])


def test_unknown_model_lists_all_names():
    with pytest.raises(ValueError, match="nope") as info:
        build_model("nope", 10)
    for name in MODELS:
        assert repr(name) in str(info.value)
    for name in ARCHITECTURES:
        assert name in str(info.value)
