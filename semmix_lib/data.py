"""Datasets for the semmix study: loading, deterministic splits and fingerprints.

Every loader returns a :class:`DataSplits` whose datasets yield ``(float32 CHW tensor, int
label)`` and expose ``.targets``. Supported names are listed in :data:`DATASETS`:

* ``digits`` -- scikit-learn's embedded 8x8 digits with a fixed Gaussian pixel noise
  (no files needed, the default for quick runs and tests);
* ``cifar10`` / ``cifar100`` -- the official "python version" folders, read with a restricted
  unpickler (never plain ``pickle.load``);
* ``tiny-imagenet`` -- the standard ``tiny-imagenet-200`` layout, images loaded lazily;
* ``folder`` -- a user's own class-per-subfolder image tree.

Splits that we make ourselves are stratified by class, disjoint and deterministic given
``split_seed`` (see :func:`make_split` and :func:`holdout_per_class`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = [
    "DATASETS",
    "DataSplits",
    "ArrayDataset",
    "FileImageDataset",
    "DatasetNotFoundError",
    "load_dataset",
    "make_split",
    "holdout_per_class",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "tiny-imagenet", "folder")

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

FINGERPRINT_VERSION = 1

DIGITS_TEST_FRACTION = 0.25
DIGITS_VAL_FRACTION = 0.15

CIFAR_VAL_FRACTION = 0.1
# Normalisation used by the paper's code for both CIFAR-10 and CIFAR-100.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_PIXELS = 32 * 32 * 3

# Official archives (URL and md5 as in torchvision/datasets/cifar.py).
CIFAR_SPECS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "train_files": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_file": "test_batch",
        "meta_file": "batches.meta",
        "label_key": "labels",
        "names_key": "label_names",
        "num_classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "train_files": ("train",),
        "test_file": "test",
        "meta_file": "meta",
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "num_classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "archive": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}
CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"

TINY_FOLDER = "tiny-imagenet-200"
TINY_VAL_PER_CLASS = 50  # images per class held out of train/ for validation
TINY_SIZE = 64
# The commonly used Tiny-ImageNet channel statistics.
TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)

FOLDER_TEST_FRACTION = 0.2
FOLDER_VAL_FRACTION = 0.1
FOLDER_MEAN = (0.5, 0.5, 0.5)
FOLDER_STD = (0.5, 0.5, 0.5)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

Transform = Callable[[Any], torch.Tensor]


class DatasetNotFoundError(FileNotFoundError):
    """The data files are not where they should be; the message says what to put where."""


# ----------------------------------------------------------------------------------------------
# Dataset classes
# ----------------------------------------------------------------------------------------------


def _as_int_list(labels: Sequence[int] | np.ndarray) -> list[int]:
    """Return ``labels`` as a list of plain Python ints."""
    return [int(y) for y in np.asarray(labels).reshape(-1)]


class ArrayDataset(Dataset):
    """In-memory images (uint8 HWC numpy, or float tensors CHW) + int labels, optional transform.

    uint8 images are turned into PIL images before ``transform`` (so torchvision transforms
    apply); without a transform they become float tensors in [0, 1]. Float tensors are passed
    to ``transform`` as they are, or returned unchanged without one.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Sequence[int] | np.ndarray,
        transform: Transform | None = None,
    ) -> None:
        self.targets: list[int] = _as_int_list(labels)
        if len(images) != len(self.targets):
            raise ValueError(f"{len(images)} images but {len(self.targets)} labels")
        if isinstance(images, np.ndarray) and images.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 HWC, got dtype {images.dtype}")
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if isinstance(image, np.ndarray):
            return self._from_uint8(image), self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def _from_uint8(self, image: np.ndarray) -> torch.Tensor:
        """Convert one uint8 HWC image through PIL and the transform."""
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        pil = Image.fromarray(image)
        if self.transform is None:
            return T.functional.to_tensor(pil)
        return self.transform(pil)


class FileImageDataset(Dataset):
    """Images loaded lazily from files with PIL (converted to RGB) + int labels.

    If ``expected_size`` (width, height) is given, every loaded image must have that size;
    a different one raises ``ValueError`` naming the file (checked here rather than up front,
    because opening every file of a large folder at load time is slow).
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        transform: Transform | None = None,
        expected_size: tuple[int, int] | None = None,
        reference_file: str | None = None,
    ) -> None:
        self.paths = list(paths)
        self.targets: list[int] = _as_int_list(labels)
        if len(self.paths) != len(self.targets):
            raise ValueError(f"{len(self.paths)} files but {len(self.targets)} labels")
        self.transform = transform
        self.expected_size = expected_size
        self.reference_file = reference_file

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        """Open file ``index`` as an RGB PIL image, checking its size."""
        path = self.paths[index]
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        if self.expected_size is not None and rgb.size != self.expected_size:
            ref = f" (like {self.reference_file})" if self.reference_file else ""
            raise ValueError(
                f"image {path} has size {rgb.size[0]}x{rgb.size[1]} but all images must be "
                f"{self.expected_size[0]}x{self.expected_size[1]}{ref}; resize them first"
            )
        return rgb

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(index)
        tensor = self.transform(image) if self.transform is not None else T.functional.to_tensor(image)
        return tensor, self.targets[index]


@dataclass
class DataSplits:
    """A dataset's train/val/test splits and everything needed to describe them."""

    name: str
    train: Dataset
    train_plain: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> float:
    """Validate a split fraction in [0, 1)."""
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _allocate(class_sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Per-class counts summing to round(fraction * total), proportional to class sizes.

    Uses the largest-remainder method; ties go to the class listed first.
    """
    total = int(np.floor(fraction * class_sizes.sum() + 0.5))
    quotas = class_sizes * fraction
    counts = np.floor(quotas).astype(np.int64)
    missing = total - int(counts.sum())
    if missing > 0:
        order = np.argsort(-(quotas - counts), kind="stable")
        counts[order[:missing]] += 1
    return counts


def _check_class_counts(
    classes: np.ndarray, sizes: np.ndarray, n_val: np.ndarray, n_test: np.ndarray,
    val_fraction: float, test_fraction: float,
) -> None:
    """Raise if a class cannot appear in every requested split (train always requested)."""
    for cls, size, nv, nt in zip(classes, sizes, n_val, n_test):
        too_small = size - nv - nt < 1 or (val_fraction > 0 and nv < 1) or (test_fraction > 0 and nt < 1)
        if too_small:
            raise ValueError(
                f"class {cls} has only {size} sample(s): too few to split into train/val/test "
                f"with val_fraction={val_fraction}, test_fraction={test_fraction} "
                f"(it would get {size - nv - nt}/{nv}/{nt}); add images or change the fractions"
            )


def make_split(
    labels: Sequence[int] | np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, deterministic train/val/test split of indices ``0..len(labels)-1``.

    Both fractions are of the whole set: the test split has ``round(test_fraction * n)`` items
    and the val split ``round(val_fraction * n)``, spread over the classes in proportion to
    their sizes; the rest is train. Within each class the indices are shuffled with
    ``numpy.random.default_rng(seed)``; the test items are taken first, so the test split does
    not depend on ``val_fraction``. Returns three sorted int64 arrays. A class too small to
    appear in every requested split raises ``ValueError``.
    """
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    y = np.asarray(labels).reshape(-1)
    if y.size == 0:
        raise ValueError("cannot split an empty dataset")
    classes, sizes = np.unique(y, return_counts=True)
    n_test = _allocate(sizes, test_fraction)
    n_val = _allocate(sizes, val_fraction)
    _check_class_counts(classes, sizes, n_val, n_test, val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for cls, nv, nt in zip(classes, n_val, n_test):
        members = rng.permutation(np.flatnonzero(y == cls))
        parts[2].append(members[:nt])
        parts[1].append(members[nt:nt + nv])
        parts[0].append(members[nt + nv:])
    train, val, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return train, val, test


def holdout_per_class(
    labels: Sequence[int] | np.ndarray, n_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out exactly ``n_per_class`` random items of every class (deterministic in ``seed``).

    Returns ``(keep_idx, holdout_idx)``, sorted int64 arrays. Every class must have more than
    ``n_per_class`` items, otherwise ``ValueError`` names the class.
    """
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    y = np.asarray(labels).reshape(-1)
    classes, sizes = np.unique(y, return_counts=True)
    for cls, size in zip(classes, sizes):
        if size <= n_per_class:
            raise ValueError(
                f"class {cls} has only {size} item(s): cannot hold out {n_per_class} and keep "
                f"at least one for training"
            )
    rng = np.random.default_rng(seed)
    keep, hold = [], []
    for cls in classes:
        members = rng.permutation(np.flatnonzero(y == cls))
        hold.append(members[:n_per_class])
        keep.append(members[n_per_class:])
    return (np.sort(np.concatenate(keep)).astype(np.int64),
            np.sort(np.concatenate(hold)).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Fingerprints and file helpers
# ----------------------------------------------------------------------------------------------


def _fingerprint(payload: dict[str, Any]) -> str:
    """sha256 hex of a canonical JSON encoding of ``payload``."""
    body = json.dumps({"version": FINGERPRINT_VERSION, **payload}, sort_keys=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _listing_hash(base: str, paths: Sequence[str]) -> str:
    """sha256 over (path relative to ``base``, size in bytes) of each file, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        digest.update(f"{rel}\t{os.path.getsize(path)}\n".encode("utf-8"))
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    """sha256 hex of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_image_file(name: str) -> bool:
    """True for names ending in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _need_root(name: str, root: str | os.PathLike | None, what: str) -> str:
    """Return ``root`` as a string or explain that a data folder must be passed."""
    if root is None:
        raise DatasetNotFoundError(
            f"dataset {name!r} is read from files: pass data_root (the `root` argument of "
            f"load_dataset), the folder that holds {what}"
        )
    return os.fspath(root)


def _reject_fractions(name: str, **given: float | None) -> None:
    """Raise ``ValueError`` for split fractions a dataset does not accept."""
    bad = [key for key, value in given.items() if value is not None]
    if bad:
        raise ValueError(f"{name}: {', '.join(bad)} cannot be set for this dataset (its split is fixed)")


def _normalize(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Transform]:
    """ToTensor + Normalize."""
    return [T.ToTensor(), T.Normalize(mean, std)]


def _image_transforms(
    size: tuple[int, int], padding: int, mean: tuple[float, ...], std: tuple[float, ...], augment: bool
) -> tuple[Transform, Transform]:
    """(train transform, eval transform): random crop + flip for train when ``augment``."""
    eval_tf = T.Compose(_normalize(mean, std))
    if not augment:
        return eval_tf, eval_tf
    train_tf = T.Compose(
        [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip(), *_normalize(mean, std)]
    )
    return train_tf, eval_tf


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def to_uint8(x) -> np.ndarray:
    """The paper's pixel conversion from [-1, 1]: ``uint8(clip(x * 127.5 + 128, 0, 255))`` (truncating)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.clip(x.astype(np.float64) * 127.5 + 128, 0, 255).astype(np.uint8)


def from_uint8(pixels) -> np.ndarray:
    """8-bit pixels back to [-1, 1] (what ``ToTensor`` + ``Normalize(0.5, 0.5)`` give)."""
    return np.asarray(pixels).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _digits_arrays(noise_sigma: float, noise_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits in [-1, 1] plus the fixed Gaussian noise, stored as 8-bit images (float32 (N, 1, 8, 8)).

    The noisy digits are clipped and quantised with the same conversion the generator's PNGs go
    through (:func:`to_uint8`), so real and generated images live in one 8-bit image domain.
    """
    from sklearn.datasets import load_digits

    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    bunch = load_digits()
    pixels = bunch.data.astype(np.float64) / 16.0 * 2.0 - 1.0
    if noise_sigma > 0:
        rng = np.random.default_rng(noise_seed)
        pixels = pixels + noise_sigma * rng.standard_normal(pixels.shape)
    images = from_uint8(to_uint8(pixels)).reshape(-1, 1, 8, 8)
    return images, bunch.target.astype(np.int64)


def _load_digits(split_seed: int, val_fraction: float | None, test_fraction: float | None,
                 noise_sigma: float, noise_seed: int) -> DataSplits:
    """The embedded scikit-learn digits with fixed pixel noise (no augmentation)."""
    val_fraction = DIGITS_VAL_FRACTION if val_fraction is None else val_fraction
    test_fraction = DIGITS_TEST_FRACTION if test_fraction is None else test_fraction
    images, labels = _digits_arrays(noise_sigma, noise_seed)
    train_idx, val_idx, test_idx = make_split(labels, val_fraction, test_fraction, split_seed)
    tensors = torch.from_numpy(images)
    content = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()

    def subset(idx: np.ndarray) -> ArrayDataset:
        return ArrayDataset(tensors[torch.from_numpy(idx)], labels[idx])

    train = subset(train_idx)
    return DataSplits(
        name="digits", train=train, train_plain=ArrayDataset(train.images, train.targets),
        val=subset(val_idx), test=subset(test_idx), num_classes=10,
        class_names=[str(i) for i in range(10)], image_shape=(1, 8, 8), mean=(0.5,), std=(0.5,),
        fingerprint=_fingerprint({
            "name": "digits", "split_seed": split_seed, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "noise_sigma": float(noise_sigma),
            "noise_seed": noise_seed, "content_sha256": content,
        }),
    )


# ----------------------------------------------------------------------------------------------
# CIFAR (restricted unpickling)
# ----------------------------------------------------------------------------------------------

# The CIFAR "python version" files are pickles. Plain pickle.load runs whatever callables a
# file names, so a tampered file could execute arbitrary code. This unpickler only resolves
# the few globals needed to rebuild numpy arrays/dtypes/scalars (under their numpy 1.x and 2.x
# module names) plus ``_codecs.encode``, which Python 3 uses for bytes in protocol-2 pickles.
# Anything else raises pickle.UnpicklingError naming the global.
_SAFE_GLOBALS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("numpy.core.multiarray", "_reconstruct"): (("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): (("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): (("numpy._core.multiarray", "numpy.core.multiarray"), "scalar"),
    ("numpy._core.multiarray", "scalar"): (("numpy._core.multiarray", "numpy.core.multiarray"), "scalar"),
    ("numpy.core.numeric", "_frombuffer"): (("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): (("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer"),
    ("numpy", "ndarray"): (("numpy",), "ndarray"),
    ("numpy", "dtype"): (("numpy",), "dtype"),
    ("_codecs", "encode"): (("_codecs",), "encode"),
}


def _resolve_safe_global(modules: tuple[str, ...], name: str) -> Any:
    """Return ``name`` from the first of ``modules`` that imports and defines it."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot resolve allowed global {name} in {modules}")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except those needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see class docstring
        target = _SAFE_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy array globals are "
                f"allowed in dataset files"
            )
        return _resolve_safe_global(*target)


def safe_unpickle(path: str) -> Any:
    """Load a pickle file with :class:`_RestrictedUnpickler`.

    ``encoding="latin1"`` lets Python-2 pickles (like the official CIFAR files) load: their
    byte strings, including the raw array buffers, are decoded 1:1 into str and numpy turns
    them back into bytes.
    """
    with open(path, "rb") as handle:
        return _RestrictedUnpickler(handle, encoding="latin1").load()


def _key(record: dict, key: str, path: str) -> Any:
    """``record[key]`` where the pickled key may be str or bytes; ValueError if missing."""
    for candidate in (key, key.encode("latin1")):
        if candidate in record:
            return record[candidate]
    found = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in record)
    raise ValueError(f"{path}: missing key {key!r} (found keys {found})")


def _read_cifar_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file into uint8 HWC images (N, 32, 32, 3) and int64 labels."""
    record = safe_unpickle(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(record).__name__}")
    data = _key(record, "data", path)
    labels = np.asarray(_key(record, label_key, path))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        shape = getattr(data, "shape", type(data).__name__)
        raise ValueError(f"{path}: 'data' must be an (N, {CIFAR_PIXELS}) uint8 array, got {shape}")
    if data.dtype != np.uint8:
        raise ValueError(f"{path}: 'data' must have dtype uint8, got {data.dtype}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {label_key!r} must be {data.shape[0]} ints, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def _read_cifar_names(path: str, names_key: str, num_classes: int) -> list[str]:
    """Class names from a CIFAR meta file."""
    record = safe_unpickle(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(record).__name__}")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in _key(record, names_key, path)]
    if len(names) != num_classes:
        raise ValueError(f"{path}: expected {num_classes} names in {names_key!r}, got {len(names)}")
    return names


def _cifar_required(spec: dict[str, Any]) -> list[str]:
    """File names that must exist in a CIFAR folder."""
    return [*spec["train_files"], spec["test_file"], spec["meta_file"]]


def _cifar_missing(folder: str, spec: dict[str, Any]) -> list[str]:
    """Required CIFAR files absent from ``folder``."""
    return [f for f in _cifar_required(spec) if not os.path.isfile(os.path.join(folder, f))]


def _cifar_not_found(root: str, folder: str, spec: dict[str, Any], missing: list[str]) -> DatasetNotFoundError:
    """Explain where the CIFAR files go and how to get them."""
    return DatasetNotFoundError(
        f"{spec['title']} not found: expected the folder {folder}{os.sep} containing "
        f"{', '.join(_cifar_required(spec))} (missing: {', '.join(missing)}). Download the "
        f"'python version' archive {spec['archive']} from {CIFAR_PAGE} and extract it under "
        f"{root}, or pass download=True on a machine with internet access."
    )


def _ensure_cifar(root: str, spec: dict[str, Any], download: bool) -> str:
    """Return the CIFAR folder, downloading it first if asked; raise if it is incomplete."""
    folder = os.path.join(root, spec["folder"])
    missing = _cifar_missing(folder, spec)
    if missing and download:
        # torchvision is used for downloading only (it checks the md5 and extracts the archive).
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(spec["url"], root, filename=spec["archive"], md5=spec["md5"])
        missing = _cifar_missing(folder, spec)
    if missing:
        raise _cifar_not_found(root, folder, spec, missing)
    return folder


def _folder_listing(folder: str) -> list[list[Any]]:
    """Sorted (file name, size) of the regular files directly in ``folder``."""
    entries = [e for e in os.scandir(folder) if e.is_file()]
    return sorted([e.name, e.stat().st_size] for e in entries)


def _load_cifar(name: str, root: str | os.PathLike | None, split_seed: int, val_fraction: float | None,
                test_fraction: float | None, download: bool, augment: bool) -> DataSplits:
    """CIFAR-10/100 from the official python-version folder."""
    spec = CIFAR_SPECS[name]
    if test_fraction is not None:
        raise ValueError(f"{name}: test_fraction cannot be set, the test split is the official test batch")
    val_fraction = CIFAR_VAL_FRACTION if val_fraction is None else val_fraction
    root = _need_root(name, root, f"{spec['folder']}/")
    folder = _ensure_cifar(root, spec, download)
    n_cls = spec["num_classes"]
    class_names = _read_cifar_names(os.path.join(folder, spec["meta_file"]), spec["names_key"], n_cls)
    batches = [_read_cifar_batch(os.path.join(folder, f), spec["label_key"], n_cls) for f in spec["train_files"]]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    del batches
    test_images, test_labels = _read_cifar_batch(os.path.join(folder, spec["test_file"]), spec["label_key"], n_cls)
    train_idx, val_idx, _ = make_split(labels, val_fraction, 0.0, split_seed)
    train_tf, eval_tf = _image_transforms((32, 32), 4, CIFAR_MEAN, CIFAR_STD, augment)
    train_images = images[train_idx]  # shared by train and train_plain
    return DataSplits(
        name=name,
        train=ArrayDataset(train_images, labels[train_idx], train_tf),
        train_plain=ArrayDataset(train_images, labels[train_idx], eval_tf),
        val=ArrayDataset(images[val_idx], labels[val_idx], eval_tf),
        test=ArrayDataset(test_images, test_labels, eval_tf),
        num_classes=n_cls, class_names=class_names, image_shape=(3, 32, 32),
        mean=CIFAR_MEAN, std=CIFAR_STD,
        fingerprint=_fingerprint({
            "name": name, "split_seed": split_seed, "val_fraction": val_fraction,
            "test": "official", "files": _folder_listing(folder),
        }),
    )


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ----------------------------------------------------------------------------------------------


def _read_lines(path: str) -> list[str]:
    """Non-empty stripped lines of a text file."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _tiny_class_names(base: str, wnids: list[str]) -> list[str]:
    """words.txt names for ``wnids`` when the file exists (falling back to the wnid)."""
    path = os.path.join(base, "words.txt")
    if not os.path.isfile(path):
        return list(wnids)
    words: dict[str, str] = {}
    for line in _read_lines(path):
        wnid, _, text = line.partition("\t")
        words[wnid.strip()] = text.strip()
    return [words.get(w) or w for w in wnids]


def _tiny_not_found(base: str, what: str) -> DatasetNotFoundError:
    """Explain the expected Tiny-ImageNet layout."""
    return DatasetNotFoundError(
        f"Tiny-ImageNet: {what}. Expected the standard layout {base}{os.sep} with wnids.txt, "
        f"words.txt (optional), train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
        f"val/val_annotations.txt (extract tiny-imagenet-200.zip under the data root)"
    )


def _tiny_train_files(base: str, wnids: list[str]) -> tuple[list[str], list[int]]:
    """Image paths and labels of train/<wnid>/images for every class."""
    paths: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = os.path.join(base, "train", wnid, "images")
        if not os.path.isdir(folder):
            raise _tiny_not_found(base, f"missing training folder {folder}")
        files = sorted(f for f in os.listdir(folder) if _is_image_file(f))
        if not files:
            raise ValueError(f"Tiny-ImageNet: no images in {folder}")
        paths.extend(os.path.join(folder, f) for f in files)
        labels.extend([label] * len(files))
    return paths, labels


def _tiny_test_files(base: str, wnid_index: dict[str, int]) -> tuple[list[str], list[int]]:
    """Official val images and labels from val/val_annotations.txt."""
    ann = os.path.join(base, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise _tiny_not_found(base, f"missing {ann}")
    paths: list[str] = []
    labels: list[int] = []
    for line_no, line in enumerate(_read_lines(ann), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in wnid_index:
            raise ValueError(f"{ann} line {line_no}: expected '<file>\\t<wnid>\\t...' with a wnid from wnids.txt, got {line!r}")
        paths.append(os.path.join(base, "val", "images", fields[0]))
        labels.append(wnid_index[fields[1]])
    return paths, labels


def _load_tiny(root: str | os.PathLike | None, split_seed: int, val_fraction: float | None,
               test_fraction: float | None, augment: bool) -> DataSplits:
    """Tiny-ImageNet: train minus 50/class for val; the official val set as test."""
    _reject_fractions("tiny-imagenet", val_fraction=val_fraction, test_fraction=test_fraction)
    root = _need_root("tiny-imagenet", root, f"{TINY_FOLDER}/")
    base = os.path.join(root, TINY_FOLDER)
    if not os.path.isdir(base):
        raise _tiny_not_found(base, f"folder {base} not found")
    wnids_path = os.path.join(base, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise _tiny_not_found(base, f"missing {wnids_path}")
    # Sorted wnids, so class indices match torchvision's ImageFolder on train/.
    wnids = sorted(set(_read_lines(wnids_path)))
    train_paths, train_labels = _tiny_train_files(base, wnids)
    test_paths, test_labels = _tiny_test_files(base, {w: i for i, w in enumerate(wnids)})
    keep, hold = holdout_per_class(train_labels, TINY_VAL_PER_CLASS, split_seed)
    train_tf, eval_tf = _image_transforms((TINY_SIZE, TINY_SIZE), 4, TINY_MEAN, TINY_STD, augment)
    size = (TINY_SIZE, TINY_SIZE)

    def files(idx: np.ndarray, transform: Transform) -> FileImageDataset:
        return FileImageDataset([train_paths[i] for i in idx], [train_labels[i] for i in idx], transform, size)

    listing = _listing_hash(base, train_paths + test_paths)
    return DataSplits(
        name="tiny-imagenet", train=files(keep, train_tf), train_plain=files(keep, eval_tf),
        val=files(hold, eval_tf), test=FileImageDataset(test_paths, test_labels, eval_tf, size),
        num_classes=len(wnids), class_names=_tiny_class_names(base, wnids),
        image_shape=(3, TINY_SIZE, TINY_SIZE), mean=TINY_MEAN, std=TINY_STD,
        fingerprint=_fingerprint({
            "name": "tiny-imagenet", "split_seed": split_seed, "val_per_class": TINY_VAL_PER_CLASS,
            "wnids": wnids, "files_sha256": listing,
            "annotations_sha256": _file_sha256(os.path.join(base, "val", "val_annotations.txt")),
        }),
    )


# ----------------------------------------------------------------------------------------------
# Class-per-subfolder images
# ----------------------------------------------------------------------------------------------


def _class_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively, hidden entries skipped), in sorted order."""
    found: list[str] = []
    for current, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(current, n) for n in sorted(names) if _is_image_file(n))
    return found


def _scan_image_folder(root: str) -> tuple[list[str], list[str], list[int]]:
    """(class names, file paths, labels) of a class-per-subfolder tree."""
    if not os.path.isdir(root):
        raise DatasetNotFoundError(
            f"image folder {root} not found: expected {root}{os.sep}<class_name>{os.sep}*.png|jpg|jpeg|bmp|webp"
        )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root}: need at least 2 class subfolders, found {len(classes)} ({classes})")
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = _class_files(os.path.join(root, cls))
        if not files:
            raise ValueError(
                f"class folder {os.path.join(root, cls)} has no images "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    return classes, paths, labels


def _load_folder(root: str | os.PathLike | None, split_seed: int, val_fraction: float | None,
                 test_fraction: float | None, augment: bool) -> DataSplits:
    """A user's class-per-subfolder image tree; all images must share one size."""
    root = _need_root("folder", root, "one subfolder of images per class")
    val_fraction = FOLDER_VAL_FRACTION if val_fraction is None else val_fraction
    test_fraction = FOLDER_TEST_FRACTION if test_fraction is None else test_fraction
    classes, paths, labels = _scan_image_folder(root)
    with Image.open(paths[0]) as first:
        width, height = first.convert("RGB").size
    train_idx, val_idx, test_idx = make_split(labels, val_fraction, test_fraction, split_seed)
    train_tf, eval_tf = _image_transforms((height, width), height // 8, FOLDER_MEAN, FOLDER_STD, augment)

    def files(idx: np.ndarray, transform: Transform) -> FileImageDataset:
        return FileImageDataset([paths[i] for i in idx], [labels[i] for i in idx], transform,
                                (width, height), paths[0])

    return DataSplits(
        name="folder", train=files(train_idx, train_tf), train_plain=files(train_idx, eval_tf),
        val=files(val_idx, eval_tf), test=files(test_idx, eval_tf), num_classes=len(classes),
        class_names=classes, image_shape=(3, height, width), mean=FOLDER_MEAN, std=FOLDER_STD,
        fingerprint=_fingerprint({
            "name": "folder", "split_seed": split_seed, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "classes": classes, "files_sha256": _listing_hash(root, paths),
        }),
    )


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    split_seed: int = 0,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    noise_sigma: float = 0.5,
    noise_seed: int = 1234,
    download: bool = False,
    augment: bool = True,
) -> DataSplits:
    """Load dataset ``name`` (one of :data:`DATASETS`) with deterministic splits.

    ``root`` is the data folder (unused for ``digits``). ``val_fraction``/``test_fraction``
    are fractions of the whole set for ``digits`` (defaults 0.15/0.25) and ``folder``
    (0.1/0.2); for CIFAR ``val_fraction`` is taken from the training set (default 0.1) and
    ``test_fraction`` must stay None (official test batch); Tiny-ImageNet accepts neither
    (50 training images per class are held out). ``noise_sigma``/``noise_seed`` only apply to
    ``digits``; ``download`` only to CIFAR; ``augment`` (random crop + flip on ``train``) has
    no effect on ``digits``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if name == "digits":
        return _load_digits(split_seed, val_fraction, test_fraction, noise_sigma, noise_seed)
    if name in CIFAR_SPECS:
        return _load_cifar(name, root, split_seed, val_fraction, test_fraction, download, augment)
    if name == "tiny-imagenet":
        return _load_tiny(root, split_seed, val_fraction, test_fraction, augment)
    return _load_folder(root, split_seed, val_fraction, test_fraction, augment)
