"""The analysis tables from saved metrics files: means, spreads, best marks, LaTeX, refusals."""

import json

import numpy as np
import pytest

from semmix_lib import analysis
from semmix_lib.metrics import REPORT_KEYS


def _write_run(root, method, seed, ece, acc=0.9, epochs=10, temperature=1.0):
    run = root / method / f"seed{seed}"
    run.mkdir(parents=True)
    report = {k: 0.1 for k in REPORT_KEYS} | {"acc": acc, "ece": ece}
    metrics = {"dataset": "digits", "method": method, "model": "small_cnn", "seed": seed, "temperature": temperature,
               "test": report, "test_ts": report | {"ece": ece / 2}, "val": report}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.json").write_text(json.dumps({"method": method, "seed": seed, "epochs": epochs}))


@pytest.fixture()
def train_dir(tmp_path):
    for seed, (e_ce, e_csm) in enumerate([(0.05, 0.02), (0.07, 0.04)]):
        _write_run(tmp_path, "ce", seed, e_ce, acc=0.90 + seed / 100)
        _write_run(tmp_path, "csm", seed, e_csm, acc=0.88)
    (tmp_path / "mixup" / "seed0").mkdir(parents=True)  # started, never finished
    return tmp_path


def test_table_means_spreads_and_unfinished_runs(train_dir):
    runs, unfinished = analysis.collect_runs(train_dir)
    assert unfinished == ["mixup/seed0"]
    table = analysis.results_table(runs, order=["csm", "ce"])
    assert [i[2] for i in table.index] == ["csm", "ce"]
    ce = table.loc[("digits", "small_cnn", "ce")]
    assert ce["seeds"] == 2 and ce["ece"] == pytest.approx(0.06) and ce["ece_std"] == pytest.approx(np.std([0.05, 0.07], ddof=1))
    assert ce["ece_ts"] == pytest.approx(0.03) and ce["acc"] == pytest.approx(0.905)


def test_best_marks_and_files(train_dir, tmp_path):
    table = analysis.results_table(analysis.collect_runs(train_dir)[0])
    best = analysis.best_mask(table)
    assert best.loc[("digits", "small_cnn", "csm"), "ece"] and not best.loc[("digits", "small_cnn", "ce"), "ece"]
    assert best.loc[("digits", "small_cnn", "ce"), "acc"]  # higher is better there
    paths = analysis.write_table(table, tmp_path / "out")
    md, tex = paths["md"].read_text(), paths["tex"].read_text()
    assert "**3.00 ± 1.41**" in md  # csm's ECE, in percent, bold
    assert r"\toprule" in tex and r"\textbf{3.00 $\pm$ 1.41}" in tex and tex.count(r"\\") == 3


def test_mixed_settings_across_seeds_are_refused(train_dir):
    _write_run(train_dir, "focal", 0, 0.1, epochs=10)
    _write_run(train_dir, "focal", 1, 0.1, epochs=20)
    with pytest.raises(ValueError, match=r"digits/small_cnn/focal.*\(epochs\)"):
        analysis.collect_runs(train_dir)
