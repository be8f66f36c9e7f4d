"""Run folders and stage manifests: ``outputs/<run>/<stage>/manifest.json``.

A stage folder is in one of three states, told apart by two small files:

* ``stage.json`` only: the stage started and did not finish (interrupted or failed); re-running the
  same parameters resumes it, other parameters are refused.
* ``manifest.json``: the stage finished; it records the parameters, their fingerprint, the library
  and package versions, the seeds, the hashes of its inputs (upstream manifests, data) and the wall
  time, plus a listing of the files it wrote.
* neither: nothing there yet.
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from . import __version__
from .io import read_json, sha256_file, sha256_json, write_json

__all__ = ["RunMismatchError", "stage_fingerprint", "stage_status", "begin_stage", "finish_stage",
           "record_inputs", "read_manifest", "clear_stage", "versions"]

INPUTS_FILE = "inputs.json"
_HASH_LIMIT = 64 << 20  # files above this size are listed with their size only


class RunMismatchError(RuntimeError):
    """A stage folder made with other parameters: never mixed, never silently overwritten."""


def stage_fingerprint(stage: str, params: dict, inputs: dict[str, str]) -> str:
    """Hash of what determines a stage's outputs: its parameters and its inputs' fingerprints."""
    return sha256_json({"stage": stage, "params": params, "inputs": inputs})


def versions() -> dict[str, str]:
    out = {"semmix_lib": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "numpy", "open_clip_torch", "papermill"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_manifest(stage_dir) -> dict | None:
    path = Path(stage_dir) / "manifest.json"
    return read_json(path) if path.exists() else None


def stage_status(stage_dir, fingerprint: str, params: dict) -> str:
    """``"done"``, ``"resume"``, ``"stale"`` (same params, changed inputs), or ``"new"``.

    Raises :class:`RunMismatchError` when the folder holds the stage for other parameters.
    """
    stage_dir = Path(stage_dir)
    record = read_manifest(stage_dir)
    status = "done"
    if record is None and (stage_dir / "stage.json").exists():
        record, status = read_json(stage_dir / "stage.json"), "resume"
    if record is None:
        return "new"
    if record["fingerprint"] == fingerprint:
        return status
    if record["parameters"] == params:
        return "stale"
    old, new = record["parameters"], params
    diff = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    raise RunMismatchError(
        f"{stage_dir} was made with other parameters ({'; '.join(diff)}). Re-run with --force to "
        "replace it, or pass --run NAME to keep both.")


def clear_stage(stage_dir) -> None:
    if Path(stage_dir).exists():
        shutil.rmtree(stage_dir)


def begin_stage(stage_dir, stage: str, fingerprint: str, params: dict, inputs: dict) -> float:
    """Mark a stage as started (``stage.json``); returns the start time."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json(stage_dir / "stage.json", {"stage": stage, "fingerprint": fingerprint,
                                          "parameters": params, "inputs": inputs,
                                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return time.time()


def record_inputs(stage_dir, **hashes: str) -> None:
    """Called by a notebook to add input hashes it alone knows (for example the data fingerprint)."""
    path = Path(stage_dir) / INPUTS_FILE
    current = read_json(path) if path.exists() else {}
    current.update(hashes)
    write_json(path, current)


def _listing(stage_dir: Path) -> list[dict]:
    files = []
    for path in sorted(p for p in stage_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(stage_dir).as_posix()
        if rel in ("manifest.json", "stage.json") or path.name.startswith("."):
            continue
        entry = {"path": rel, "bytes": path.stat().st_size}
        if entry["bytes"] <= _HASH_LIMIT:
            entry["sha256"] = sha256_file(path)
        files.append(entry)
    return files


def _seeds(params: dict) -> dict:
    return {k: v for k, v in params.items() if "seed" in k}


def finish_stage(stage_dir, stage: str, notebook: str, started: float) -> dict:
    """Write ``manifest.json`` for a stage that ran to the end; returns it."""
    stage_dir = Path(stage_dir)
    begun = read_json(stage_dir / "stage.json")
    notebook_inputs = read_json(stage_dir / INPUTS_FILE) if (stage_dir / INPUTS_FILE).exists() else {}
    manifest = {
        "stage": stage, "notebook": notebook, "fingerprint": begun["fingerprint"],
        "parameters": begun["parameters"], "seeds": _seeds(begun["parameters"]),
        "inputs": {**begun["inputs"], **notebook_inputs}, "versions": versions(),
        "started": begun["started"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": round(time.time() - started, 2), "outputs": _listing(stage_dir),
    }
    write_json(stage_dir / "manifest.json", manifest)
    (stage_dir / "stage.json").unlink()
    return manifest
