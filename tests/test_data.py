"""Tests for semmix_lib.data: splits, digits, CIFAR (restricted unpickling), Tiny-ImageNet, folder."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from semmix_lib.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    TINY_VAL_PER_CLASS,
    ArrayDataset,
    DatasetNotFoundError,
    holdout_per_class,
    load_dataset,
    make_split,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _all_targets(splits) -> list[int]:
    return list(splits.train.targets) + list(splits.val.targets) + list(splits.test.targets)


def _stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _fake_pixels(n: int, offset: int) -> np.ndarray:
    """Deterministic uint8 (n, 3072) CIFAR rows; row i has pixel value (offset + i) % 256 at [0]."""
    rng = np.random.default_rng(offset)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = (offset + np.arange(n)) % 256  # channel R, row 0, column 0
    return data


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(i + b) % 10 for i in range(per_batch)]
        _dump(folder / f"data_batch_{b}", {"batch_label": "b", "data": _fake_pixels(per_batch, 10 * b), "labels": labels})
    _dump(folder / "test_batch", {"data": _fake_pixels(n_test, 200), "labels": [i % 10 for i in range(n_test)]})
    _dump(folder / "batches.meta", {"label_names": [f"c10_{i}" for i in range(10)], "num_vis": 3072})
    return folder


class _Evil:
    """Pickles to a call of os.system when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------------
# make_split / holdout_per_class
# ----------------------------------------------------------------------------------------------


def test_make_split_sizes_disjoint_sorted_stratified():
    labels = np.repeat(np.arange(4), [40, 60, 100, 200])
    train, val, test = make_split(labels, 0.1, 0.2, seed=3)
    assert (len(train), len(val), len(test)) == (280, 40, 80)
    together = np.concatenate([train, val, test])
    assert sorted(together.tolist()) == list(range(400))
    for part in (train, val, test):
        assert np.all(np.diff(part) > 0)
    assert np.bincount(labels[val]).tolist() == [4, 6, 10, 20]
    assert np.bincount(labels[test]).tolist() == [8, 12, 20, 40]


def test_make_split_deterministic_and_seeded():
    labels = np.repeat(np.arange(3), 30)
    a = make_split(labels, 0.2, 0.2, seed=0)
    b = make_split(labels, 0.2, 0.2, seed=0)
    c = make_split(labels, 0.2, 0.2, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2])


def test_make_split_test_independent_of_val_fraction():
    labels = np.repeat(np.arange(3), 30)
    assert np.array_equal(make_split(labels, 0.1, 0.2, 5)[2], make_split(labels, 0.3, 0.2, 5)[2])


def test_make_split_small_class_and_bad_fractions():
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(ValueError, match="class 1 has only 2"):
        make_split(labels, 0.1, 0.2, seed=0)
    with pytest.raises(ValueError):
        make_split(np.repeat([0, 1], 10), 0.6, 0.5, seed=0)
    with pytest.raises(ValueError):
        make_split(np.repeat([0, 1], 10), -0.1, 0.2, seed=0)


def test_holdout_per_class():
    labels = np.repeat(np.arange(3), [10, 12, 7])
    keep, hold = holdout_per_class(labels, 5, seed=0)
    assert np.bincount(labels[hold]).tolist() == [5, 5, 5]
    assert np.bincount(labels[keep]).tolist() == [5, 7, 2]
    assert set(keep.tolist()).isdisjoint(hold.tolist())
    assert len(keep) + len(hold) == len(labels)
    assert np.array_equal(hold, holdout_per_class(labels, 5, seed=0)[1])
    assert not np.array_equal(hold, holdout_per_class(labels, 5, seed=1)[1])
    with pytest.raises(ValueError, match="class 2 has only 7"):
        holdout_per_class(labels, 7, seed=0)


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def clean_digits():
    return load_dataset("digits", noise_sigma=0.0)


def test_digits_sizes_and_metadata(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1078, 270, 449)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert digits.num_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    assert digits.image_shape == (1, 8, 8)
    assert (digits.mean, digits.std) == ((0.5,), (0.5,))  # tensors in [-1, 1], like Normalize(0.5, 0.5)
    image, label = digits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert isinstance(label, int) and label == digits.train.targets[0]
    assert len(digits.fingerprint) == 64


def test_digits_splits_disjoint_and_stratified(digits, clean_digits):
    # identify images through the clean tensors (same split seed -> same indices)
    from sklearn.datasets import load_digits

    from semmix_lib.data import from_uint8, to_uint8

    raw = torch.from_numpy(from_uint8(to_uint8(load_digits().data / 16.0 * 2 - 1))).reshape(-1, 1, 8, 8)
    keys = {raw[i].numpy().tobytes(): i for i in range(len(raw))}
    assert len(keys) > 1700  # nearly all digit images are distinct
    parts = [_stack(getattr(clean_digits, s)) for s in ("train", "val", "test")]
    seen = [{keys[x.numpy().tobytes()] for x in p} for p in parts]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for split, share in ((digits.val, 0.15), (digits.test, 0.25)):
        counts = np.bincount(split.targets, minlength=10)
        assert counts.min() > 0
        totals = np.bincount(_all_targets(digits), minlength=10)
        assert np.allclose(counts / totals, share, atol=0.01)


def test_digits_deterministic_and_seeded(digits):
    again = load_dataset("digits")
    assert torch.equal(_stack(digits.test), _stack(again.test))
    assert digits.test.targets == again.test.targets
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(_stack(digits.test), _stack(other.test))


def test_digits_clean_range_and_noise(digits, clean_digits):
    clean = _stack(clean_digits.train)
    assert clean.min().item() == -1.0 and clean.max().item() == 1.0
    noisy = _stack(digits.train)
    assert noisy.min().item() == -1.0 and noisy.max().item() == 1.0  # clipped to the 8-bit range
    levels = (noisy + 1) * 127.5
    assert torch.allclose(levels, torch.round(levels), atol=1e-4)  # on the 8-bit grid
    diff = noisy - clean
    # mid-grey pixels are rarely clipped: there the noise keeps its full sigma of 0.5
    mid = clean.abs() < 0.3
    assert abs(diff[mid].std().item() - 0.5) < 0.05
    assert 0.3 < diff.std().item() < 0.5  # overall less: clipping at -1 / 1 halves it on the background
    assert digits.train.targets == clean_digits.train.targets


def test_digits_fingerprint(digits, clean_digits):
    assert load_dataset("digits").fingerprint == digits.fingerprint
    assert clean_digits.fingerprint != digits.fingerprint
    assert load_dataset("digits", split_seed=1).fingerprint != digits.fingerprint
    assert load_dataset("digits", noise_seed=7).fingerprint != digits.fingerprint
    assert load_dataset("digits", val_fraction=0.2).fingerprint != digits.fingerprint


def test_digits_augment_has_no_effect(digits):
    plain = load_dataset("digits", augment=False)
    assert torch.equal(_stack(plain.train), _stack(digits.train))
    assert torch.equal(_stack(digits.train_plain), _stack(digits.train))


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------


def test_cifar10_fake_folder(tmp_path):
    _write_cifar10(tmp_path)
    splits = load_dataset("cifar10", str(tmp_path))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
    assert len(splits.train_plain) == 90 and splits.train_plain.targets == splits.train.targets
    assert np.bincount(splits.val.targets, minlength=10).tolist() == [1] * 10
    assert splits.class_names == [f"c10_{i}" for i in range(10)]
    assert splits.num_classes == 10 and splits.image_shape == (3, 32, 32)
    assert (splits.mean, splits.std) == (CIFAR_MEAN, CIFAR_STD)
    # test image i: label i % 10, pixel R(0, 0) == (200 + i) % 256
    for i in (0, 7, 19):
        image, label = splits.test[i]
        assert label == i % 10
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        expected = ((200 + i) % 256 / 255.0 - CIFAR_MEAN[0]) / CIFAR_STD[0]
        assert image[0, 0, 0].item() == pytest.approx(expected, abs=1e-5)
    # a full image round-trips: CHW reshape of the row, then ToTensor + Normalize
    row = _fake_pixels(20, 200)[3].reshape(3, 32, 32).astype(np.float32) / 255.0
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    assert torch.allclose(splits.test[3][0], (torch.from_numpy(row) - mean) / std, atol=1e-5)


def test_cifar10_split_seed_and_fingerprint(tmp_path):
    _write_cifar10(tmp_path)
    a = load_dataset("cifar10", tmp_path)
    b = load_dataset("cifar10", tmp_path)
    c = load_dataset("cifar10", tmp_path, split_seed=1)
    assert torch.equal(_stack(a.val), _stack(b.val)) and a.fingerprint == b.fingerprint
    assert not torch.equal(_stack(a.val), _stack(c.val)) and a.fingerprint != c.fingerprint
    d = load_dataset("cifar10", tmp_path, val_fraction=0.2)
    assert len(d.val) == 20 and d.fingerprint != a.fingerprint
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("cifar10", tmp_path, test_fraction=0.1)


def test_cifar10_augmentation_flags(tmp_path):
    _write_cifar10(tmp_path)
    aug = load_dataset("cifar10", tmp_path)
    kinds = [type(t) for t in aug.train.transform.transforms]
    assert kinds[:2] == [T.RandomCrop, T.RandomHorizontalFlip]
    assert aug.train.transform.transforms[0].padding == 4
    assert all(type(t) in (T.ToTensor, T.Normalize) for t in aug.val.transform.transforms)
    assert all(type(t) in (T.ToTensor, T.Normalize) for t in aug.train_plain.transform.transforms)
    torch.manual_seed(0)
    draws = [aug.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crop/flip
    assert torch.equal(aug.train_plain[0][0], aug.train_plain[0][0])
    plain = load_dataset("cifar10", tmp_path, augment=False)
    assert torch.equal(plain.train[0][0], aug.train_plain[0][0])


def test_cifar100_fake_folder_with_bytes_keys(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    n_train, n_test = 60, 12
    # bytes keys, as in the official Python-2 files; labels use classes 0..5 of 100
    _dump(folder / "train", {b"data": _fake_pixels(n_train, 1), b"fine_labels": [i % 6 for i in range(n_train)],
                              b"coarse_labels": [0] * n_train})
    _dump(folder / "test", {b"data": _fake_pixels(n_test, 50), b"fine_labels": [(i * 7) % 100 for i in range(n_test)]})
    _dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                             b"coarse_label_names": [b"x"] * 20})
    splits = load_dataset("cifar100", tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54, 6, 12)
    assert splits.num_classes == 100
    assert splits.class_names[:2] == ["fine0", "fine1"] and splits.class_names[99] == "fine99"
    assert splits.test.targets == [(i * 7) % 100 for i in range(n_test)]
    assert sorted(splits.val.targets) == list(range(6))
    image, _ = splits.test[5]
    assert image[0, 0, 0].item() == pytest.approx(((50 + 5) / 255.0 - CIFAR_MEAN[0]) / CIFAR_STD[0], abs=1e-5)


def test_cifar_protocol2_pickles_load(tmp_path):
    folder = _write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": _fake_pixels(20, 200), "labels": list(range(10)) * 2}, handle, protocol=2)
    assert load_dataset("cifar10", tmp_path).test.targets == list(range(10)) * 2


def test_cifar_malicious_pickle_is_refused(tmp_path):
    folder = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _dump(folder / "data_batch_1", _Evil(marker))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    # hidden inside the dict as well
    _dump(folder / "data_batch_1", {"data": _Evil(marker), "labels": [0]})
    with pytest.raises(pickle.UnpicklingError):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_bad_batch_names_file(tmp_path):
    folder = _write_cifar10(tmp_path)
    _dump(folder / "data_batch_2", {"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4})
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)
    _dump(folder / "data_batch_2", {"data": np.zeros((4, 3072), np.uint8)})
    with pytest.raises(ValueError, match="data_batch_2.*labels"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_5" in message and "test_batch" in message and "download=True" in message
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny-imagenet", "folder"])
def test_root_none_asks_for_data_root(name):
    with pytest.raises(DatasetNotFoundError, match="data_root"):
        load_dataset(name)


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet
# ----------------------------------------------------------------------------------------------

TINY_WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted in wnids.txt
TINY_TRAIN_PER_CLASS = 52


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def _write_tiny(root: Path) -> Path:
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby cat\nn99\tother\n")
    for k, wnid in enumerate(sorted(TINY_WNIDS)):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(TINY_TRAIN_PER_CLASS):
            _solid((80 * k, i, 0)).save(folder / f"{wnid}_{i}.JPEG")
    lines = []
    for i in range(7):
        wnid = sorted(TINY_WNIDS)[i % 3]
        _solid((0, 0, 10 * i)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


@pytest.fixture()
def tiny_root(tmp_path) -> Path:
    _write_tiny(tmp_path)
    return tmp_path


def test_tiny_imagenet_layout(tiny_root):
    splits = load_dataset("tiny-imagenet", tiny_root)
    assert TINY_VAL_PER_CLASS == 50
    extra = TINY_TRAIN_PER_CLASS - 50
    assert len(splits.val) == 150 and len(splits.train) == 3 * extra and len(splits.train_plain) == 3 * extra
    assert np.bincount(splits.val.targets).tolist() == [50, 50, 50]
    assert np.bincount(splits.train.targets).tolist() == [extra] * 3
    assert set(splits.train.paths).isdisjoint(splits.val.paths)
    assert splits.num_classes == 3 and splits.image_shape == (3, 64, 64)
    assert splits.class_names == ["goldfish, Carassius auratus", "tabby cat", "n03"]  # sorted wnids
    assert len(splits.test) == 7 and splits.test.targets == [i % 3 for i in range(7)]
    image, label = splits.test[4]
    assert image.shape == (3, 64, 64) and label == 1
    # solid blue 40 -> normalised with the Tiny-ImageNet statistics (JPEG is near-lossless on flat colour)
    assert image[2].mean().item() == pytest.approx((40 / 255 - 0.3975) / 0.2262, abs=0.05)
    # train images carry their class: red channel 80 * k for class k
    x, y = splits.train_plain[0]
    assert x[0].mean().item() == pytest.approx((80 * y / 255 - 0.4802) / 0.2302, abs=0.05)


def test_tiny_imagenet_seed_and_errors(tiny_root, tmp_path):
    a = load_dataset("tiny-imagenet", tiny_root)
    b = load_dataset("tiny-imagenet", tiny_root, split_seed=2)
    assert a.train.paths != b.train.paths and a.fingerprint != b.fingerprint
    assert load_dataset("tiny-imagenet", tiny_root).fingerprint == a.fingerprint
    assert T.RandomCrop in [type(t) for t in a.train.transform.transforms]
    with pytest.raises(ValueError):
        load_dataset("tiny-imagenet", tiny_root, val_fraction=0.1)
    with pytest.raises(ValueError):
        load_dataset("tiny-imagenet", tiny_root, test_fraction=0.1)
    (tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="val_annotations.txt"):
        load_dataset("tiny-imagenet", tiny_root)
    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200"):
        load_dataset("tiny-imagenet", tmp_path / "nowhere")


def test_tiny_imagenet_missing_wnids(tiny_root):
    (tiny_root / "tiny-imagenet-200" / "wnids.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="wnids.txt"):
        load_dataset("tiny-imagenet", tiny_root)


# ----------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------


def _write_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (16, 12)) -> None:
    for k, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            _solid((60 * k, 0, 0), size).save(root / cls / f"img_{i}.png")


def test_folder_splits_and_classes(tmp_path):
    _write_folder(tmp_path, {"zebra": 20, "ant": 10, "moose": 30})
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    splits = load_dataset("folder", tmp_path)
    assert splits.class_names == ["ant", "moose", "zebra"] and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (42, 6, 12)
    assert np.bincount(splits.test.targets).tolist() == [2, 6, 4]
    assert np.bincount(splits.val.targets).tolist() == [1, 3, 2]
    assert splits.image_shape == (3, 12, 16)
    image, label = splits.test[0]
    assert image.shape == (3, 12, 16)
    red = {0: 60, 1: 120, 2: 0}[label]  # ant was written second (60), moose third, zebra first
    assert image[0, 0, 0].item() == pytest.approx((red / 255 - 0.5) / 0.5, abs=1e-5)
    crop = splits.train.transform.transforms[0]
    assert isinstance(crop, T.RandomCrop) and crop.padding == 1 and tuple(crop.size) == (12, 16)
    all_paths = splits.train.paths + splits.val.paths + splits.test.paths
    assert len(set(all_paths)) == 60
    assert load_dataset("folder", tmp_path, split_seed=1).test.paths != splits.test.paths


def test_folder_errors(tmp_path):
    _write_folder(tmp_path, {"a": 10, "b": 10})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_dataset("folder", tmp_path)
    one = tmp_path / "one"
    _write_folder(one, {"only": 5})
    with pytest.raises(ValueError, match="at least 2"):
        load_dataset("folder", one)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("folder", tmp_path / "missing")


def test_folder_size_mismatch_raises_on_access(tmp_path):
    _write_folder(tmp_path, {"a": 10, "b": 10})
    _solid((0, 0, 0), (20, 20)).save(tmp_path / "b" / "img_9.png")
    splits = load_dataset("folder", tmp_path, val_fraction=0.0, test_fraction=0.0)
    index = splits.train.paths.index(str(tmp_path / "b" / "img_9.png"))
    with pytest.raises(ValueError, match="img_9.png"):
        splits.train[index]
    assert splits.train[0][0].shape == (3, 12, 16)


# ----------------------------------------------------------------------------------------------
# misc
# ----------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)
    assert DATASETS == ("digits", "cifar10", "cifar100", "tiny-imagenet", "folder")


def test_array_dataset_uint8_and_tensor():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    ds = ArrayDataset(images, np.array([1, 0]))
    assert ds.targets == [1, 0] and len(ds) == 2
    x, y = ds[1]
    assert y == 0 and x.shape == (3, 4, 4)
    assert x[2, 0, 1].item() == pytest.approx(images[1, 0, 1, 2] / 255.0)
    tensors = ArrayDataset(torch.zeros(3, 1, 2, 2), [0, 1, 2], transform=lambda t: t + 1)
    assert tensors[2][0].sum().item() == 4.0
    with pytest.raises(ValueError):
        ArrayDataset(np.zeros((2, 4, 4, 3), np.float32), [0, 1])
    with pytest.raises(ValueError):
        ArrayDataset(images, [0])
