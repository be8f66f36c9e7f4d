"""Small, safe file helpers: atomic writes, JSON, checkpoints readable with ``weights_only=True``.

Everything the study writes can be read back without pickle, and every write goes to a temporary
file first and is renamed into place, so an interrupted run never leaves a half-written file under
the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "atomic_path", "write_json", "read_json", "save_checkpoint", "load_checkpoint",
    "save_arrays", "load_arrays", "sha256_file", "sha256_json", "CheckpointError", "settings_diff",
]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupted, or not ours)."""


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.ndarray,)):
        return x.tolist()
    if isinstance(x, (Path,)):
        return str(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def sha256_json(obj) -> str:
    """Hash of a JSON-able object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path, state: dict) -> None:
    """Save a dict of tensors / numbers / strings / lists (no objects) for ``weights_only`` loading."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: never runs code from the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, wrong format, or a pickle that needs code
        first_line = (str(err).splitlines() or [""])[0][:200]  # an empty file raises EOFError('')
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {first_line}). "
            "It may be truncated or not a semmix checkpoint; delete it to start that run afresh.") from err


def save_arrays(path, **arrays) -> None:
    """Save named numpy arrays as ``.npz`` (read back with ``allow_pickle=False``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def load_arrays(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, to name the exact setting that differs."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _short(v, n: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."


def settings_diff(old: dict, new: dict, ignore=()) -> list[str]:
    """``"key.sub: old (folder) vs new (now)"`` for every nested setting that differs."""
    was, now = _flatten(old), _flatten(new)
    return [f"{k}: {_short(was.get(k))} (folder) vs {_short(now.get(k))} (now)"
            for k in sorted(set(was) | set(now)) if k not in ignore and was.get(k) != now.get(k)]
