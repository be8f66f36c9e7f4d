"""Study parameter files (``params/*.yaml``) and their validation against the notebooks.

A study file has a run name, a ``shared`` section given to every stage notebook that declares the
key, and one section per stage::

    run: default
    shared: {dataset: digits, noise_sigma: 0.5}
    train: {methods: [ce], seeds: [0, 1, 2], epochs: 40}
    analyze: {}

papermill silently creates a new variable for a parameter the notebook does not declare, so every
key is checked against the ``parameters`` cell of the notebook(s) it goes to before anything runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

__all__ = ["Stage", "STAGES", "NOTEBOOK_DIR", "ParameterError", "load_study", "notebook_parameters",
           "validate_study", "stage_parameters", "INJECTED", "PATH_PARAMS"]

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
#: Parameters the pipeline sets itself; a study file may not.
INJECTED = ("run_dir",)
#: Parameters holding file or folder paths: relative ones are taken from where the pipeline is
#: started (notebooks run inside notebooks/), except the listed sentinel values.
PATH_PARAMS = {"data_root": (), "checkpoint": ("train",), "clip_pretrained": ()}
TOP_LEVEL = ("run", "description", "shared")


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    depends: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return NOTEBOOK_DIR / self.notebook


#: The pipeline, in order. Each stage reads only what the stages it depends on saved.
STAGES: tuple[Stage, ...] = (
    Stage("generate", "01_generate.ipynb"),
    Stage("annotate", "02_annotate.ipynb", depends=("generate",)),
    Stage("train", "03_train.ipynb", depends=("annotate",)),
    Stage("analyze", "04_analyze.ipynb", depends=("train",)),
)


class ParameterError(ValueError):
    """A study file that does not fit the notebooks: raised before anything runs."""


@lru_cache(maxsize=None)
def _inspect(path: str, mtime: float) -> dict:
    import logging

    import papermill

    log = logging.getLogger("papermill")
    level = log.level
    log.setLevel(logging.WARNING)  # papermill announces every notebook it inspects
    try:
        return {name: info["default"] for name, info in papermill.inspect_notebook(path).items()}
    finally:
        log.setLevel(level)


def notebook_parameters(stage: Stage) -> dict[str, str]:
    """Names and default values (as source text) of a stage notebook's ``parameters`` cell."""
    if not stage.path.exists():
        raise FileNotFoundError(f"stage {stage.name!r}: notebook {stage.path} is missing")
    params = _inspect(str(stage.path), stage.path.stat().st_mtime)
    if not params:
        raise ParameterError(f"{stage.path.name} has no cell tagged 'parameters'")
    return params


def _unknown(key: str, valid, where: str, source: str) -> ParameterError:
    hint = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" Did you mean {hint[0]!r}?" if hint else ""
    return ParameterError(f"{source}: unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(sorted(valid))}.")


def load_study(path) -> dict:
    """Read and validate a study file; returns the study as a dict with every section present."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no study file at {path}; the shipped ones are in params/")
    with open(path) as f:
        study = yaml.safe_load(f) or {}
    if not isinstance(study, dict):
        raise ParameterError(f"{path}: expected a mapping at the top level")
    study.setdefault("run", path.stem)
    study.setdefault("shared", {})
    for stage in STAGES:
        study[stage.name] = study.get(stage.name) or {}
    validate_study(study, source=str(path))
    return study


def validate_study(study: dict, source: str = "study") -> None:
    """Every section and key must be known; misspellings fail with the valid names."""
    sections = list(TOP_LEVEL) + [s.name for s in STAGES]
    for key in study:
        if key not in sections:
            raise _unknown(key, sections, "the top level", source)
    declared: dict[str, dict] = {s.name: notebook_parameters(s) for s in STAGES}
    for name, value in study.items():
        if name in ("run", "description"):
            continue
        if not isinstance(value, dict):
            raise ParameterError(f"{source}: section {name!r} must be a mapping of parameters")
        valid = set().union(*declared.values()) if name == "shared" else set(declared[name])
        valid -= set(INJECTED)
        for key in value:
            if key in INJECTED:
                raise ParameterError(f"{source}: {key!r} is set by the pipeline (use --run / --outputs)")
            if key not in valid:
                raise _unknown(key, valid, f"section {name!r}", source)
    if not isinstance(study["run"], str) or not study["run"] or "/" in study["run"]:
        raise ParameterError(f"{source}: 'run' must be a folder name, got {study['run']!r}")


def _absolute(key: str, value):
    if key not in PATH_PARAMS or not isinstance(value, str) or value in PATH_PARAMS[key]:
        return value
    return str((Path.cwd() / Path(value).expanduser()).resolve())


def stage_parameters(study: dict, stage: Stage) -> dict:
    """The parameters a stage notebook receives: its declared shared keys, then its own section;
    relative paths made absolute (from the current directory)."""
    declared = notebook_parameters(stage)
    params = {k: v for k, v in study["shared"].items() if k in declared}
    params.update(study[stage.name])
    return {k: _absolute(k, v) for k, v in params.items()}
