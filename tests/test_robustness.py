"""Tests for semmix_lib.robustness: corruptions, CorruptedDataset, CIFAR-10-C files, evaluation, plot.

Everything runs on the embedded digits or on tiny synthetic arrays, in a few seconds on one CPU thread.
"""

from __future__ import annotations

import colorsys
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import semmix_lib.robustness as R
from semmix_lib.data import CIFAR_MEAN, CIFAR_STD, ArrayDataset, DataSplits, DatasetNotFoundError, load_dataset
from semmix_lib.io import save_checkpoint
from semmix_lib.metrics import calibration_report
from semmix_lib.models import build_model
from semmix_lib.robustness import (
    CORRUPTIONS, CorruptedDataset, blur_sigma, cifar_c_available, corrupt, evaluate_corruptions,
    load_cifar_c, pixelate_side, plot_corruptions,
)
from semmix_lib.train import load_trained_model, predict


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def clean(digits):
    return torch.stack([digits.test[i][0] for i in range(len(digits.test))])


def _rgb_set(n: int = 12, seed: int = 3) -> ArrayDataset:
    """Smooth random 32x32 RGB uint8 images (gradients + blobs + a little texture), CIFAR-normalised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 1, 3), rng.uniform(-0.5, 0.5, 3), rng.uniform(-0.5, 0.5, 3)
        img = a + b * yy[..., None] + c * xx[..., None] + 0.1 * rng.standard_normal((32, 32, 3))
        images.append(np.clip(img, 0, 1) * 255)
    from torchvision import transforms as T

    return ArrayDataset(np.array(images).astype(np.uint8), np.arange(n) % 10,
                        T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]))


def _unit(images: torch.Tensor, mean, std) -> torch.Tensor:
    c = images.shape[1]
    mu = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1).expand(c, 1, 1)
    sd = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1).expand(c, 1, 1)
    return images.double() * sd + mu


# ----------------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------------


def test_parameter_table():
    assert [blur_sigma(s, 32) for s in range(1, 6)] == pytest.approx([0.4, 0.6, 0.7, 0.8, 1.0])
    assert [blur_sigma(s, 8) for s in range(1, 6)] == pytest.approx([0.4, 0.6, 0.7, 0.8, 1.0])
    assert [blur_sigma(s, 64) for s in range(1, 6)] == pytest.approx([0.8, 1.2, 1.4, 1.6, 2.0])
    assert [pixelate_side(s, 32) for s in range(1, 6)] == [30, 28, 27, 24, 20]  # CIFAR-10-C's sides
    assert [pixelate_side(s, 8) for s in range(1, 6)] == [7, 6, 5, 4, 3]
    assert R.PARAMETERS["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert set(CORRUPTIONS) <= set(R.CIFAR_C_CORRUPTIONS)  # every one has an official counterpart


def test_unknown_corruption_and_bad_severity(digits):
    with pytest.raises(ValueError, match="unknown corruption 'fog'.*gaussian_noise"):
        CorruptedDataset(digits.test, "fog", 1, digits.mean, digits.std)
    for bad in (6, -1, 1.5):
        with pytest.raises(ValueError, match="severity"):
            CorruptedDataset(digits.test, "contrast", bad, digits.mean, digits.std)
    with pytest.raises(ValueError, match="rng"):
        corrupt(np.zeros((1, 1, 8, 8)), "gaussian_noise", 1)


# ----------------------------------------------------------------------------------------------
# CorruptedDataset
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_severity_zero_is_identity(digits, clean, corruption):
    ds = CorruptedDataset(digits.test, corruption, 0, digits.mean, digits.std)
    assert torch.equal(ds.images, clean)
    assert ds.targets == list(digits.test.targets)


def test_normalisation_round_trip_is_exact(digits, clean, monkeypatch):
    # a contrast factor of 1 changes nothing: un-normalise, clip, quantise, re-normalise must be lossless
    monkeypatch.setitem(R.PARAMETERS, "contrast", (1.0,) * 5)
    ds = CorruptedDataset(digits.test, "contrast", 3, digits.mean, digits.std)
    assert torch.allclose(ds.images, clean, atol=1e-6)
    rgb = _rgb_set()
    base = torch.stack([rgb[i][0] for i in range(len(rgb))])
    assert torch.allclose(CorruptedDataset(rgb, "contrast", 3, CIFAR_MEAN, CIFAR_STD).images, base, atol=1e-5)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_change_grows_with_severity(digits, clean, corruption):
    rgb = _rgb_set()
    rgb_clean = torch.stack([rgb[i][0] for i in range(len(rgb))])
    for data, base, mean, std in ((digits.test, clean, digits.mean, digits.std), (rgb, rgb_clean, CIFAR_MEAN, CIFAR_STD)):
        change = [float((_unit(CorruptedDataset(data, corruption, s, mean, std).images, mean, std)
                         - _unit(base, mean, std)).abs().mean()) for s in range(6)]
        assert change[0] == 0.0
        assert all(b > a for a, b in zip(change, change[1:])), (corruption, change)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_clipped_quantised_labels_kept(digits, corruption):
    ds = CorruptedDataset(digits.test, corruption, 5, digits.mean, digits.std)
    assert len(ds) == len(digits.test) and ds.targets == list(digits.test.targets)
    image, label = ds[7]
    assert label == digits.test.targets[7] and image.shape == (1, 8, 8) and image.dtype == torch.float32
    low, high = (0 - 0.5) / 0.5, (1 - 0.5) / 0.5
    assert ds.images.min() >= low - 1e-6 and ds.images.max() <= high + 1e-6
    levels = _unit(ds.images, digits.mean, digits.std) * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # 8-bit images, like the clean ones
    rgb = CorruptedDataset(_rgb_set(), corruption, 5, CIFAR_MEAN, CIFAR_STD)
    for ch in range(3):
        lo, hi = -CIFAR_MEAN[ch] / CIFAR_STD[ch], (1 - CIFAR_MEAN[ch]) / CIFAR_STD[ch]
        assert rgb.images[:, ch].min() >= lo - 1e-5 and rgb.images[:, ch].max() <= hi + 1e-5


def test_brightness_reaches_the_clip(digits):
    ds = CorruptedDataset(digits.test, "brightness", 5, digits.mean, digits.std)
    assert ds.images.max().item() == pytest.approx(1.0)  # white strokes + 0.3 are clipped at 1


def test_seeded_and_deterministic(digits):
    args = (digits.test, "gaussian_noise", 3, digits.mean, digits.std)
    a, b = CorruptedDataset(*args, seed=5), CorruptedDataset(*args, seed=5)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, CorruptedDataset(*args, seed=6).images)
    # one generator per (corruption, severity): other severities or corruptions draw other noise
    other = CorruptedDataset(digits.test, "gaussian_noise", 4, digits.mean, digits.std, seed=5)
    assert not torch.equal(a.images, other.images)
    # on a grey image (no clipping) the standardised draws of severities 3 and 4 are independent
    grey = ArrayDataset(torch.zeros(40, 1, 16, 16), np.zeros(40, dtype=int))
    draws = [((_unit(CorruptedDataset(grey, "gaussian_noise", s, (0.5,), (0.5,), seed=5).images, (0.5,), (0.5,))
               - 0.5) / R.PARAMETERS["gaussian_noise"][s - 1]).flatten() for s in (3, 4)]
    assert abs(float(torch.corrcoef(torch.stack(draws))[0, 1])) < 0.1
    shot_a = CorruptedDataset(digits.test, "shot_noise", 2, digits.mean, digits.std, seed=1)
    shot_b = CorruptedDataset(digits.test, "shot_noise", 2, digits.mean, digits.std, seed=1)
    assert torch.equal(shot_a.images, shot_b.images)
    # deterministic corruptions ignore the seed
    blur = [CorruptedDataset(digits.test, "gaussian_blur", 2, digits.mean, digits.std, seed=s).images for s in (0, 9)]
    assert torch.equal(*blur)


# ----------------------------------------------------------------------------------------------
# single corruptions against hand-computed values
# ----------------------------------------------------------------------------------------------


def test_gaussian_and_shot_noise_statistics():
    grey = np.full((200, 1, 16, 16), 0.5)
    rng = np.random.default_rng(0)
    diff = corrupt(grey, "gaussian_noise", 5, rng, quantize=False) - grey
    assert diff.std() == pytest.approx(0.10, rel=0.03) and abs(diff.mean()) < 0.002
    shot = corrupt(grey, "shot_noise", 5, rng, quantize=False)  # Poisson(25) / 50
    assert shot.mean() == pytest.approx(0.5, abs=0.003)
    assert shot.std() == pytest.approx(np.sqrt(0.5 * 50) / 50, rel=0.03)


def test_contrast_and_brightness_by_hand():
    x = np.array([0.2, 0.4, 0.6, 0.8]).reshape(1, 1, 2, 2)
    out = corrupt(x, "contrast", 2, quantize=False)  # c = 0.5 around the mean 0.5
    assert out.ravel() == pytest.approx([0.35, 0.45, 0.55, 0.65])
    assert corrupt(x, "brightness", 5, quantize=False).ravel() == pytest.approx([0.5, 0.7, 0.9, 1.0])
    # the mean is per image and channel: flat colour channels are left alone
    flat = np.stack([np.full((2, 2), v) for v in (0.1, 0.5, 0.9)])[None]
    assert corrupt(flat, "contrast", 5, quantize=False) == pytest.approx(flat)
    # RGB: V += c with hue and saturation kept; black becomes grey (c, c, c)
    pixels = np.array([[0.2, 0.4, 0.1], [0.9, 0.5, 0.3], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    img = pixels.T.reshape(1, 3, 2, 2)
    out = corrupt(img, "brightness", 3, quantize=False).reshape(3, 4).T  # c = 0.15
    for before, after in zip(pixels, out):
        h, s, v = colorsys.rgb_to_hsv(*before)
        assert after == pytest.approx(colorsys.hsv_to_rgb(h, s, min(v + 0.15, 1.0)))
    assert out[2] == pytest.approx([0.15, 0.15, 0.15])


def test_blur_kernel_by_hand():
    delta = np.zeros((1, 1, 32, 32))
    delta[0, 0, 16, 16] = 1.0
    out = corrupt(delta, "gaussian_blur", 5, quantize=False)  # sigma 1.0, truncated at 4 sigma
    k = np.arange(-4, 5)
    w = np.exp(-k ** 2 / 2.0)
    w /= w.sum()
    assert out[0, 0, 16, 16] == pytest.approx(w[4] ** 2)
    assert out[0, 0, 16, 17] == pytest.approx(w[4] * w[5])
    assert out.sum() == pytest.approx(1.0)


def test_pixelate_matches_pil_box_resize():
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (32, 32)).astype(np.float32)
    out = corrupt(img[None, None].astype(np.float64), "pixelate", 4, quantize=False)[0, 0]
    pil = Image.fromarray(img).resize((24, 24), Image.Resampling.BOX).resize((32, 32), Image.Resampling.BOX)
    assert out == pytest.approx(np.asarray(pil), abs=1e-5)
    small = corrupt(np.ones((1, 1, 8, 8)) * 0.3, "pixelate", 5, quantize=False)
    assert small == pytest.approx(0.3)  # a constant image stays constant


# ----------------------------------------------------------------------------------------------
# evaluation and plot
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_model(digits):
    """Multinomial logistic regression on the digits, trained full-batch for a moment."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.stack([digits.train_plain[i][0] for i in range(len(digits.train_plain))])
    y = torch.tensor(digits.train_plain.targets)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_evaluate_corruptions_table(digits, linear_model):
    t = 1.7
    table = evaluate_corruptions(linear_model, digits, corruptions=["contrast", "gaussian_blur"],
                                 severities=(1, 3, 5), temperature=t)
    assert list(table.columns) == ["corruption", "severity", "source", "n", "acc", "ece", "nll", "adaece",
                                   "ece_ts", "nll_ts", "adaece_ts"]
    assert list(zip(table.corruption, table.severity)) == [
        (c, s) for c in ("contrast", "gaussian_blur") for s in (0, 1, 3, 5)]
    logits, labels = predict(linear_model, digits.test)
    report = calibration_report(logits, labels)
    report_ts = calibration_report(logits / t, labels)
    for _, row in table[table.severity == 0].iterrows():
        assert row.source == "clean" and row.n == len(digits.test)
        assert row.acc == pytest.approx(report["acc"]) and row.ece == pytest.approx(report["ece"])
        assert row.nll == pytest.approx(report["nll"]) and row.adaece == pytest.approx(report["adaece"])
        assert row.ece_ts == pytest.approx(report_ts["ece"]) and row.nll_ts == pytest.approx(report_ts["nll"])
    assert report["acc"] > 0.85
    # a corrupted row is the metrics of the corrupted set
    ds = CorruptedDataset(digits.test, "contrast", 3, digits.mean, digits.std, seed=0)
    expected = calibration_report(*predict(linear_model, ds))
    row = table[(table.corruption == "contrast") & (table.severity == 3)].iloc[0]
    assert row.source == "ours" and row.acc == pytest.approx(expected["acc"]) and row.ece == pytest.approx(expected["ece"])
    contrast = table[table.corruption == "contrast"].set_index("severity")
    assert contrast.acc[5] < contrast.acc[0] - 0.2  # grey backgrounds break a linear digits model
    plain = evaluate_corruptions(linear_model, digits, corruptions=["brightness"], severities=(2,))
    assert "ece_ts" not in plain.columns and len(plain) == 2


def test_plot_corruptions(digits, linear_model):
    table = evaluate_corruptions(linear_model, digits, corruptions=["contrast", "brightness"], severities=(1, 2))
    worse = table.assign(ece=table.ece + 0.1)
    fig = plot_corruptions({"ce": table, "csm": worse})
    acc_ax, ece_ax = fig.axes[:2]
    assert [line.get_label() for line in ece_ax.get_lines()] == ["ce", "csm"]
    mean = table.groupby("severity")[["acc", "ece"]].mean()
    assert np.asarray(acc_ax.get_lines()[0].get_ydata()) == pytest.approx(100 * mean.acc.values)
    assert np.asarray(ece_ax.get_lines()[1].get_ydata()) == pytest.approx(100 * (mean.ece.values + 0.1))
    assert list(ece_ax.get_lines()[0].get_xdata()) == [0, 1, 2]
    with pytest.raises(ValueError, match="no column 'ece_ts'"):
        plot_corruptions({"ce": table}, metric="ece_ts")
    matplotlib.pyplot.close("all")


def test_load_trained_model_from_a_run_folder(tmp_path, digits):
    torch.manual_seed(4)
    model = build_model("small_cnn", 10, in_channels=1, image_size=8)
    save_checkpoint(tmp_path / "checkpoint.pt", model.state_dict())
    (tmp_path / "config.json").write_text(json.dumps({"model": "small_cnn"}))
    (tmp_path / "metrics.json").write_text(json.dumps({"temperature": 1.3}))
    loaded, temperature = load_trained_model(tmp_path, digits)
    assert temperature == 1.3 and not loaded.training
    x = digits.test[0][0][None]
    assert torch.allclose(loaded(x), model.eval()(x))


# ----------------------------------------------------------------------------------------------
# CIFAR-10-C files
# ----------------------------------------------------------------------------------------------

PER_SEVERITY = 4


def _write_cifar_c(root, folder: str = "CIFAR-10-C", corruption: str = "gaussian_noise"):
    """5 severities x 4 images; image i is constant (5 i + 3); labels differ by block to test the slice."""
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    n = 5 * PER_SEVERITY
    images = np.broadcast_to((5 * np.arange(n) + 3).astype(np.uint8)[:, None, None, None], (n, 32, 32, 3))
    np.save(path / f"{corruption}.npy", np.ascontiguousarray(images))
    np.save(path / "labels.npy", (np.arange(n) * 3 % 10).astype(np.uint8))
    return path


def test_load_cifar_c_slices_severity(tmp_path):
    _write_cifar_c(tmp_path)
    assert cifar_c_available(tmp_path, "cifar10") and cifar_c_available(tmp_path, "cifar10", "gaussian_noise")
    assert not cifar_c_available(tmp_path, "cifar10", "fog") and not cifar_c_available(tmp_path, "cifar100")
    for severity in (1, 3, 5):
        ds = load_cifar_c(tmp_path, "cifar10", "gaussian_noise", severity, CIFAR_MEAN, CIFAR_STD)
        first = (severity - 1) * PER_SEVERITY
        assert len(ds) == PER_SEVERITY
        assert ds.targets == [(i * 3) % 10 for i in range(first, first + PER_SEVERITY)]
        image, label = ds[2]
        assert image.shape == (3, 32, 32) and label == ((first + 2) * 3) % 10
        value = (5 * (first + 2) + 3) / 255.0
        for ch in range(3):
            assert image[ch, 4, 9].item() == pytest.approx((value - CIFAR_MEAN[ch]) / CIFAR_STD[ch], abs=1e-5)


def test_cifar_c_missing_and_invalid(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar_c(tmp_path, "cifar10", "gaussian_noise", 1)
    message = str(info.value)
    assert str(tmp_path / "CIFAR-10-C") in message and "CIFAR-10-C.tar" in message and "zenodo" in message
    assert "labels.npy" in message
    with pytest.raises(DatasetNotFoundError, match="CIFAR-100-C.tar"):
        load_cifar_c(tmp_path, "cifar100", "gaussian_noise", 1)
    _write_cifar_c(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="fog.npy"):
        load_cifar_c(tmp_path, "cifar10", "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        load_cifar_c(tmp_path, "cifar10", "gaussian_noise", 0)
    with pytest.raises(ValueError, match="cifar10"):
        load_cifar_c(tmp_path, "digits", "gaussian_noise", 1)
    with pytest.raises(DatasetNotFoundError, match="data_root"):
        load_cifar_c(None, "cifar10", "gaussian_noise", 1)
    # a pickled (object) array is refused, never unpickled
    np.save(tmp_path / "CIFAR-10-C" / "shot_noise.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="shot_noise.npy: not a plain numeric"):
        load_cifar_c(tmp_path, "cifar10", "shot_noise", 1)
    np.save(tmp_path / "CIFAR-10-C" / "contrast.npy", np.zeros((20, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        load_cifar_c(tmp_path, "cifar10", "contrast", 1)


def test_evaluate_corruptions_from_files(tmp_path):
    _write_cifar_c(tmp_path)
    test = _rgb_set(6)
    splits = DataSplits(name="cifar10", train=test, train_plain=test, val=test, test=test, num_classes=10,
                        class_names=[str(i) for i in range(10)], image_shape=(3, 32, 32), mean=CIFAR_MEAN,
                        std=CIFAR_STD, fingerprint="x")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    table = evaluate_corruptions(model, splits, corruptions=["gaussian_noise"], severities=(2, 4), cifar_c_root=tmp_path)
    assert table.source.tolist() == ["clean", "cifar-c", "cifar-c"] and table.n.tolist() == [6, 4, 4]
    expected = calibration_report(*predict(model, load_cifar_c(tmp_path, "cifar10", "gaussian_noise", 4)))
    assert table.acc.iloc[2] == pytest.approx(expected["acc"]) and table.nll.iloc[2] == pytest.approx(expected["nll"])
    assert isinstance(table, pd.DataFrame)
