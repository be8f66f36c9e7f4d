"""Sharded generation under torchrun: two CPU processes (gloo) write what one process writes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semmix_lib import edm
from semmix_lib.edm_checkpoint import save_edm
from semmix_lib.mixing import read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = edm.build_edm("digits-small", 8, 1, 4)
    with torch.no_grad():  # untrained output layers are ~0: give the class vector a visible effect
        for p in net.parameters():
            if p.abs().max() < 1e-3:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "edm.pt"
    save_edm(path, net)
    return path


def _generate(checkpoint, out: Path, nproc: int, batch_size: int) -> subprocess.CompletedProcess:
    args = ["-m", "semmix_lib.mixing", "--checkpoint", str(checkpoint), "--out", str(out), "--seeds", "0-6",
            "--num-steps", "3", "--batch-size", str(batch_size), "--device", "cpu", "--no-progress"]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_two_ranks_write_the_same_images_as_one(checkpoint, tmp_path):
    single = _generate(checkpoint, tmp_path / "one", nproc=1, batch_size=32)
    assert single.returncode == 0, single.stderr[-2000:]
    double = _generate(checkpoint, tmp_path / "two", nproc=2, batch_size=8)
    assert double.returncode == 0, double.stderr[-3000:]
    plan = read_manifest(tmp_path / "one")
    assert len(plan) == 7 * 8 and plan.equals(read_manifest(tmp_path / "two"))
    for rel in plan["path"]:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    assert "56 images of 7 groups" in single.stdout + double.stdout


def test_training_under_torchrun_with_two_gloo_processes(tmp_path):
    """DDP on two CPU processes: one set of run files written by rank 0, one report, finished metrics."""
    study = tmp_path / "study.yaml"
    study.write_text("run: ddp\nshared: {dataset: digits, device: cpu}\n"
                     "train: {model: small_cnn, methods: [ce], seeds: [0], epochs: 2, milestones: [1]}\n")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "semmix_lib.train", str(study), "--outputs", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "out" / "ddp" / "train" / "ce" / "seed0"
    metrics = (run / "metrics.json").read_text()
    assert '"best_epoch"' in metrics and proc.stdout.count("ce seed 0: acc") == 1  # rank 0 reports once
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "history.csv",
                                                      "logits.npz", "metrics.json"]
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 2
