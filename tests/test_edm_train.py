"""Training our own EDM: it learns, saves a loadable EMA, and resumes to the same weights."""

import pytest
import torch

from semmix_lib import edm, edm_train
from semmix_lib.runs import RunMismatchError


@pytest.fixture(scope="module")
def toy():
    """16 images of 2 classes at 8x8: class 0 dark left half, class 1 dark right half."""
    x = torch.ones(16, 1, 8, 8)
    x[:8, :, :, :4] = -1
    x[8:, :, :, 4:] = -1
    return x, torch.tensor([0] * 8 + [1] * 8)


def _cfg(**kw):
    return edm_train.EDMTrainConfig(**{**dict(steps=6, batch_size=8, lr_rampup_steps=2, checkpoint_every=2,
                                              ema_halflife_nimg=16), **kw})


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_writes_a_loadable_ema(toy, tmp_path):
    net = edm_train.train_edm(*toy, 2, _cfg(), tmp_path, progress=False)
    assert (tmp_path / "edm.pt").exists() and not (tmp_path / "state.pt").exists()
    assert len((tmp_path / "edm_loss.csv").read_text().splitlines()) == 1 + 6
    again = edm.load_edm_checkpoint(tmp_path / "edm.pt")
    assert _same_weights(net, again) and not again.training
    assert again.label_dim == 2 and again.img_resolution == 8


def test_resume_gives_the_same_weights(toy, tmp_path, monkeypatch):
    whole = edm_train.train_edm(*toy, 2, _cfg(), tmp_path / "whole", progress=False)
    calls = {"n": 0}
    real = edm_train.edm_loss

    def interrupt_after_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the step-4 state is on disk, step 5 never finishes
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(edm_train, "edm_loss", interrupt_after_four)
    with pytest.raises(KeyboardInterrupt):
        edm_train.train_edm(*toy, 2, _cfg(), tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / "state.pt").exists()
    monkeypatch.setattr(edm_train, "edm_loss", real)
    torch.manual_seed(999)  # the resumed run must not depend on the caller's RNG
    resumed = edm_train.train_edm(*toy, 2, _cfg(), tmp_path / "cut", progress=False)
    assert _same_weights(whole, resumed)


def test_other_settings_are_refused(toy, tmp_path):
    edm_train.train_edm(*toy, 2, _cfg(), tmp_path, progress=False)
    with pytest.raises(RunMismatchError, match="steps"):
        edm_train.train_edm(*toy, 2, _cfg(steps=7), tmp_path, progress=False)


def _eval_loss(net, x, y):
    torch.manual_seed(1)  # the same noise levels and noise for both networks
    with torch.no_grad():
        return float(sum(edm.edm_loss(net.eval(), x, torch.eye(2)[y]).mean() for _ in range(20)) / 20)


def test_training_lowers_the_loss(toy, tmp_path):
    cfg = _cfg(steps=80, lr=2e-3, lr_rampup_steps=5, checkpoint_every=1000)
    torch.manual_seed(cfg.seed)  # train_edm initialises the network from this seed too
    untrained = edm.build_edm(cfg.config, 8, 1, 2)
    trained = edm_train.train_edm(*toy, 2, cfg, tmp_path, progress=False)
    assert _eval_loss(trained, *toy) < 0.5 * _eval_loss(untrained, *toy)
