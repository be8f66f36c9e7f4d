"""Calibration metrics against hand-computed cases, a slow reference, and torchmetrics."""

import math

import numpy as np
import pytest
import torch

from semmix_lib import metrics as M

# Four predictions worked by hand (see the comments in each test). Confidences avoid bin edges.
P = np.array([[0.93, 0.07], [0.82, 0.18], [0.26, 0.74], [0.37, 0.63]])
Y = np.array([0, 1, 1, 1])  # top-1 correct: yes, no, yes, yes


def test_ece_oe_ue_by_hand():
    # 5 bins of width 0.2. Bin (0.8, 1]: conf {.93, .82} mean .875, acc .5 -> |gap| .375, mass .5
    # Bin (0.6, 0.8]: conf {.74, .63} mean .685, acc 1 -> |gap| .315, mass .5
    assert M.ece(P, Y, n_bins=5) == pytest.approx(0.5 * 0.375 + 0.5 * 0.315)
    assert M.oe(P, Y, n_bins=5) == pytest.approx(0.5 * 0.875 * 0.375)  # only the overconfident bin
    assert M.ue(P, Y, n_bins=5) == pytest.approx(0.5 * 0.685 * 0.315)  # only the underconfident bin


def test_adaece_by_hand():
    # 4 equal-mass bins over 4 samples: one sample each, gaps .07, .82, .26, .37
    assert M.adaece(P, Y, n_bins=4) == pytest.approx((0.07 + 0.82 + 0.26 + 0.37) / 4)
    # 2 bins: {.63, .74} and {.82, .93}, the same bins as equal width here
    assert M.adaece(P, Y, n_bins=2) == pytest.approx(M.ece(P, Y, n_bins=5))


def test_classwise_ece_by_hand():
    # class 0: p0 {.93,.82} in (0.8,1] freq(y=0) .5 -> .375; {.26,.37} in (0.2,0.4] freq 0 -> .315
    # class 1: p1 {.07,.18} in (0,0.2] freq .5 -> .375;   {.74,.63} in (0.6,0.8] freq 1 -> .315
    assert M.cece(P, Y, n_bins=5) == pytest.approx(0.5 * 0.375 + 0.5 * 0.315)


def test_nll_brier_acc_by_hand():
    logits = np.log(P)  # softmax(log p) = p
    assert M.nll(logits, Y) == pytest.approx(-np.mean(np.log([0.93, 0.18, 0.74, 0.63])))
    # per sample: 2*.07^2, 2*.82^2, 2*.26^2, 2*.37^2
    assert M.brier(P, Y) == pytest.approx(2 * (0.07**2 + 0.82**2 + 0.26**2 + 0.37**2) / 4)
    assert M.accuracy(P, Y) == 0.75
    report = M.calibration_report(logits, Y, n_bins=5)
    assert set(report) == set(M.REPORT_KEYS)
    assert report["ece"] == pytest.approx(0.345)


def test_bins_are_lo_exclusive_hi_inclusive():
    # confidence exactly 0.6 belongs to (0.4, 0.6], exactly 1.0 to the last bin
    s = M.bin_stats([0.6, 1.0, 0.4], [1, 1, 0], n_bins=5)
    assert s["count"].tolist() == [0, 1, 1, 0, 1]


def test_nll_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    assert M.nll(logits, [0, 0]) == pytest.approx(500.0)  # no inf from log(0)


def test_perfectly_calibrated_and_overconfident():
    rng = np.random.default_rng(0)
    n = 200_000
    conf = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(size=n) < conf  # correct with probability = confidence
    probs = np.stack([conf, 1 - conf], 1)
    labels = np.where(correct, 0, 1)
    assert M.ece(probs, labels) < 0.005
    # the same predictions made 10 points more confident than they are right: ECE near 0.1, all OE
    labels_over = np.where(rng.uniform(size=n) < conf - 0.1, 0, 1)
    assert M.ece(probs, labels_over) == pytest.approx(0.1, abs=0.005)
    assert M.ue(probs, labels_over) < 1e-3 < M.oe(probs, labels_over)


@pytest.mark.parametrize("bad", [[0, 1, 2, 1], [-1, 0, 0, 0]])
def test_labels_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        M.calibration_report(np.log(P), np.array(bad))


def test_label_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="shape"):
        M.ece(P, [0, 1])


# --- an independent, slow reference: plain Python loops over bins -------------------------------

def _ref_binned(conf, correct, edges_or_groups, weight=lambda c, a: abs(a - c)):
    n = len(conf)
    total = 0.0
    for members in edges_or_groups:
        if members:
            c = sum(conf[i] for i in members) / len(members)
            a = sum(correct[i] for i in members) / len(members)
            total += len(members) / n * weight(c, a)
    return total


def _width_groups(values, n_bins):
    groups = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        groups.append([i for i, v in enumerate(values) if (lo < v <= hi) or (b == 0 and v == 0)])
    return groups


def _mass_groups(values, n_bins):
    order = sorted(range(len(values)), key=lambda i: values[i])
    n = len(values)
    sizes = [n // n_bins + (1 if b < n % n_bins else 0) for b in range(n_bins)]
    groups, start = [], 0
    for s in sizes:
        groups.append(order[start:start + s])
        start += s
    return groups


@pytest.mark.parametrize("seed,n,k,n_bins", [(0, 500, 10, 15), (1, 97, 3, 15), (2, 1000, 100, 10)])
def test_against_slow_reference(seed, n, k, n_bins):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, k))
    labels = rng.integers(0, k, n)
    probs = M.softmax(logits)
    conf = probs.max(1).tolist()
    correct = (probs.argmax(1) == labels).astype(float).tolist()
    wg = _width_groups(conf, n_bins)
    assert M.ece(probs, labels, n_bins) == pytest.approx(_ref_binned(conf, correct, wg), abs=1e-12)
    assert M.oe(probs, labels, n_bins) == pytest.approx(
        _ref_binned(conf, correct, wg, lambda c, a: c * max(c - a, 0)), abs=1e-12)
    assert M.ue(probs, labels, n_bins) == pytest.approx(
        _ref_binned(conf, correct, wg, lambda c, a: c * max(a - c, 0)), abs=1e-12)
    assert M.adaece(probs, labels, n_bins) == pytest.approx(
        _ref_binned(conf, correct, _mass_groups(conf, n_bins)), abs=1e-12)
    per_class = []
    for c in range(k):
        pk = probs[:, c].tolist()
        per_class.append(_ref_binned(pk, (labels == c).astype(float).tolist(), _width_groups(pk, n_bins)))
    assert M.cece(probs, labels, n_bins) == pytest.approx(sum(per_class) / k, abs=1e-12)
    ref_nll = -sum(math.log(probs[i, labels[i]]) for i in range(n)) / n
    assert M.nll(logits, labels) == pytest.approx(ref_nll, rel=1e-10)


def test_ece_matches_torchmetrics_off_bin_edges():
    # torchmetrics bins [lo, hi) where we (and the paper) use (lo, hi]: the two agree whenever no
    # confidence sits exactly on an edge, which random float32 softmax outputs never do.
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(0, 2, (2000, 10))).float()
    labels = torch.from_numpy(rng.integers(0, 10, 2000))
    probs = torch.softmax(logits, 1)
    theirs = multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="l1")
    assert M.ece(probs.double(), labels, 15) == pytest.approx(float(theirs), abs=1e-6)
