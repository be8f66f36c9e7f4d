"""Tests for semmix_lib.io: atomic writes, safe checkpoint loading, arrays, JSON hashing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from semmix_lib.io import (
    CheckpointError,
    atomic_path,
    load_arrays,
    load_checkpoint,
    read_json,
    save_arrays,
    save_checkpoint,
    sha256_json,
    write_json,
)


class Payload:
    """Unpickling this runs ``os.makedirs(marker)``: the classic pickle code-execution trick."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


class Plain:
    """An ordinary custom class: harmless, but still needs code (its class) to unpickle."""

    def __init__(self):
        self.value = 3


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def test_write_json_replaces_target_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old, not even JSON")
    write_json(path, {"b": 1, "a": [1, 2], "c": np.float64(0.5), "d": np.int64(4)})
    assert listing(tmp_path) == ["a.json"]
    assert read_json(path) == {"a": [1, 2], "b": 1, "c": 0.5, "d": 4}
    write_json(path, {"z": None})
    assert listing(tmp_path) == ["a.json"]
    assert json.loads(path.read_text()) == {"z": None}


def test_write_json_creates_parent_folders(tmp_path):
    path = tmp_path / "x" / "y" / "m.json"
    write_json(path, [1, 2, 3])
    assert read_json(path) == [1, 2, 3]
    assert listing(path.parent) == ["m.json"]


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # not JSON-able: fails half way
    assert read_json(path) == {"v": 1}
    assert listing(tmp_path) == ["a.json"]

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp != path
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert read_json(path) == {"v": 1}
    assert listing(tmp_path) == ["a.json"]


def test_atomic_path_moves_into_place(tmp_path):
    path = tmp_path / "out.bin"
    with atomic_path(path) as tmp:
        assert not path.exists()
        tmp.write_bytes(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert listing(tmp_path) == ["out.bin"]


def test_save_checkpoint_replaces_and_round_trips(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.zeros(2)})
    state = {"w": torch.arange(6.0).view(2, 3), "epoch": 3, "history": [{"acc": 0.5}], "name": "x",
             "rng": torch.get_rng_state()}
    save_checkpoint(path, state)
    assert listing(tmp_path) == ["c.pt"]
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["rng"], state["rng"])
    assert (back["epoch"], back["history"], back["name"]) == (3, [{"acc": 0.5}], "x")


def test_save_arrays_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "l.npz"
    save_arrays(path, a=np.zeros(3))
    save_arrays(path, b=np.ones(2))
    assert listing(tmp_path) == ["l.npz"]
    assert list(load_arrays(path)) == ["b"]


# ----------------------------------------------------------------------------------------------
# checkpoints: never run code from a file
# ----------------------------------------------------------------------------------------------


def test_load_checkpoint_refuses_code_and_does_not_run_it(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="delete it"):
        load_checkpoint(path)
    assert not marker.exists()
    # the payload is real: an unrestricted load would have run it
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_load_checkpoint_refuses_custom_class(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"x": Plain()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, Exception)


def test_load_checkpoint_truncated_and_missing(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="delete it"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------------------
# arrays and hashes
# ----------------------------------------------------------------------------------------------


def test_arrays_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "logits": rng.standard_normal((5, 3)).astype(np.float32),
        "labels": np.array([0, 2, 1, 1, 0], dtype=np.int64),
        "scalar": np.float64(1.25),
        "listed": [1, 2, 3],
    }
    save_arrays(tmp_path / "a.npz", **arrays)
    back = load_arrays(tmp_path / "a.npz")
    assert sorted(back) == sorted(arrays)
    for key, value in arrays.items():
        expected = np.asarray(value)
        assert back[key].dtype == expected.dtype, key
        assert back[key].shape == expected.shape, key
        np.testing.assert_array_equal(back[key], expected)
    assert isinstance(back["logits"], np.ndarray)  # usable after the file is closed
    assert back["logits"].sum() == pytest.approx(arrays["logits"].sum())


def test_load_arrays_refuses_pickled_objects(tmp_path):
    path = tmp_path / "o.npz"
    np.savez(path, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        load_arrays(path)


def test_sha256_json_ignores_key_order():
    a = {"b": 1, "a": {"y": [1, 2], "x": 0.5}}
    b = {"a": {"x": 0.5, "y": [1, 2]}, "b": 1}
    assert sha256_json(a) == sha256_json(b)
    assert len(sha256_json(a)) == 64 and int(sha256_json(a), 16) >= 0
    assert sha256_json(a) != sha256_json({"b": 1, "a": {"y": [2, 1], "x": 0.5}})  # list order counts
    assert sha256_json(a) != sha256_json({"b": 2, "a": {"y": [1, 2], "x": 0.5}})
    assert sha256_json({"v": np.int64(3)}) == sha256_json({"v": 3})
