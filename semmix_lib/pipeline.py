"""Run a study's stage notebooks in order with papermill.

    python -m semmix_lib.pipeline params/default.yaml [--stages train analyze] [--run NAME]
    python -m semmix_lib.pipeline outputs/default --stages analyze --force   # figures only

Each stage notebook is executed into ``outputs/<run>/<stage>/`` (the executed copy sits beside the
artifacts it wrote) and finished with a ``manifest.json``. A stage already done with the same
parameters is skipped, an interrupted one resumes, and one made with other parameters is refused
unless ``--force`` replaces it. Every parameter is validated before the first notebook starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from .params import STAGES, Stage, load_study, stage_parameters
from .runs import (RunMismatchError, begin_stage, clear_stage, finish_stage, read_manifest,
                   stage_fingerprint, stage_status)

__all__ = ["run_study", "main", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDY_FILE = "study.yaml"


class PipelineError(RuntimeError):
    """A stage that cannot run (missing upstream outputs, a failed notebook)."""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _select(names: list[str] | None) -> list[Stage]:
    if not names:
        return list(STAGES)
    known = {s.name: s for s in STAGES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; the stages are {list(known)}")
    return [s for s in STAGES if s.name in names]


def _upstream(run_dir: Path, stage: Stage) -> dict[str, str]:
    """Fingerprints of the finished stages this one reads; an unfinished one is an error."""
    inputs = {}
    for dep in stage.depends:
        manifest = read_manifest(run_dir / dep)
        if manifest is None:
            raise PipelineError(
                f"stage {stage.name!r} reads the outputs of {dep!r}, which has not finished in {run_dir}; "
                f"run it first (--stages {dep} {stage.name}).")
        inputs[dep] = manifest["fingerprint"]
    return inputs


def _kernel_env() -> None:
    """Make papermill's ``python3`` kernel the interpreter running the pipeline (this venv)."""
    share = str(Path(sys.prefix) / "share" / "jupyter")
    paths = os.environ.get("JUPYTER_PATH", "")
    if share not in paths.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (share, paths) if p)
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ["SEMMIX_PROGRESS"] = "text"  # papermill relays text, not widgets (semmix_lib.progress)
    os.environ.setdefault("TQDM_MININTERVAL", "10")


def _execute(stage: Stage, stage_dir: Path, params: dict, quiet: bool) -> None:
    import papermill

    out = stage_dir / stage.notebook
    try:
        papermill.execute_notebook(
            str(stage.path), str(out), parameters=params, kernel_name="python3",
            cwd=str(stage.path.parent), progress_bar=not quiet, log_output=not quiet)
    except papermill.PapermillExecutionError as err:
        raise PipelineError(
            f"stage {stage.name!r} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
            f"The executed notebook with the traceback is {out}. Fix the cause and run the same "
            "command again: finished work is kept and the stage resumes.") from None


def run_study(study: dict, outputs: Path, stages: list[str] | None = None, force: bool = False,
              quiet: bool = False) -> Path:
    """Run (or resume, or skip) the selected stages of a validated study; returns the run folder."""
    _kernel_env()
    run_dir = (Path(outputs) / study["run"]).resolve()
    selected = _select(stages)
    # Check every selected stage before running any, so a refusal loses no time.
    plans = []
    for stage in selected:
        params = stage_parameters(study, stage)
        stage_dir = run_dir / stage.name
        if force:
            plans.append((stage, params, "force"))
            continue
        upstream_pending = any(p[0].name in stage.depends and p[2] != "done" for p in plans)
        inputs = {} if upstream_pending else _upstream(run_dir, stage)
        status = stage_status(stage_dir, stage_fingerprint(stage.name, params, inputs), params)
        plans.append((stage, params, status))

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / STUDY_FILE, "w") as f:
        yaml.safe_dump({k: v for k, v in study.items()}, f, sort_keys=False)
    for i, (stage, params, status) in enumerate(plans, 1):
        stage_dir = run_dir / stage.name
        head = f"[{i}/{len(plans)}] {stage.name} ({stage.notebook})"
        inputs = _upstream(run_dir, stage)
        fingerprint = stage_fingerprint(stage.name, params, inputs)
        if status != "force":  # upstream may have just re-run: look again
            status = stage_status(stage_dir, fingerprint, params)
        if status == "done":
            _say(f"{head}: up to date in {stage_dir}, skipped")
            continue
        if status in ("stale", "force"):
            clear_stage(stage_dir)
        _say(f"{head}: {'resuming' if status == 'resume' else 'running'} -> {stage_dir}")
        started = begin_stage(stage_dir, stage.name, fingerprint, params, inputs)
        _execute(stage, stage_dir, {**params, "run_dir": str(run_dir)}, quiet)
        manifest = finish_stage(stage_dir, stage.name, stage.notebook, started)
        _say(f"{head}: done in {manifest['wall_seconds']:.1f} s")
    return run_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m semmix_lib.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study file (params/*.yaml) or an existing run folder")
    p.add_argument("--stages", nargs="+", metavar="STAGE",
                   help=f"stages to run, of {[s.name for s in STAGES]} (default: all)")
    p.add_argument("--run", help="run folder name under --outputs (default: the study's 'run')")
    p.add_argument("--outputs", default=str(REPO_ROOT / "outputs"), help="where run folders go")
    p.add_argument("--force", action="store_true",
                   help="re-run the selected stages from scratch, replacing what is there")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress or notebook output")
    return p


class _CellMarkers(logging.Filter):
    """Keep the notebooks' own output in the log, drop papermill's per-cell banners."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Executing Cell") or msg.startswith("Ending Cell"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_CellMarkers())
    source = Path(args.study)
    outputs = Path(args.outputs)
    if source.is_dir():  # an existing run folder: its saved study, in its own outputs folder
        outputs = source.resolve().parent
        source = source / STUDY_FILE
    try:
        study = load_study(source)
        if args.run:
            study["run"] = args.run
        elif Path(args.study).is_dir():
            study["run"] = Path(args.study).resolve().name
        t0 = time.time()
        run_dir = run_study(study, outputs, args.stages, args.force, args.quiet)
    except (ValueError, FileNotFoundError, RunMismatchError, PipelineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _say(f"finished in {time.time() - t0:.1f} s: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
