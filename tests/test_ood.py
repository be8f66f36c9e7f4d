"""Tests for semmix_lib.ood: scores, metrics against hand-computed values, OOD sets, evaluation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy.io import savemat
from sklearn.metrics import roc_curve
from torch import nn

from semmix_lib.data import CIFAR_MEAN, CIFAR_STD, DatasetNotFoundError, load_dataset
from semmix_lib.ood import (
    evaluate_ood, fpr_at_tpr, gaussian_noise_images, max_softmax, negative_entropy, ood_metrics, ood_sets,
    svhn_test,
)
from semmix_lib.train import predict

# ----------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------


def test_scores_on_hand_made_logits():
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0], [1000.0, 0.0]])
    assert max_softmax(logits) == pytest.approx([0.5, 0.75, 1.0])
    assert negative_entropy(logits) == pytest.approx(
        [-np.log(2), 0.75 * np.log(0.75) + 0.25 * np.log(0.25), 0.0], abs=1e-12)
    three = np.array([[np.log(3.0), 0.0, 0.0], [5.0, 5.0, 5.0]])  # p = (0.6, 0.2, 0.2) and uniform
    assert max_softmax(three) == pytest.approx([0.6, 1 / 3])
    assert negative_entropy(three) == pytest.approx([0.6 * np.log(0.6) + 0.4 * np.log(0.2), -np.log(3)])
    assert np.all(np.isfinite(negative_entropy(np.array([[1e6, 0.0, -1e6]]))))
    # shift invariant, torch tensors accepted
    assert max_softmax(torch.tensor(three) + 7.0) == pytest.approx(max_softmax(three))


def test_sign_convention_higher_is_in_distribution():
    peaked, flat = np.array([[6.0, 0.0, 0.0]]), np.array([[1.0, 0.5, 0.0]])
    assert max_softmax(peaked)[0] > max_softmax(flat)[0]
    assert negative_entropy(peaked)[0] > negative_entropy(flat)[0]
    assert negative_entropy(peaked)[0] <= 0.0


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def test_perfect_and_reversed_separation():
    s_in, s_out = [0.9, 0.8, 0.95, 0.7], [0.1, 0.2, 0.3]
    assert ood_metrics(s_in, s_out) == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    reversed_ = ood_metrics(s_out, s_in)
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 1.0


def test_identical_distributions():
    same = np.arange(1.0, 21.0)
    m = ood_metrics(same, same)
    assert m["auroc"] == pytest.approx(0.5, abs=1e-12)
    assert m["fpr95"] == pytest.approx(19 / 20)  # threshold = 2, the 19th largest of 1..20
    rng = np.random.default_rng(0)
    m = ood_metrics(rng.normal(size=4000), rng.normal(size=4000))
    assert m["auroc"] == pytest.approx(0.5, abs=0.02) and m["fpr95"] == pytest.approx(0.95, abs=0.015)
    assert m["aupr_in"] == pytest.approx(0.5, abs=0.02)


def test_small_case_by_hand():
    s_in, s_out = [0.9, 0.8, 0.7, 0.6], [0.75, 0.5, 0.3]
    m = ood_metrics(s_in, s_out)
    # AUROC: 10 of the 12 (in, out) pairs are ordered correctly
    assert m["auroc"] == pytest.approx(10 / 12)
    # ranking 0.9 in, 0.8 in, 0.75 out, 0.7 in, 0.6 in, ...: precision at each in = 1, 1, 3/4, 4/5
    assert m["aupr_in"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 5) / 4)
    # OOD first by negated score: 0.3 out, 0.5 out, 0.6 in, 0.7 in, 0.75 out: 1, 1, 3/5
    assert m["aupr_out"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    # 95% of 4 in-samples -> keep all 4, threshold 0.6; OOD at or above it: 0.75 only
    assert m["fpr95"] == pytest.approx(1 / 3)


def test_fpr95_threshold_and_ties():
    s_in = np.arange(1.0, 21.0)  # keep 19 of 20 -> threshold 2
    assert fpr_at_tpr(s_in, [1.5, 2.0, 2.5, 0.0]) == 0.5  # a score equal to the threshold counts
    assert fpr_at_tpr(s_in, [1.9999, 1.0]) == 0.0
    assert fpr_at_tpr([1.0, 1.0, 1.0, 5.0], [1.0, 0.5]) == 0.5  # ties at the threshold are all kept
    assert fpr_at_tpr(s_in, [1.5], tpr=1.0) == 1.0 and fpr_at_tpr(s_in, [1.5], tpr=0.5) == 0.0


def test_fpr95_matches_the_roc_curve():
    rng = np.random.default_rng(3)
    for n_in, n_out in ((200, 150), (37, 90)):
        s_in = np.round(rng.normal(1.0, 1.0, n_in), 1)  # rounded: ties
        s_out = np.round(rng.normal(0.0, 1.0, n_out), 1)
        fpr, tpr, _ = roc_curve(np.r_[np.ones(n_in), np.zeros(n_out)], np.r_[s_in, s_out], drop_intermediate=False)
        expected = fpr[np.argmax(tpr >= 0.95 - 1e-12)]
        assert fpr_at_tpr(s_in, s_out) == pytest.approx(expected)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="scores_out is empty"):
        ood_metrics([0.1, 0.2], [])
    with pytest.raises(ValueError, match="non-finite"):
        ood_metrics([0.1, np.nan], [0.2])
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([1.0], [0.0], tpr=0.0)


# ----------------------------------------------------------------------------------------------
# OOD sets: digits
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _stack(dataset):
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), np.array([dataset[i][1] for i in range(len(dataset))])


def test_digits_ood_sets(digits):
    sets = ood_sets(digits)
    assert list(sets) == ["digits-rot90", "gaussian-noise"]
    test_x, test_y = _stack(digits.test)
    rot_x, rot_y = _stack(sets["digits-rot90"])
    keep = test_y != 0
    assert len(rot_y) == keep.sum() == len(digits.test) - np.sum(test_y == 0) and 0 not in rot_y
    assert rot_x.shape == (keep.sum(), 1, 8, 8) and rot_y.tolist() == test_y[keep].tolist()
    # counter-clockwise quarter turn: the top row becomes the left column, read bottom-up
    first = test_x[keep][0, 0].numpy()
    assert np.array_equal(rot_x[0, 0].numpy(), np.rot90(first))
    assert np.array_equal(rot_x[0, 0, :, 0].numpy(), first[0, ::-1])

    noise_x, noise_y = _stack(sets["gaussian-noise"])
    assert noise_x.shape == (len(digits.test), 1, 8, 8) and noise_x.dtype == torch.float32
    assert set(noise_y.tolist()) == {-1}
    unit = noise_x.double() * 0.5 + 0.5
    assert unit.min() >= 0 and unit.max() <= 1 and torch.allclose(unit * 255, (unit * 255).round(), atol=1e-4)
    val_x, _ = _stack(digits.val)
    val_mean = (val_x.double() * 0.5 + 0.5).mean(0)
    # per-pixel statistics follow the validation images (clipping shifts them a little)
    assert torch.allclose(unit.mean(0), val_mean, atol=0.08)
    assert float(torch.corrcoef(torch.stack([unit.mean(0).flatten(), val_mean.flatten()]))[0, 1]) > 0.9


def test_noise_set_is_seeded(digits):
    a = _stack(gaussian_noise_images(digits.val, digits.mean, digits.std, 10, seed=1))[0]
    b = _stack(gaussian_noise_images(digits.val, digits.mean, digits.std, 10, seed=1))[0]
    c = _stack(gaussian_noise_images(digits.val, digits.mean, digits.std, 10, seed=2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(_stack(ood_sets(digits, seed=4)["gaussian-noise"])[0],
                       _stack(ood_sets(digits, seed=4)["gaussian-noise"])[0])


# ----------------------------------------------------------------------------------------------
# OOD sets: CIFAR + SVHN from fake folders
# ----------------------------------------------------------------------------------------------


def _pixels(n: int, offset: int) -> np.ndarray:
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = (offset + np.arange(n)) % 256  # channel R, row 0, column 0
    return data


def _dump(path, obj) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _write_cifar(root, n_train: int = 20, n_test: int = 6) -> None:
    ten = root / "cifar-10-batches-py"
    ten.mkdir(parents=True)
    for b in range(1, 6):
        _dump(ten / f"data_batch_{b}", {"data": _pixels(n_train, b), "labels": [i % 10 for i in range(n_train)]})
    _dump(ten / "test_batch", {"data": _pixels(n_test, 100), "labels": [i % 10 for i in range(n_test)]})
    _dump(ten / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    hundred = root / "cifar-100-python"
    hundred.mkdir()
    _dump(hundred / "train", {"data": _pixels(5 * n_train, 7), "fine_labels": [i % 5 for i in range(5 * n_train)]})
    _dump(hundred / "test", {"data": _pixels(n_test + 1, 150), "fine_labels": [90 + i for i in range(n_test + 1)]})
    _dump(hundred / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})


def _write_svhn(root, n: int = 5):
    folder = root / "svhn"
    folder.mkdir()
    x = np.zeros((32, 32, 3, n), dtype=np.uint8)
    for i in range(n):
        x[:, :, :, i] = 10 * i + 1
        x[2, 5, 1, i] = 200  # one marked pixel: row 2, column 5, green
    savemat(folder / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3], [9]][:n], dtype=np.uint8)})


def test_cifar_missing_svhn_names_the_file(tmp_path):
    _write_cifar(tmp_path)
    splits = load_dataset("cifar10", tmp_path)
    with pytest.raises(DatasetNotFoundError) as info:
        ood_sets(splits, tmp_path)
    assert str(tmp_path / "svhn" / "test_32x32.mat") in str(info.value)
    with pytest.warns(UserWarning, match="svhn"):
        sets = ood_sets(splits, tmp_path, missing="skip")
    assert list(sets) == ["cifar100"]
    with pytest.raises(DatasetNotFoundError, match="data_root"):
        svhn_test(None, CIFAR_MEAN, CIFAR_STD)


def test_cifar_ood_sets_load(tmp_path):
    _write_cifar(tmp_path)
    _write_svhn(tmp_path)
    sets = ood_sets(load_dataset("cifar10", tmp_path), tmp_path)
    assert list(sets) == ["svhn", "cifar100"]
    svhn = sets["svhn"]
    assert len(svhn) == 5 and svhn.targets == [0, 1, 2, 3, 9]  # SVHN's 10 is the digit 0
    image, _ = svhn[3]
    assert image.shape == (3, 32, 32)
    norm = lambda v, ch: (v / 255.0 - CIFAR_MEAN[ch]) / CIFAR_STD[ch]  # noqa: E731
    assert image[0, 0, 0].item() == pytest.approx(norm(31, 0), abs=1e-5)
    assert image[1, 2, 5].item() == pytest.approx(norm(200, 1), abs=1e-5)
    cifar100 = sets["cifar100"]
    assert len(cifar100) == 7 and cifar100.targets == list(range(90, 97))
    assert cifar100[2][0][0, 0, 0].item() == pytest.approx(norm(152, 0), abs=1e-5)
    back = ood_sets(load_dataset("cifar100", tmp_path), tmp_path)
    assert list(back) == ["svhn", "cifar10"] and len(back["cifar10"]) == 6


def test_svhn_bad_file(tmp_path):
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(ValueError, match=r"\(32, 32, 3, N\)"):
        svhn_test(tmp_path, CIFAR_MEAN, CIFAR_STD)


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------


def test_evaluate_ood(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    sets = ood_sets(digits)
    table = evaluate_ood(model, digits, sets)
    assert list(table.columns) == ["ood_set", "score", "auroc", "aupr_in", "aupr_out", "fpr95", "n_in", "n_out"]
    assert list(zip(table.ood_set, table.score)) == [
        ("digits-rot90", "msp"), ("digits-rot90", "neg_entropy"), ("gaussian-noise", "msp"),
        ("gaussian-noise", "neg_entropy")]
    z_in, _ = predict(model, digits.test)
    z_out, _ = predict(model, sets["gaussian-noise"])
    expected = ood_metrics(negative_entropy(z_in), negative_entropy(z_out))
    row = table.iloc[3]
    assert row.n_in == len(digits.test) and row.n_out == len(sets["gaussian-noise"])
    for key, value in expected.items():
        assert row[key] == pytest.approx(value)
    t = 3.0
    scaled = evaluate_ood(model, digits, {"noise": sets["gaussian-noise"]}, scores=["msp"], temperature=t)
    assert scaled.auroc.iloc[0] == pytest.approx(ood_metrics(max_softmax(z_in / t), max_softmax(z_out / t))["auroc"])
    with pytest.raises(ValueError, match="unknown score"):
        evaluate_ood(model, digits, sets, scores=["energy"])
