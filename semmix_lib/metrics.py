"""Calibration metrics (PAPER.md section 4), as fractions, never percent.

All functions take class probabilities ``probs`` of shape (N, K) and integer ``labels`` of shape
(N,), except :func:`calibration_report` and :func:`nll`, which take logits. Arrays may be numpy
arrays or torch tensors; everything is computed in float64 numpy.

Binning conventions (the paper's, from the RankMixup evaluation code it uses):

* ECE, OE, UE: 15 equal-width bins over the top-1 confidence, bin ``b`` holds ``lo_b < c <= hi_b``.
  A confidence of exactly 0 (impossible for a top-1 softmax) would go to the first bin.
* AdaECE: 15 equal-mass bins. We sort the confidences and cut them into ``n_bins`` consecutive
  groups whose sizes differ by at most one, so every sample lands in exactly one bin. (The reference
  code interpolates bin edges and then uses ``(lo, hi]``, which silently drops the least confident
  sample; on ties it can also make bins of very unequal mass.)
* Classwise ECE: per class ``k``, 15 equal-width bins over ``p_k`` of *all* samples, compared with
  the frequency of ``y == k`` in the bin, weighted by bin mass; averaged over the K classes of the
  probability matrix (the reference code infers K from ``max(labels) + 1``). ``p_k == 0`` (softmax
  underflow) is put in the first bin instead of being dropped.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "as_numpy", "check_labels", "softmax", "accuracy", "nll", "brier", "bin_stats",
    "ece", "adaece", "cece", "oe", "ue", "calibration_report", "REPORT_KEYS",
]

REPORT_KEYS = ("acc", "nll", "brier", "ece", "adaece", "cece", "oe", "ue")


def as_numpy(x) -> np.ndarray:
    """A float64/int numpy view of a numpy array, torch tensor or sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_labels(labels, num_classes: int, n: int) -> np.ndarray:
    """Validate integer labels in ``[0, num_classes)`` of length ``n``; return them as int64."""
    labels = as_numpy(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the predictions, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError("labels must be integer class indices")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} label(s) outside [0, {num_classes}) for {num_classes}-class predictions, "
            f"e.g. {sorted(set(labels[bad].tolist()))[:5]}; check the class count or the label encoding")
    return labels


def _check_probs(probs) -> np.ndarray:
    probs = as_numpy(probs).astype(np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"expected probabilities of shape (N, K) with K >= 2, got {probs.shape}")
    return probs


def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = as_numpy(logits).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(probs, labels) -> float:
    """Top-1 accuracy."""
    probs = _check_probs(probs)
    labels = check_labels(labels, probs.shape[1], probs.shape[0])
    return float(np.mean(probs.argmax(axis=1) == labels))


def nll(logits, labels) -> float:
    """Mean negative log-likelihood ``-log softmax(z)_y`` from logits (log-sum-exp, no underflow)."""
    z = as_numpy(logits).astype(np.float64)
    labels = check_labels(labels, z.shape[1], z.shape[0])
    m = z.max(axis=1, keepdims=True)
    log_norm = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def brier(probs, labels) -> float:
    """Brier score: ``mean_i sum_k (p_ik - 1[y_i = k])^2`` (Brier 1950; not divided by K)."""
    probs = _check_probs(probs)
    labels = check_labels(labels, probs.shape[1], probs.shape[0])
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def _equal_width_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value for ``n_bins`` equal-width bins on [0, 1] with membership (lo, hi]."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" returns i with edges[i-1] < v <= edges[i], exactly the (lo, hi] rule.
    return np.clip(np.searchsorted(edges, values, side="left") - 1, 0, n_bins - 1)


def _equal_mass_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value for ``n_bins`` bins holding (almost) equally many sorted values."""
    order = np.argsort(values, kind="stable")
    bins = np.empty(len(values), dtype=np.int64)
    for b, chunk in enumerate(np.array_split(order, n_bins)):
        bins[chunk] = b
    return bins


def bin_stats(confidence, correct, n_bins: int = 15, scheme: str = "width") -> dict[str, np.ndarray]:
    """Per-bin ``count``, mean ``conf`` and mean ``acc`` (0 where a bin is empty), plus ``edges``.

    ``scheme="width"``: equal-width bins (lo, hi]; ``"mass"``: equal-mass bins (see module doc).
    """
    confidence = as_numpy(confidence).astype(np.float64)
    correct = as_numpy(correct).astype(np.float64)
    if scheme == "width":
        bins = _equal_width_bins(confidence, n_bins)
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    elif scheme == "mass":
        bins = _equal_mass_bins(confidence, n_bins)
        edges = np.array([confidence[bins == b].min() if np.any(bins == b) else np.nan
                          for b in range(n_bins)] + [confidence.max() if len(confidence) else np.nan])
    else:
        raise ValueError(f"scheme must be 'width' or 'mass', got {scheme!r}")
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1.0)
    conf = np.bincount(bins, weights=confidence, minlength=n_bins) / safe
    acc = np.bincount(bins, weights=correct, minlength=n_bins) / safe
    return {"count": count, "conf": conf, "acc": acc, "edges": edges}


def _top1(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = _check_probs(probs)
    labels = check_labels(labels, probs.shape[1], probs.shape[0])
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)


def _weighted_gap(stats: dict[str, np.ndarray], gap: np.ndarray) -> float:
    n = stats["count"].sum()
    return float(np.sum(stats["count"] / n * gap)) if n else 0.0


def ece(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017): ``sum_b |B_b|/N * |acc_b - conf_b|``."""
    s = bin_stats(*_top1(probs, labels), n_bins, "width")
    return _weighted_gap(s, np.abs(s["acc"] - s["conf"]))


def adaece(probs, labels, n_bins: int = 15) -> float:
    """Adaptive ECE (Nguyen & O'Connor 2015; Mukhoti et al. 2020): ECE over equal-mass bins."""
    s = bin_stats(*_top1(probs, labels), n_bins, "mass")
    return _weighted_gap(s, np.abs(s["acc"] - s["conf"]))


def oe(probs, labels, n_bins: int = 15) -> float:
    """Overconfidence error (Thulasidasan et al. 2019): ``sum_b |B_b|/N * conf_b * max(conf_b - acc_b, 0)``."""
    s = bin_stats(*_top1(probs, labels), n_bins, "width")
    return _weighted_gap(s, s["conf"] * np.maximum(s["conf"] - s["acc"], 0.0))


def ue(probs, labels, n_bins: int = 15) -> float:
    """Underconfidence error: ``sum_b |B_b|/N * conf_b * max(acc_b - conf_b, 0)``.

    Weighted by ``conf_b`` like OE, as in the RankMixup evaluation code the paper reports with.
    """
    s = bin_stats(*_top1(probs, labels), n_bins, "width")
    return _weighted_gap(s, s["conf"] * np.maximum(s["acc"] - s["conf"], 0.0))


def cece(probs, labels, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al. 2019): mean over classes k of the ECE of ``p_k`` against ``y == k``."""
    probs = _check_probs(probs)
    labels = check_labels(labels, probs.shape[1], probs.shape[0])
    errors = []
    for k in range(probs.shape[1]):
        s = bin_stats(probs[:, k], labels == k, n_bins, "width")
        errors.append(_weighted_gap(s, np.abs(s["acc"] - s["conf"])))
    return float(np.mean(errors))


def calibration_report(logits, labels, n_bins: int = 15) -> dict[str, float]:
    """All metrics of PAPER.md section 4 from logits, as fractions.

    Keys: ``acc, nll, brier, ece, adaece, cece, oe, ue``.
    """
    probs = softmax(logits)
    labels = check_labels(labels, probs.shape[1], probs.shape[0])
    return {
        "acc": accuracy(probs, labels),
        "nll": nll(logits, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "adaece": adaece(probs, labels, n_bins),
        "cece": cece(probs, labels, n_bins),
        "oe": oe(probs, labels, n_bins),
        "ue": ue(probs, labels, n_bins),
    }
