"""Calibration under distribution shift: common corruptions at five severities (CIFAR-10-C style).

Two sources of corrupted test sets:

* :class:`CorruptedDataset` applies the corruptions itself, to any dataset (so the embedded 8x8
  digits get them too). Each image is un-normalised to [0, 1] with the dataset's mean/std,
  corrupted, clipped to [0, 1], quantised to 8 bits (rounded; CIFAR-10-C is stored as uint8
  too, so the corrupted images live in the same 8-bit domain as the clean ones) and
  re-normalised. Random corruptions draw from one ``numpy.random.Generator`` per
  (corruption, severity), seeded by ``SeedSequence([seed, crc32(corruption), severity])``, so a
  set is reproducible and does not depend on which other corruptions are evaluated.
* :func:`load_cifar_c` reads the official CIFAR-10-C / CIFAR-100-C files (Hendrycks & Dietterich,
  ICLR 2019) when they are under the data root.

Corruptions and their severity parameters, following ``make_cifar_c.py`` of Hendrycks &
Dietterich (CIFAR-10-C), all in [0, 1] intensity units:

=================  ===================================================  ============================
corruption         operation                                            severity 1 .. 5
=================  ===================================================  ============================
``gaussian_noise`` ``x + N(0, c^2)`` per pixel and channel              c = 0.04, 0.06, 0.08, 0.09, 0.10
``shot_noise``     ``Poisson(c x) / c`` (photon noise)                  c = 500, 250, 100, 75, 50
``gaussian_blur``  Gaussian filter, sigma in pixels (edges: nearest,    CIFAR (32 px): 0.4, 0.6, 0.7,
                   truncated at 4 sigma), per channel                   0.8, 1.0; scaled, see below
``pixelate``       BOX-downsample to side ``s``, BOX-upsample back      ``s = min(int(c H), H - severity)``
                   (PIL's BOX filter)                                   c = 0.95, 0.9, 0.85, 0.75, 0.65
``contrast``       ``(x - m) c + m``, m = the image's mean per channel  c = 0.75, 0.5, 0.4, 0.3, 0.15
``brightness``     HSV value ``V -> clip(V + c, 0, 1)``, hue and        c = 0.05, 0.1, 0.15, 0.2, 0.3
                   saturation kept (grey images: ``x + c``)
=================  ===================================================  ============================

Scaling with the image side ``H`` (the CIFAR values are for ``H = 32``):

* ``gaussian_blur``: sigma = CIFAR sigma x ``max(1, H / 32)`` pixels. Larger images scale up
  (64-px Tiny-ImageNet: 0.8 .. 2.0 px); smaller ones keep CIFAR's pixel sigmas. Scaling down
  with the side would give the 8x8 digits sigmas of 0.1 .. 0.25 px, where the filter weight on a
  neighbouring pixel is below 0.0004, i.e. no blur at all; even half of CIFAR's sigmas leave a
  small CNN's digits accuracy unchanged up to severity 4. With CIFAR's pixel sigmas the digits
  lose accuracy gradually with severity (a small CNN: 93% clean, 88% at severity 2, 64% at
  severity 5), a CIFAR-10-C-like degradation.
* ``pixelate``: ``int(c H)`` are CIFAR-10-C's sides for ``H = 32`` (30, 28, 27, 24, 20); the cap
  ``H - severity`` only matters for small images, where ``int(c H)`` repeats (8 px: 7, 7, 6, 6, 5)
  and keeps the five severities distinct (8 px: 7, 6, 5, 4, 3).
* Noise, contrast and brightness act on intensities and are used unchanged at every size.

On the digits (``noise_sigma=0.5`` in [-1, 1], i.e. pixel noise of std 0.25 in [0, 1] units,
already part of the clean images) the two noise corruptions barely change accuracy, while
``contrast`` from severity 3 on (dark backgrounds turn grey) and ``pixelate`` at severity 5
(3x3 blocks) bring a small CNN close to chance; we keep CIFAR-10-C's intensity parameters anyway,
so the severities mean the same thing on every dataset.

CIFAR-10-C's ``brightness`` converts to HSV with skimage; we use the equivalent closed form
(with hue and saturation fixed, RGB scales linearly with V), so no skimage is needed.
"""

from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from .data import CIFAR_MEAN, CIFAR_STD, ArrayDataset, DatasetNotFoundError
from .metrics import adaece, check_labels, ece, nll, softmax

__all__ = [
    "CORRUPTIONS", "SEVERITIES", "PARAMETERS", "CIFAR_C_CORRUPTIONS", "CIFAR_C_FOLDERS",
    "blur_sigma", "pixelate_side", "corrupt", "CorruptedDataset", "cifar_c_available",
    "load_cifar_c", "evaluate_corruptions", "plot_corruptions",
]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "gaussian_blur", "pixelate", "contrast", "brightness")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

#: The CIFAR-10-C parameter of each corruption at severities 1..5 (make_cifar_c.py).
PARAMETERS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
}
#: The files of the official CIFAR-10-C / CIFAR-100-C archives (19 corruptions).
CIFAR_C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "gaussian_blur", "snow", "frost", "fog", "spatter", "brightness",
    "contrast", "saturate", "elastic_transform", "pixelate", "jpeg_compression")
CIFAR_C_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
CIFAR_C_RECORDS = {"cifar10": "https://zenodo.org/records/2535967",
                   "cifar100": "https://zenodo.org/records/3555552"}


# ----------------------------------------------------------------------------------------------
# Corruptions on [0, 1] arrays
# ----------------------------------------------------------------------------------------------


def _check(corruption: str, severity: int, allow_zero: bool = True) -> int:
    if corruption not in PARAMETERS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
    lowest = 0 if allow_zero else 1
    if int(severity) != severity or not lowest <= severity <= 5:
        raise ValueError(f"severity must be an integer in {lowest}..5, got {severity}")
    return int(severity)


def blur_sigma(severity: int, size: int) -> float:
    """Gaussian-blur sigma in pixels for an image of side ``size`` (see the module table)."""
    c = PARAMETERS["gaussian_blur"][_check("gaussian_blur", severity, False) - 1]
    return c * max(1.0, size / 32)


def pixelate_side(severity: int, size: int) -> int:
    """Side the image is BOX-downsampled to: ``min(int(c * size), size - severity)``, at least 1."""
    c = PARAMETERS["pixelate"][_check("pixelate", severity, False) - 1]
    return max(1, min(int(c * size), size - severity))


@functools.lru_cache(maxsize=None)
def _box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of PIL's BOX resampling along one axis, read off unit impulses.

    PIL resizes separably (a horizontal then a vertical pass), so applying this matrix along
    both axes reproduces ``Image.resize(..., BOX)`` on a float ("F") image.
    """
    columns = []
    for j in range(n_in):
        impulse = np.zeros((1, n_in), dtype=np.float32)
        impulse[0, j] = 1.0
        out = Image.fromarray(impulse).resize((n_out, 1), Image.Resampling.BOX)
        columns.append(np.asarray(out, dtype=np.float64)[0])
    return np.stack(columns, axis=1)


def _pixelate(x: np.ndarray, severity: int) -> np.ndarray:
    h, w = x.shape[-2:]
    mh = _box_matrix(pixelate_side(severity, h), h) @ _box_matrix(h, pixelate_side(severity, h))
    mw = _box_matrix(pixelate_side(severity, w), w) @ _box_matrix(w, pixelate_side(severity, w))
    return np.einsum("ij,ncjk,lk->ncil", mh, x, mw)


def _blur(x: np.ndarray, severity: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    sigma = blur_sigma(severity, min(x.shape[-2:]))
    # skimage.filters.gaussian (used by make_cifar_c.py) defaults: mode "nearest", truncate 4.
    return gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)


def _brightness(x: np.ndarray, c: float) -> np.ndarray:
    value = x.max(axis=1, keepdims=True)  # HSV V; with H and S fixed, RGB is proportional to V
    new_value = np.clip(value + c, 0.0, 1.0)
    scale = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    # a black pixel has S = 0 (grey): it becomes (V', V', V')
    return np.where(value > 0, x * scale, new_value)


def corrupt(images: np.ndarray, corruption: str, severity: int, rng: np.random.Generator | None = None,
            quantize: bool = True) -> np.ndarray:
    """Corrupt float images in [0, 1] of shape (N, C, H, W); returns float64 in [0, 1].

    Severity 0 returns the images unchanged (as float64). ``rng`` is needed by the noise
    corruptions. With ``quantize`` the result is rounded to multiples of 1/255.
    """
    severity = _check(corruption, severity)
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {x.shape}")
    if severity == 0:
        return x.copy()
    c = PARAMETERS[corruption][severity - 1]
    if corruption in ("gaussian_noise", "shot_noise") and rng is None:
        raise ValueError(f"{corruption} needs a numpy Generator (rng)")
    if corruption == "gaussian_noise":
        out = x + rng.normal(0.0, c, size=x.shape)
    elif corruption == "shot_noise":
        out = rng.poisson(np.clip(x, 0.0, 1.0) * c) / c
    elif corruption == "gaussian_blur":
        out = _blur(x, severity)
    elif corruption == "pixelate":
        out = _pixelate(x, severity)
    elif corruption == "contrast":
        mean = x.mean(axis=(2, 3), keepdims=True)
        out = (x - mean) * c + mean
    else:  # brightness
        out = _brightness(x, c)
    out = np.clip(out, 0.0, 1.0)
    return np.round(out * 255.0) / 255.0 if quantize else out


def _generator(seed: int, corruption: str, severity: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(corruption.encode()), int(severity)]))


def _stack(dataset: Dataset) -> tuple[torch.Tensor, list[int]]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x) for x in images]), [int(y) for y in labels]


def _stats(values: Sequence[float], channels: int) -> torch.Tensor:
    t = torch.as_tensor(tuple(values), dtype=torch.float64).reshape(-1, 1, 1)
    if t.shape[0] not in (1, channels):
        raise ValueError(f"mean/std have {t.shape[0]} values for {channels}-channel images")
    return t


class CorruptedDataset(Dataset):
    """``base`` (normalised tensors) with one corruption at one severity, computed up front.

    ``mean``/``std`` are the normalisation of ``base`` (``DataSplits.mean/std``). Yields
    ``(float32 CHW tensor, int label)`` normalised the same way; ``.targets`` are ``base``'s
    labels. Severity 0 yields ``base``'s images unchanged. Deterministic given ``seed``.
    """

    def __init__(self, base: Dataset, corruption: str, severity: int, mean: Sequence[float],
                 std: Sequence[float], seed: int = 0) -> None:
        self.corruption, self.severity, self.seed = corruption, _check(corruption, severity), int(seed)
        clean, self.targets = _stack(base)
        if self.severity == 0:
            self.images = clean.float()
            return
        mu, sd = _stats(mean, clean.shape[1]), _stats(std, clean.shape[1])
        unit = (clean.double() * sd + mu).numpy()
        out = corrupt(unit, corruption, self.severity, _generator(seed, corruption, self.severity))
        self.images = ((torch.from_numpy(out) - mu) / sd).float()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


# ----------------------------------------------------------------------------------------------
# CIFAR-10-C / CIFAR-100-C files
# ----------------------------------------------------------------------------------------------


def _cifar_c_folder(root, dataset: str) -> Path:
    if dataset not in CIFAR_C_FOLDERS:
        raise ValueError(f"corrupted test sets exist for {', '.join(CIFAR_C_FOLDERS)}, not {dataset!r}")
    if root is None:
        raise DatasetNotFoundError(
            f"{CIFAR_C_FOLDERS[dataset]} is read from files: pass data_root, the folder that holds "
            f"{CIFAR_C_FOLDERS[dataset]}/")
    return Path(os.fspath(root)) / CIFAR_C_FOLDERS[dataset]


def cifar_c_available(root, dataset: str, corruption: str | None = None) -> bool:
    """True if ``<root>/CIFAR-10-C`` (or ``CIFAR-100-C``) holds ``labels.npy`` (and the corruption's file)."""
    if root is None or dataset not in CIFAR_C_FOLDERS:
        return False
    folder = _cifar_c_folder(root, dataset)
    names = ["labels.npy"] + ([f"{corruption}.npy"] if corruption else [])
    return all((folder / n).is_file() for n in names)


def _not_found(folder: Path, dataset: str, what: str) -> DatasetNotFoundError:
    title = CIFAR_C_FOLDERS[dataset]
    return DatasetNotFoundError(
        f"{title}: {what}. Expected {folder}{os.sep}<corruption>.npy (50000 x 32 x 32 x 3 uint8, "
        f"severities 1-5 stacked) and {folder}{os.sep}labels.npy: download {title}.tar from "
        f"{CIFAR_C_RECORDS[dataset]} and extract it under {folder.parent}")


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map a .npy file; object arrays (pickles) are refused, never loaded."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a plain numeric .npy array ({err})") from err


def load_cifar_c(root, dataset: str, corruption: str, severity: int,
                 mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD) -> ArrayDataset:
    """The official corrupted test images of one (corruption, severity 1..5), normalised.

    Reads ``<root>/CIFAR-10-C/<corruption>.npy`` (``dataset="cifar10"``) or ``CIFAR-100-C``
    (``"cifar100"``) and ``labels.npy`` with ``numpy.load(allow_pickle=False)``; severity ``s``
    is the ``s``-th fifth of the stacked arrays (10,000 images each in the official files).
    """
    if corruption not in CIFAR_C_CORRUPTIONS:
        raise ValueError(f"unknown CIFAR-C corruption {corruption!r}; the files are {', '.join(CIFAR_C_CORRUPTIONS)}")
    if int(severity) != severity or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5 (0 is the clean test set), got {severity}")
    folder = _cifar_c_folder(root, dataset)
    if not folder.is_dir():
        raise _not_found(folder, dataset, f"folder {folder} not found")
    for name in (f"{corruption}.npy", "labels.npy"):
        if not (folder / name).is_file():
            raise _not_found(folder, dataset, f"missing {folder / name}")
    images, labels = _load_npy(folder / f"{corruption}.npy"), _load_npy(folder / "labels.npy")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8 or len(images) % 5:
        raise ValueError(f"{folder / (corruption + '.npy')}: expected (5n, 32, 32, 3) uint8, "
                         f"got {images.shape} {images.dtype}")
    if labels.shape != (len(images),):
        raise ValueError(f"{folder / 'labels.npy'}: expected {len(images)} labels, got shape {labels.shape}")
    n = len(images) // 5
    part = slice((int(severity) - 1) * n, int(severity) * n)
    return ArrayDataset(np.ascontiguousarray(images[part]), np.asarray(labels[part]).astype(np.int64),
                        T.Compose([T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]))


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _device(model, device):
    if device is not None:
        return torch.device(device)
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _scores(logits: np.ndarray, labels: np.ndarray, n_bins: int, suffix: str = "") -> dict[str, float]:
    probs = softmax(logits)
    row = {} if suffix else {"acc": float(np.mean(probs.argmax(1) == labels))}
    row.update({f"ece{suffix}": ece(probs, labels, n_bins), f"nll{suffix}": nll(logits, labels),
                f"adaece{suffix}": adaece(probs, labels, n_bins)})
    return row


def evaluate_corruptions(model, splits, corruptions: Iterable[str] = CORRUPTIONS,
                         severities: Iterable[int] = SEVERITIES, device=None, batch_size: int = 512,
                         temperature: float | None = None, seed: int = 0, n_bins: int = 15,
                         cifar_c_root=None) -> pd.DataFrame:
    """Accuracy and calibration of ``model`` on ``splits.test`` under each (corruption, severity).

    One row per (corruption, severity), severity 0 being the clean test set (the same numbers
    repeated for every corruption, so averages over corruptions per severity are direct).
    Columns: ``corruption, severity, source, n, acc, ece, nll, adaece`` as fractions, plus
    ``ece_ts, nll_ts, adaece_ts`` from the logits divided by ``temperature`` when given
    (accuracy does not change). ``source`` is ``"ours"`` (:class:`CorruptedDataset`) or
    ``"cifar-c"``: with ``cifar_c_root`` given, CIFAR-10/100 read the official files there
    (:func:`load_cifar_c`). ``device`` defaults to the model's; the model is put in eval mode.
    """
    from .train import predict

    corruptions, severities = list(corruptions), sorted(set(int(s) for s in severities) - {0})
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = _device(model, device)
    files = cifar_c_root is not None
    for corruption in corruptions:
        if files:
            if corruption not in CIFAR_C_CORRUPTIONS:
                raise ValueError(f"unknown CIFAR-C corruption {corruption!r}")
        else:
            _check(corruption, 0)
    for s in severities:
        _check(CORRUPTIONS[0], s)

    def measure(dataset) -> dict[str, float]:
        logits, labels = predict(model, dataset, batch_size=batch_size, device=device)
        labels = check_labels(labels, logits.shape[1], logits.shape[0])
        row = {"n": len(labels), **_scores(logits, labels, n_bins)}
        if temperature is not None:
            row.update(_scores(logits.astype(np.float64) / temperature, labels, n_bins, "_ts"))
        return row

    clean = measure(splits.test)
    rows = []
    for corruption in corruptions:
        rows.append({"corruption": corruption, "severity": 0, "source": "clean", **clean})
        for s in severities:
            if files:
                dataset = load_cifar_c(cifar_c_root, splits.name, corruption, s, splits.mean, splits.std)
            else:
                dataset = CorruptedDataset(splits.test, corruption, s, splits.mean, splits.std, seed)
            rows.append({"corruption": corruption, "severity": s, "source": "cifar-c" if files else "ours",
                         **measure(dataset)})
    return pd.DataFrame(rows)


def plot_corruptions(table_by_method: dict[str, pd.DataFrame], metric: str = "ece"):
    """Two panels against severity: accuracy and ``metric`` (in %), each the mean over the
    corruptions of a table from :func:`evaluate_corruptions`; one line per method."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not table_by_method:
        raise ValueError("no tables to plot")
    names = {"acc": "accuracy", "ece": "ECE", "adaece": "AdaECE", "nll": "NLL"}
    keys = ("acc", metric)
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        palette = sns.color_palette("deep", len(table_by_method))
        severities: set[int] = set()
        for colour, (method, table) in zip(palette, table_by_method.items()):
            if metric not in table.columns:
                raise ValueError(f"table {method!r} has no column {metric!r}; columns: {list(table.columns)}")
            mean = table.groupby("severity")[list(keys)].mean()
            severities.update(int(s) for s in mean.index)
            for ax, key in zip(axes, keys):
                scale = 1 if key.startswith("nll") else 100  # NLL is not a fraction
                ax.plot(mean.index, scale * mean[key], "o-", color=colour, label=method, lw=1.5, ms=4)
        for ax, key in zip(axes, keys):
            base, ts = key.removesuffix("_ts"), key.endswith("_ts")
            name = names.get(base, base) + (" after TS" if ts else "")
            ax.set(xlabel="severity (0 = clean)", ylabel=name + ("" if base == "nll" else " (%)"),
                   title=f"mean {name} over corruptions")
            ax.set_xticks(sorted(severities))
        axes[1].legend(fontsize="small")
        fig.tight_layout()
    return fig
