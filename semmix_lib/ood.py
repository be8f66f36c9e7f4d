"""Out-of-distribution (OOD) detection with a classifier's confidence.

Scores (from logits; **higher = more in-distribution** for both, so a detector flags a sample as
OOD when its score is *below* a threshold):

* :func:`max_softmax` -- the maximum softmax probability (MSP, Hendrycks & Gimpel 2017), in
  (1/K, 1];
* :func:`negative_entropy` -- ``sum_k p_k log p_k``, minus the predictive entropy, in
  [-log K, 0].

:func:`ood_metrics` treats in-distribution as the positive class: AUROC, AUPR-In (in-distribution
positive, score as is), AUPR-Out (OOD positive, score negated) and FPR95, the fraction of OOD
samples scored at or above the threshold that keeps 95% of the in-distribution samples.

OOD sets (:func:`ood_sets`), all normalised with the in-distribution dataset's mean/std:

* CIFAR-10 / CIFAR-100, the paper's pairs: ``svhn`` (the SVHN test split,
  ``<data_root>/svhn/test_32x32.mat``) and the other CIFAR's test set (``cifar100`` for CIFAR-10,
  ``cifar10`` for CIFAR-100; near OOD: same image domain, other classes).
* The embedded ``digits`` (no download), a near and a far set like the paper's pair:

  - ``digits-rot90``: the digits test images of classes 1-9 rotated by 90 degrees (near OOD). They
    keep the in-distribution pixel statistics exactly (the same strokes, background and fixed
    pixel noise), only the shapes stop being digits, as CIFAR-100 keeps CIFAR-10's image domain.
    90 rather than 180 degrees: turned upside down (and mirrored) a 6 becomes a 9, a 9 a 6 and a
    0, 1 or 8 stays itself, so half of such a set would still be digits; on its side only the 0
    still reads as a digit (an O), hence class 0 is left out.
  - ``gaussian-noise``: images drawn pixel by pixel from a Gaussian with the per-pixel mean and
    standard deviation of the in-distribution validation images (clipped to [0, 1] and quantised
    to 8 bits; as many as the test set; seeded), far OOD: right intensities, no structure.

* Any other dataset: ``gaussian-noise``.

The OOD datasets yield ``(tensor, label)`` like every dataset here; the labels are those of the
OOD set's own classes (SVHN digits, the other CIFAR's classes, the rotated digit; noise: -1) and
are never used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from .data import ArrayDataset, DatasetNotFoundError, load_dataset
from .metrics import as_numpy

__all__ = [
    "max_softmax", "negative_entropy", "SCORES", "fpr_at_tpr", "ood_metrics", "svhn_test",
    "other_cifar_test", "rotated_digits", "gaussian_noise_images", "ood_sets", "evaluate_ood",
    "SVHN_FILE", "OOD_KEYS",
]

SVHN_FILE = os.path.join("svhn", "test_32x32.mat")
SVHN_PAGE = "http://ufldl.stanford.edu/housenumbers/"
OOD_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95")
OTHER_CIFAR = {"cifar10": "cifar100", "cifar100": "cifar10"}


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def _log_softmax(logits) -> np.ndarray:
    z = as_numpy(logits).astype(np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"expected logits of shape (N, K) with K >= 2, got {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def max_softmax(logits) -> np.ndarray:
    """Maximum softmax probability per row; higher = more in-distribution."""
    return np.exp(_log_softmax(logits).max(axis=1))


def negative_entropy(logits) -> np.ndarray:
    """``sum_k p_k log p_k`` per row (minus the entropy, <= 0); higher = more in-distribution.

    Computed from log-softmax, so a probability that underflows to 0 contributes 0, not NaN.
    """
    log_p = _log_softmax(logits)
    return np.sum(np.exp(log_p) * log_p, axis=1)


SCORES = {"msp": max_softmax, "neg_entropy": negative_entropy}


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _scores(values, name: str) -> np.ndarray:
    s = as_numpy(values).astype(np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} has {int((~np.isfinite(s)).sum())} non-finite value(s)")
    return s


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """Fraction of OOD scores at or above the highest threshold that keeps ``tpr`` of the
    in-distribution scores (in-distribution positive, flagged OOD below the threshold).

    The threshold is the ``ceil(tpr * n_in)``-th largest in-distribution score, so at least
    ``tpr`` of them are kept (ties at the threshold are all kept).
    """
    s_in, s_out = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    # scikit-learn has no FPR-at-fixed-TPR function; reading it off roc_curve needs the same
    # "first point with TPR >= 0.95" rule spelled out, and interpolating between ROC points (as
    # some OOD code does) gives a number no threshold achieves. Counting directly is exact.
    k = int(np.ceil(round(tpr * s_in.size, 9)))  # round: 0.95 * 20 must give 19, not 19.000000000000004
    threshold = np.sort(s_in)[::-1][k - 1]
    return float(np.mean(s_out >= threshold))


def ood_metrics(scores_in, scores_out) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and FPR at 95% TPR (fractions) of a higher-is-in score.

    In-distribution is the positive class for AUROC, AUPR-In and FPR95; AUPR-Out takes OOD as
    positive with the negated score. AUROC/AUPR use scikit-learn's ``roc_auc_score`` and
    ``average_precision_score`` (AUPR as average precision, no interpolation).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s_in, s_out = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    is_in = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    score = np.r_[s_in, s_out]
    return {
        "auroc": float(roc_auc_score(is_in, score)),
        "aupr_in": float(average_precision_score(is_in, score)),
        "aupr_out": float(average_precision_score(1 - is_in, -score)),
        "fpr95": fpr_at_tpr(s_in, s_out, 0.95),
    }


# ----------------------------------------------------------------------------------------------
# OOD sets
# ----------------------------------------------------------------------------------------------


def _normalize(mean: Sequence[float], std: Sequence[float]):
    return T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


def svhn_test(data_root, mean: Sequence[float], std: Sequence[float]) -> ArrayDataset:
    """The SVHN test split (26,032 images 32x32x3) from ``<data_root>/svhn/test_32x32.mat``.

    Read with ``scipy.io.loadmat`` (a MAT file, no pickle), exactly as
    ``torchvision.datasets.SVHN(root=<data_root>/svhn, split="test")`` reads it but without its
    md5 check (the official file's md5 is eb5a983be6a315427106f1b164d9cef3). Labels are the
    digits 0-9 (SVHN stores 0 as 10).
    """
    if data_root is None:
        raise DatasetNotFoundError(f"SVHN is read from files: pass data_root, the folder that holds {SVHN_FILE}")
    path = Path(os.fspath(data_root)) / SVHN_FILE
    if not path.is_file():
        raise DatasetNotFoundError(
            f"SVHN test set not found: expected {path}. Download test_32x32.mat from {SVHN_PAGE} "
            f"(or run torchvision.datasets.SVHN(root='{path.parent}', split='test', download=True) "
            f"on a machine with internet access) and put it there.")
    from scipy.io import loadmat

    record = loadmat(path, variable_names=["X", "y"])
    if "X" not in record or "y" not in record:
        raise ValueError(f"{path}: expected variables X and y, found {sorted(k for k in record if not k.startswith('__'))}")
    x, y = record["X"], np.asarray(record["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 or x.shape[3] != y.size:
        raise ValueError(f"{path}: expected X of shape (32, 32, 3, N) uint8 and N labels, "
                         f"got X {x.shape} {x.dtype} and {y.size} labels")
    images = np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)))
    return ArrayDataset(images, y.astype(np.int64) % 10, _normalize(mean, std))


def other_cifar_test(name: str, data_root, mean: Sequence[float], std: Sequence[float]) -> ArrayDataset:
    """The official test set of CIFAR ``name`` (via :func:`semmix_lib.data.load_dataset`),
    normalised with ``mean``/``std`` (the in-distribution dataset's)."""
    test = load_dataset(name, data_root).test
    return ArrayDataset(test.images, test.targets, _normalize(mean, std))


def _stack(dataset: Dataset) -> tuple[torch.Tensor, np.ndarray]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), np.array([int(y) for _, y in items])


def rotated_digits(test: Dataset, exclude: Iterable[int] = (0,)) -> ArrayDataset:
    """``test``'s images rotated by 90 degrees counter-clockwise, without the classes in
    ``exclude`` (normalisation is per channel, so rotating normalised tensors is exact)."""
    images, labels = _stack(test)
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotating by 90 degrees needs square images, got {tuple(images.shape[-2:])}")
    keep = ~np.isin(labels, list(exclude))
    rotated = torch.rot90(images[torch.from_numpy(keep)], 1, dims=(-2, -1)).contiguous()
    return ArrayDataset(rotated, labels[keep])


def gaussian_noise_images(reference: Dataset, mean: Sequence[float], std: Sequence[float], n: int,
                          seed: int = 0) -> ArrayDataset:
    """``n`` images whose pixels are independent Gaussians with the per-pixel mean and standard
    deviation of ``reference`` (in [0, 1] units), clipped, quantised to 8 bits, normalised."""
    images, _ = _stack(reference)
    c = images.shape[1]
    mu = torch.as_tensor(tuple(mean), dtype=torch.float64).reshape(-1, 1, 1).expand(c, 1, 1)
    sd = torch.as_tensor(tuple(std), dtype=torch.float64).reshape(-1, 1, 1).expand(c, 1, 1)
    unit = (images.double() * sd + mu).numpy()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0D]))
    draws = rng.normal(unit.mean(axis=0), unit.std(axis=0), size=(n, *unit.shape[1:]))
    draws = np.round(np.clip(draws, 0.0, 1.0) * 255.0) / 255.0
    return ArrayDataset(((torch.from_numpy(draws) - mu) / sd).float(), np.full(n, -1))


def ood_sets(splits, data_root=None, missing: str = "raise", seed: int = 0) -> dict[str, Dataset]:
    """The OOD test sets for ``splits`` (see the module docstring), by name.

    ``digits``: ``digits-rot90`` and ``gaussian-noise``; ``cifar10``: ``svhn`` and ``cifar100``;
    ``cifar100``: ``svhn`` and ``cifar10``; other datasets: ``gaussian-noise``. A set whose files
    are missing raises :class:`DatasetNotFoundError` naming the expected path, or with
    ``missing="skip"`` is left out with a warning.
    """
    if missing not in ("raise", "skip"):
        raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
    name, mean, std = splits.name, splits.mean, splits.std
    if name in OTHER_CIFAR:
        other = OTHER_CIFAR[name]
        loaders = {"svhn": lambda: svhn_test(data_root, mean, std),
                   other: lambda: other_cifar_test(other, data_root, mean, std)}
    else:
        loaders = {}
        if name == "digits":
            loaders["digits-rot90"] = lambda: rotated_digits(splits.test)
        loaders["gaussian-noise"] = lambda: gaussian_noise_images(splits.val, mean, std, len(splits.test), seed)
    sets: dict[str, Dataset] = {}
    for key, load in loaders.items():
        try:
            sets[key] = load()
        except DatasetNotFoundError as err:
            if missing == "raise":
                raise
            warnings.warn(f"OOD set {key!r} skipped: {err}", stacklevel=2)
    return sets


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def evaluate_ood(model, splits, ood_datasets: dict[str, Dataset], device=None, batch_size: int = 512,
                 scores: Iterable[str] = tuple(SCORES), temperature: float | None = None) -> pd.DataFrame:
    """OOD detection of ``splits.test`` (in-distribution) against each of ``ood_datasets``.

    One row per (OOD set, score): ``ood_set, score, auroc, aupr_in, aupr_out, fpr95, n_in, n_out``
    (fractions). ``scores`` are names in :data:`SCORES`; with ``temperature`` the logits are
    divided by it first. ``device`` defaults to the model's.
    """
    from .train import predict

    scores = list(scores)
    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; choose from {sorted(SCORES)}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    t = 1.0 if temperature is None else float(temperature)

    def logits_of(dataset) -> np.ndarray:
        return predict(model, dataset, batch_size=batch_size, device=device)[0].astype(np.float64) / t

    z_in = logits_of(splits.test)
    rows = []
    for ood_name, dataset in ood_datasets.items():
        z_out = logits_of(dataset)
        for score in scores:
            rows.append({"ood_set": ood_name, "score": score,
                         **ood_metrics(SCORES[score](z_in), SCORES[score](z_out)),
                         "n_in": len(z_in), "n_out": len(z_out)})
    return pd.DataFrame(rows, columns=["ood_set", "score", *OOD_KEYS, "n_in", "n_out"])
