"""Tests for semmix_lib.train: run folder contents, determinism, resume, refusal, best-by-val.

Everything trains ``small_cnn`` on the embedded digits (or a tiny synthetic set) for a few epochs
on the CPU, so the whole file takes seconds.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import semmix_lib.train as train_mod
from semmix_lib.calibration import TEMPERATURE_GRID
from semmix_lib.data import ArrayDataset, DataSplits, load_dataset
from semmix_lib.io import CheckpointError, load_checkpoint
from semmix_lib.metrics import REPORT_KEYS
from semmix_lib.runs import RunMismatchError
from semmix_lib.train import TrainConfig, load_run, train_run

EPOCHS = 4
# A milestone inside the run, so the scheduler state matters for resuming.
CFG = dict(model="small_cnn", epochs=EPOCHS, batch_size=64, lr=0.05, milestones=[2], seed=7)
HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_ece", "seconds"]


def make_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{**CFG, **overrides})


def run(splits, cfg, folder):
    return train_run(splits, cfg, folder, device="cpu", progress=False)


def read_history(folder) -> list[dict]:
    with open(Path(folder) / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def numbers(metrics: dict) -> dict:
    """metrics.json without its wall-clock time (the only field allowed to differ between runs)."""
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


class Interrupt:
    """Stands in for ``_train_epoch``: runs the real one, then raises KeyboardInterrupt on call ``stop_at``.

    Epoch ``stop_at - 1`` has by then finished and written ``last.pt``; epoch ``stop_at`` never starts.
    """

    def __init__(self, stop_at: int | None = None):
        self.real = train_mod._train_epoch
        self.stop_at = stop_at
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory):
    """One uninterrupted run, shared (read-only) by several tests."""
    folder = tmp_path_factory.mktemp("finished")
    metrics = run(digits, make_cfg(), folder)
    return folder, metrics


def tiny_splits(num_classes=4, channels=3, size=8, n=(40, 12, 16)) -> DataSplits:
    gen = torch.Generator().manual_seed(0)

    def part(count, offset):
        labels = (np.arange(count) + offset) % num_classes
        images = torch.randn(count, channels, size, size, generator=gen)
        images += torch.as_tensor(labels, dtype=torch.float32).view(-1, 1, 1, 1)  # learnable signal
        return ArrayDataset(images, labels)

    train, val, test = part(n[0], 0), part(n[1], 1), part(n[2], 2)
    return DataSplits(name="tiny", train=train, train_plain=train, val=val, test=test,
                      num_classes=num_classes, class_names=[str(i) for i in range(num_classes)],
                      image_shape=(channels, size, size), mean=(0.0,) * channels, std=(1.0,) * channels,
                      fingerprint="tiny-synthetic")


# ----------------------------------------------------------------------------------------------
# what a finished run leaves behind
# ----------------------------------------------------------------------------------------------


def test_finished_run_files(digits, finished):
    folder, metrics = finished
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["checkpoint.pt", "config.json", "history.csv", "logits.npz", "metrics.json"]
    assert not (folder / "last.pt").exists()

    config = json.loads((folder / "config.json").read_text())
    assert config == {**make_cfg().to_dict(), "data": digits.fingerprint}

    history = read_history(folder)
    assert len(history) == EPOCHS
    assert list(history[0]) == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in history] == list(range(1, EPOCHS + 1))
    # MultiStepLR with milestone 2, gamma 0.1: lr is 0.05 for epochs 1-2, 0.005 afterwards
    assert [float(r["lr"]) for r in history] == pytest.approx([0.05, 0.05, 0.005, 0.005])
    assert all(0.0 <= float(r["val_acc"]) <= 1.0 for r in history)
    seconds = [float(r["seconds"]) for r in history]
    assert seconds == sorted(seconds) and seconds[0] > 0

    logits = np.load(folder / "logits.npz", allow_pickle=False)
    assert sorted(logits.files) == ["test_labels", "test_logits", "val_labels", "val_logits"]
    assert logits["val_logits"].shape == (len(digits.val), 10)
    assert logits["test_logits"].shape == (len(digits.test), 10)
    assert logits["val_logits"].dtype == np.float32
    np.testing.assert_array_equal(logits["val_labels"], np.asarray(digits.val.targets))
    np.testing.assert_array_equal(logits["test_labels"], np.asarray(digits.test.targets))
    assert np.isfinite(logits["val_logits"]).all() and np.isfinite(logits["test_logits"]).all()

    saved = json.loads((folder / "metrics.json").read_text())
    assert saved == metrics  # the returned dict is what was written
    for section in ("test", "test_ts", "val"):
        assert set(saved[section]) == set(REPORT_KEYS)
        assert all(np.isfinite(saved[section][k]) for k in REPORT_KEYS)
    assert np.isclose(TEMPERATURE_GRID, saved["temperature"]).any()
    assert saved["ts_method"] == "grid-ece"
    assert (saved["method"], saved["model"], saved["seed"], saved["epochs"]) == ("ce", "small_cnn", 7, EPOCHS)
    assert (saved["n_train"], saved["n_val"], saved["n_test"]) == (len(digits.train), len(digits.val), len(digits.test))
    # the model learnt something in 4 epochs (10 classes: chance is 0.1)
    assert saved["test"]["acc"] > 0.5
    # temperature scaling only rescales the logits: the accuracy is unchanged
    assert saved["test_ts"]["acc"] == saved["test"]["acc"]
    # the reported metrics are those of the saved logits
    pred = logits["test_logits"].argmax(1)
    assert saved["test"]["acc"] == pytest.approx(np.mean(pred == logits["test_labels"]))

    loaded = load_run(folder)
    assert loaded["metrics"] == saved and loaded["config"] == config
    assert loaded["history"] == history
    np.testing.assert_array_equal(loaded["logits"]["test_logits"], logits["test_logits"])


def test_logits_come_from_the_best_checkpoint(digits, finished):
    folder, _ = finished
    model = train_mod.build_model("small_cnn", 10, in_channels=1, image_size=8)
    model.load_state_dict(load_checkpoint(folder / "checkpoint.pt"))
    val_logits, val_labels = train_mod.predict(model, digits.val)
    saved = np.load(folder / "logits.npz")
    np.testing.assert_array_equal(val_logits, saved["val_logits"])
    np.testing.assert_array_equal(val_labels, saved["val_labels"])


def test_synthetic_three_channel_splits(tmp_path):
    splits = tiny_splits()
    metrics = run(splits, make_cfg(epochs=2, batch_size=16), tmp_path)
    logits = np.load(tmp_path / "logits.npz")
    assert logits["val_logits"].shape == (12, 4) and logits["test_logits"].shape == (16, 4)
    np.testing.assert_array_equal(logits["val_labels"], splits.val.targets)
    np.testing.assert_array_equal(logits["test_labels"], splits.test.targets)
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (40, 12, 16)
    assert json.loads((tmp_path / "config.json").read_text())["data"] == "tiny-synthetic"
    assert len(read_history(tmp_path)) == 2


# ----------------------------------------------------------------------------------------------
# determinism and resuming
# ----------------------------------------------------------------------------------------------


def test_same_config_same_numbers(digits, finished, tmp_path):
    folder, _ = finished
    run(digits, make_cfg(), tmp_path)
    a, b = json.loads((folder / "metrics.json").read_text()), json.loads((tmp_path / "metrics.json").read_text())
    assert numbers(a) == numbers(b)
    la, lb = np.load(folder / "logits.npz"), np.load(tmp_path / "logits.npz")
    for key in la.files:
        np.testing.assert_array_equal(la[key], lb[key])
    assert without_seconds(read_history(folder)) == without_seconds(read_history(tmp_path))


def test_other_seed_other_numbers(digits, finished, tmp_path):
    # guards the determinism test against comparing two things that cannot differ
    folder, _ = finished
    run(digits, make_cfg(seed=8), tmp_path)
    la, lb = np.load(folder / "logits.npz"), np.load(tmp_path / "logits.npz")
    assert not np.array_equal(la["test_logits"], lb["test_logits"])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_resume_matches_uninterrupted_run(digits, finished, tmp_path, monkeypatch, k):
    reference, _ = finished
    interrupt = Interrupt(stop_at=k + 1)
    monkeypatch.setattr(train_mod, "_train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(digits, make_cfg(), tmp_path)
    assert interrupt.calls == k + 1
    assert not (tmp_path / "metrics.json").exists()
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == k and len(state["history"]) == k

    resumed = Interrupt()
    monkeypatch.setattr(train_mod, "_train_epoch", resumed)
    metrics = run(digits, make_cfg(), tmp_path)
    assert resumed.calls == EPOCHS - k  # only the missing epochs were trained
    assert not (tmp_path / "last.pt").exists()

    expected = json.loads((reference / "metrics.json").read_text())
    assert numbers(metrics) == numbers(expected)
    assert numbers(json.loads((tmp_path / "metrics.json").read_text())) == numbers(expected)
    la, lb = np.load(reference / "logits.npz"), np.load(tmp_path / "logits.npz")
    for key in la.files:
        np.testing.assert_array_equal(la[key], lb[key])
    assert without_seconds(read_history(tmp_path)) == without_seconds(read_history(reference))
    best_ref = load_checkpoint(reference / "checkpoint.pt")
    best_new = load_checkpoint(tmp_path / "checkpoint.pt")
    assert best_ref.keys() == best_new.keys()
    for name in best_ref:
        assert torch.equal(best_ref[name], best_new[name]), name


def test_finished_folder_is_returned_without_training(digits, finished, monkeypatch):
    folder, _ = finished
    before = snapshot(folder)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_mod, "_train_epoch", must_not_train)
    monkeypatch.setattr(train_mod, "build_model", must_not_train)
    metrics = run(digits, make_cfg(), folder)
    assert metrics == json.loads((folder / "metrics.json").read_text())
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------------------------
# refusing folders it must not touch
# ----------------------------------------------------------------------------------------------


def test_folder_with_other_settings_is_refused(digits, finished, monkeypatch):
    folder, _ = finished
    before = snapshot(folder)
    monkeypatch.setattr(train_mod, "_train_epoch", Interrupt(stop_at=1))  # would stop any training
    with pytest.raises(RunMismatchError, match="epochs") as info:
        run(digits, make_cfg(epochs=EPOCHS + 1), folder)
    assert "lr" not in str(info.value).split("differs in:")[1]
    assert snapshot(folder) == before

    with pytest.raises(RunMismatchError, match=r"lr, seed"):
        run(digits, make_cfg(lr=0.01, seed=1), folder)
    assert snapshot(folder) == before


def test_other_data_is_refused(digits, finished):
    folder, _ = finished
    before = snapshot(folder)
    with pytest.raises(RunMismatchError, match="data"):
        train_run(digits, make_cfg(), folder, device="cpu", progress=False, data_fingerprint="other-data")
    assert snapshot(folder) == before


def test_interrupted_folder_with_other_settings_is_refused(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "_train_epoch", Interrupt(stop_at=2))
    with pytest.raises(KeyboardInterrupt):
        run(digits, make_cfg(), tmp_path)
    before = snapshot(tmp_path)
    assert "last.pt" in before
    with pytest.raises(RunMismatchError, match="batch_size"):
        run(digits, make_cfg(batch_size=32), tmp_path)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_truncated_last_checkpoint(digits, tmp_path, monkeypatch, keep):
    monkeypatch.setattr(train_mod, "_train_epoch", Interrupt(stop_at=2))
    with pytest.raises(KeyboardInterrupt):
        run(digits, make_cfg(), tmp_path)
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: int(len(data) * keep)])
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="delete it") as info:
        run(digits, make_cfg(), tmp_path)
    assert str(last) in str(info.value)
    assert not (tmp_path / "metrics.json").exists()

    # following the advice works: without last.pt the run starts afresh and finishes
    last.unlink()
    metrics = run(digits, make_cfg(), tmp_path)
    assert metrics["epochs"] == EPOCHS and len(read_history(tmp_path)) == EPOCHS


# ----------------------------------------------------------------------------------------------
# best-by-validation
# ----------------------------------------------------------------------------------------------


def test_best_epoch_is_first_highest_val_acc(finished):
    folder, metrics = finished
    val_acc = [float(r["val_acc"]) for r in read_history(folder)]
    assert metrics["best_epoch"] == int(np.argmax(val_acc)) + 1  # argmax keeps the first on ties


def test_best_epoch_with_scripted_val_accuracy(digits, tmp_path, monkeypatch):
    """Scripted val accuracies 0.5, 0.9, 0.9, 0.7: the best is epoch 2 (not the tie, not the last)."""
    scripted = iter([0.5, 0.9, 0.9, 0.7])
    real_report = train_mod.calibration_report
    in_loop = {"on": True}

    def report(logits, labels, n_bins=15):
        out = real_report(logits, labels, n_bins)
        if in_loop["on"]:
            out["acc"] = next(scripted)
        return out

    real_finish = train_mod._finish

    def finish(*args, **kwargs):
        in_loop["on"] = False  # the end-of-run metrics are the real ones
        return real_finish(*args, **kwargs)

    weights = {}
    real_save = train_mod.save_checkpoint

    def save(path, state):
        if Path(path).name == "last.pt":  # remember the weights after every epoch
            weights[state["epoch"]] = copy.deepcopy(state["model"])
        real_save(path, state)

    monkeypatch.setattr(train_mod, "calibration_report", report)
    monkeypatch.setattr(train_mod, "_finish", finish)
    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    metrics = run(digits, make_cfg(), tmp_path)

    history = read_history(tmp_path)
    assert [float(r["val_acc"]) for r in history] == [0.5, 0.9, 0.9, 0.7]
    assert metrics["best_epoch"] == 2
    best = load_checkpoint(tmp_path / "checkpoint.pt")
    assert sorted(weights) == [1, 2, 3, 4]
    for name, tensor in best.items():
        assert torch.equal(tensor, weights[2][name]), name
    assert any(not torch.equal(best[n], weights[4][n]) for n in best)  # not simply the last weights

    # logits.npz holds the predictions of the epoch-2 weights, not those of the last epoch
    saved = np.load(tmp_path / "logits.npz")
    model = train_mod.build_model("small_cnn", 10, in_channels=1, image_size=8)
    model.load_state_dict(weights[2])
    np.testing.assert_array_equal(train_mod.predict(model, digits.test)[0], saved["test_logits"])
    model.load_state_dict(weights[4])
    assert not np.array_equal(train_mod.predict(model, digits.test)[0], saved["test_logits"])


def test_method_settings_bf16_and_channels_last_run_on_cpu(tmp_path):
    """The GPU options also run on the CPU (bf16 autocast, NHWC), and method settings reach the method."""
    TrainConfig, train_run = train_mod.TrainConfig, train_mod.train_run
    splits = load_dataset("digits")
    cfg = TrainConfig(model="small_cnn", method="mixup", epochs=1, milestones=[1], seed=0,
                      method_settings={"alpha": 0.0}, amp="bf16", channels_last=True)
    m = train_run(splits, cfg, tmp_path / "run", device="cpu", progress=False)
    assert 0.0 <= m["test"]["acc"] <= 1.0 and m["best_epoch"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method_settings"] == {"alpha": 0.0}
    with pytest.raises(TypeError):
        train_run(splits, TrainConfig(model="small_cnn", method="ce", epochs=1, milestones=[1],
                                      method_settings={"nope": 1}), tmp_path / "bad", device="cpu", progress=False)
