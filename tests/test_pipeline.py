"""The papermill pipeline end to end at the CI size: outputs, manifests, skip, refuse, resume, nbval."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from semmix_lib import params as P
from semmix_lib.io import read_json
from semmix_lib.pipeline import PipelineError, main, run_study
from semmix_lib.runs import RunMismatchError, begin_stage

REPO = Path(__file__).resolve().parent.parent
CI_STUDY = REPO / "params" / "ci.yaml"

pytestmark = pytest.mark.slow


def _study(**changes):
    study = P.load_study(CI_STUDY)
    for section, values in changes.items():
        study[section] = {**study[section], **values}
    return study


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    return run_study(_study(), outputs, quiet=True)


def test_run_folder_has_executed_notebooks_tables_and_figures(ci_run):
    for rel in ["study.yaml", "generate/01_generate.ipynb", "generate/manifest.csv", "generate/edm/edm.pt",
                "generate/mixing_grid.png", "generate/mixing_check.png", "generate/mixing_spearman.csv",
                "generate/manifest.json", "annotate/02_annotate.ipynb", "annotate/annotations.csv",
                "annotate/prototypes.npy", "annotate/clip/digits_clip.pt", "annotate/reannotation.png",
                "annotate/manifest.json", "train/03_train.ipynb", "train/manifest.json", "train/ce/seed0/metrics.json",
                "train/ce/seed1/logits.npz", "train/training_curves.png", "analyze/04_analyze.ipynb",
                "analyze/results.csv", "analyze/results.md", "analyze/reliability.png",
                "analyze/reliability_ts.pdf", "analyze/manifest.json"]:
        assert (ci_run / rel).is_file(), rel
    assert not (ci_run / "train" / "stage.json").exists()


def test_manifests_record_parameters_versions_seeds_inputs(ci_run):
    train = read_json(ci_run / "train" / "manifest.json")
    analyze = read_json(ci_run / "analyze" / "manifest.json")
    assert train["parameters"]["epochs"] == 3 and train["parameters"]["seeds"] == [0, 1]
    assert train["seeds"] == {"seeds": [0, 1], "split_seed": 0}
    assert len(train["inputs"]["data"]) == 64  # the dataset fingerprint the notebook recorded
    assert analyze["inputs"]["train"] == train["fingerprint"]
    assert train["versions"]["torch"] and train["versions"]["semmix_lib"]
    assert train["wall_seconds"] > 0
    listed = {f["path"] for f in train["outputs"]}
    assert "ce/seed0/checkpoint.pt" in listed and "03_train.ipynb" in listed


def test_results_table_matches_saved_metrics(ci_run):
    table = pd.read_csv(ci_run / "analyze" / "results.csv")
    row = table[table.method == "ce"].iloc[0]
    seeds = [read_json(ci_run / "train" / "ce" / f"seed{s}" / "metrics.json") for s in (0, 1)]
    assert row["seeds"] == 2
    assert row["ece"] == pytest.approx(np.mean([m["test"]["ece"] for m in seeds]), abs=1e-6)
    assert row["ece_ts_std"] == pytest.approx(np.std([m["test_ts"]["ece"] for m in seeds], ddof=1), abs=1e-6)
    assert row["T"] == pytest.approx(np.mean([m["temperature"] for m in seeds]), abs=1e-6)
    assert "± " in (ci_run / "analyze" / "results.md").read_text()


def test_second_run_skips_finished_stages(ci_run, capsys):
    before = (ci_run / "train" / "manifest.json").stat().st_mtime_ns
    run_study(_study(), ci_run.parent)
    out = capsys.readouterr().out
    assert out.count("up to date") == 4
    assert (ci_run / "train" / "manifest.json").stat().st_mtime_ns == before


def test_other_parameters_are_refused_and_nothing_is_touched(ci_run):
    before = (ci_run / "train" / "ce" / "seed0" / "checkpoint.pt").read_bytes()
    with pytest.raises(RunMismatchError, match=r"epochs: 3 -> 4.*--force"):
        run_study(_study(train={"epochs": 4}), ci_run.parent, quiet=True)
    assert (ci_run / "train" / "ce" / "seed0" / "checkpoint.pt").read_bytes() == before
    assert (ci_run / "train" / "manifest.json").exists()


def test_misspelled_parameter_fails_before_anything_runs(tmp_path, capsys):
    study = yaml.safe_load(CI_STUDY.read_text())
    study["train"]["epoch"] = 3
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(P.ParameterError, match=r"unknown key 'epoch' in section 'train'\. Did you mean 'epochs'\?"):
        P.load_study(path)
    assert main([str(path), "--outputs", str(tmp_path / "out")]) == 2
    assert "Valid keys:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_section_and_injected_key_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: x\ntrian: {epochs: 3}\n")
    with pytest.raises(P.ParameterError, match=r"'trian' in the top level\. Did you mean 'train'\?"):
        P.load_study(path)
    path.write_text("run: x\ntrain: {run_dir: /tmp}\n")
    with pytest.raises(P.ParameterError, match="set by the pipeline"):
        P.load_study(path)


def test_analyze_alone_needs_finished_training(tmp_path):
    with pytest.raises(PipelineError, match=r"'train'.*has not finished.*--stages train analyze"):
        run_study(_study(), tmp_path, stages=["analyze"], quiet=True)


def test_failing_notebook_names_the_cause_and_resumes_later(tmp_path):
    study = _study(shared={"dataset": "cifar10"})
    with pytest.raises(PipelineError, match=r"(?s)DatasetNotFoundError.*data_root.*01_generate\.ipynb"):
        run_study(study, tmp_path, stages=["generate"], quiet=True)
    stage_dir = tmp_path / "ci" / "generate"
    assert (stage_dir / "stage.json").exists() and not (stage_dir / "manifest.json").exists()
    assert (stage_dir / "01_generate.ipynb").exists()  # the executed copy, traceback included


def test_interrupted_stage_resumes_without_redoing_finished_work(ci_run, tmp_path, capsys):
    run_dir = tmp_path / "ci"
    shutil.copytree(ci_run, run_dir)
    stage_dir = run_dir / "train"
    # Recreate what an interruption during seed 1 leaves behind: no manifest, a started stage, seed 1 gone.
    manifest = read_json(stage_dir / "manifest.json")
    (stage_dir / "manifest.json").unlink()
    begin_stage(stage_dir, "train", manifest["fingerprint"], manifest["parameters"], {})
    shutil.rmtree(stage_dir / "ce" / "seed1")
    seed0 = (stage_dir / "ce" / "seed0" / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()
    run_study(_study(), tmp_path, stages=["train"], quiet=True)
    out = capsys.readouterr().out
    assert "resuming" in out
    assert (stage_dir / "ce" / "seed0" / "checkpoint.pt").stat().st_mtime_ns == seed0
    assert (stage_dir / "ce" / "seed1" / "metrics.json").exists()
    assert read_json(stage_dir / "manifest.json")["fingerprint"] == manifest["fingerprint"]


def test_force_reruns_and_run_folder_argument_regenerates_figures(ci_run, capsys):
    before = (ci_run / "analyze" / "manifest.json").stat().st_mtime_ns
    train_before = (ci_run / "train" / "manifest.json").stat().st_mtime_ns
    assert main([str(ci_run), "--stages", "analyze", "--force", "--quiet"]) == 0
    assert (ci_run / "analyze" / "manifest.json").stat().st_mtime_ns > before
    assert (ci_run / "train" / "manifest.json").stat().st_mtime_ns == train_before
    assert (ci_run / "analyze" / "reliability.png").exists()


def test_nbval_reexecution_reproduces_the_executed_notebooks(tmp_path):
    """nbval re-runs the executed copies (training from scratch) and compares the checked cells."""
    run_dir = run_study(_study(), tmp_path, quiet=True)
    # make nbval train and generate again rather than read the results back
    for rel in ("generate/edm", "generate/images", "generate/check_classifier", "annotate/clip",
                "annotate/embeddings", "train/ce", "train/csm"):
        shutil.rmtree(run_dir / rel)
    (run_dir / "annotate" / "annotations.csv").unlink()
    notebooks = [str(run_dir / stage / nb) for stage, nb in (
        ("generate", "01_generate.ipynb"), ("annotate", "02_annotate.ipynb"), ("train", "03_train.ipynb"),
        ("analyze", "04_analyze.ipynb"))]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
                           "--rootdir", str(tmp_path), *notebooks],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout and "failed" not in proc.stdout
