"""Tests for semmix_lib.losses: the method registry, CE, CSM and the baselines.

Expected values are computed independently of the implementation: with the ``math`` module on
hand-made logits (plain Python loops), or by redoing the formula row by row from what a mixing
method drew (its ``last_lam`` / ``last_perm``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semmix_lib.losses import METHODS, build_method, draw_mix

BASELINES = ["ls", "focal", "flsd53", "mbls", "mmce", "brier", "mixup", "regmixup", "rankmixup_mrl",
             "rankmixup_mndcg"]
ALL = ["ce", "csm", "csm_ce", "csm_raw"] + BASELINES
MIXING = ["mixup", "regmixup", "rankmixup_mrl", "rankmixup_mndcg"]

# hand-made logits (3 samples, 3 classes) and labels; sample 1 is misclassified
LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.3, 1.2], [-0.5, 1.5, 0.0]]
LABELS = [0, 1, 1]


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _run(name, logits=LOGITS, labels=LABELS, **settings):
    """A criterion method on fixed logits: the 'model' is the identity."""
    method = build_method(name, len(logits[0]), **settings)
    x = torch.tensor(logits, dtype=torch.float64)
    loss, out = method(nn.Identity(), {"x": x, "y": torch.tensor(labels)})
    assert torch.equal(out, x)
    return loss.item()


def _ce_by_hand(logits=LOGITS, labels=LABELS):
    return sum(-math.log(_softmax(z)[y]) for z, y in zip(logits, labels)) / len(labels)


# --------------------------------------------------------------------------------------------------
# registry

def test_every_method_is_registered_and_builds():
    for name in ALL:
        assert name in METHODS
        method = build_method(name, 10)
        assert isinstance(method, nn.Module) and callable(method.forward)
    assert build_method("csm", 10).uses_generated and not build_method("mixup", 10).uses_generated


def test_unknown_method_lists_all_names():
    with pytest.raises(ValueError) as err:
        build_method("no_such_method", 10)
    for name in ALL:
        assert repr(name) in str(err.value)


def test_settings_reach_the_method():
    assert build_method("ls", 10, alpha=0.05).criterion.alpha == 0.05
    assert build_method("mixup", 200, alpha=1.0).alpha == 1.0
    mrl = build_method("rankmixup_mrl", 200, margin=1.0, alpha=1.0)
    assert (mrl.margin, mrl.alpha, mrl.weight) == (1.0, 1.0, 0.1)
    assert build_method("rankmixup_mndcg", 10).num_mixup == 3
    assert build_method("regmixup", 10).alpha == 20.0
    with pytest.raises(TypeError):
        build_method("focal", 10, not_a_setting=1)


# --------------------------------------------------------------------------------------------------
# cross-entropy

def test_ce_loss_is_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    loss, out = build_method("ce", 5)(nn.Identity(), {"x": logits, "y": y})
    assert torch.equal(out, logits)
    assert torch.allclose(loss, F.cross_entropy(logits, y))


def test_ce_by_hand_one_row():
    # -log softmax([2, 0.5, -1])_0 = log(e^2 + e^0.5 + e^-1) - 2
    want = math.log(math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)) - 2.0
    assert _run("ce", LOGITS[:1], LABELS[:1]) == pytest.approx(want, rel=1e-12)
    assert _run("ce") == pytest.approx(_ce_by_hand(), rel=1e-12)


# --------------------------------------------------------------------------------------------------
# calibration losses on the hand-made example

def test_label_smoothing_by_hand():
    alpha, k = 0.2, 3
    want = 0.0
    for z, y in zip(LOGITS, LABELS):
        p = _softmax(z)
        target = [(1 - alpha) * (c == y) + alpha / k for c in range(k)]  # alpha spread over all K
        want += -sum(t * math.log(pc) for t, pc in zip(target, p))
    assert _run("ls") == pytest.approx(want / len(LABELS), rel=1e-12)
    assert _run("ls", alpha=0.0) == pytest.approx(_ce_by_hand(), rel=1e-12)
    assert _run("ls") != pytest.approx(_ce_by_hand(), rel=1e-3)


def test_focal_by_hand_and_gamma_zero_is_ce():
    want = sum(-(1 - _softmax(z)[y]) ** 3 * math.log(_softmax(z)[y]) for z, y in zip(LOGITS, LABELS)) / 3
    assert _run("focal") == pytest.approx(want, rel=1e-12)
    assert _run("focal", gamma=0.0) == pytest.approx(_ce_by_hand(), rel=1e-12)
    assert _run("focal") < _ce_by_hand()


@pytest.mark.parametrize("p, gamma", [(0.19, 5), (0.21, 3), (0.05, 5), (0.6, 3)])
def test_flsd53_switches_gamma_at_0_2(p, gamma):
    logits = [[math.log(p), math.log(1 - p)]]  # softmax -> (p, 1 - p), true class 0
    want = -(1 - p) ** gamma * math.log(p)
    other = -(1 - p) ** (8 - gamma) * math.log(p)
    got = _run("flsd53", logits, [0])
    assert got == pytest.approx(want, rel=1e-9)
    assert got != pytest.approx(other, rel=1e-3)


def test_flsd53_by_hand_on_a_batch():
    # true-class probabilities: sample 0 ~0.79 (gamma 3), sample 1 ~0.22 (gamma 3), sample 2 ~0.71
    logits = LOGITS + [[3.0, -2.0, 0.0]]   # sample 3: true class 1 has p ~0.006 -> gamma 5
    labels = LABELS + [1]
    want = 0.0
    for z, y in zip(logits, labels):
        p = _softmax(z)[y]
        want += -(1 - p) ** (5 if p < 0.2 else 3) * math.log(p)
    assert _run("flsd53", logits, labels) == pytest.approx(want / 4, rel=1e-12)


def test_mbls_by_hand():
    logits = [[8.0, 0.0, 1.0], [0.0, 0.5, 7.5], [1.0, 2.0, 3.0]]
    labels = [0, 1, 2]
    # gaps to the row max minus margin 6: row 0: (8-0-6)=2, (8-1-6)=1; row 1: (7.5-0-6)=1.5,
    # (7.5-0.5-6)=1; row 2: none. Mean over all 9 entries (the reference's .mean()).
    penalty = (2 + 1 + 1.5 + 1) / 9
    want = _ce_by_hand(logits, labels) + 0.1 * penalty
    assert _run("mbls", logits, labels) == pytest.approx(want, rel=1e-12)


def test_mbls_is_ce_when_gaps_are_below_the_margin():
    # all gaps < 6 (logits within [-1, 2])
    assert _run("mbls") == _run("ce")
    assert _run("mbls", margin=1.0) > _run("ce") + 1e-3


def test_brier_by_hand():
    want = 0.0
    for z, y in zip(LOGITS, LABELS):
        want += sum((pc - (c == y)) ** 2 for c, pc in enumerate(_softmax(z)))
    assert _run("brier") == pytest.approx(want / 3, rel=1e-12)


def test_mmce_by_hand():
    conf, correct = [], []
    for z, y in zip(LOGITS, LABELS):
        p = _softmax(z)
        conf.append(max(p))
        correct.append(1.0 if p.index(max(p)) == y else 0.0)
    assert correct == [1.0, 0.0, 1.0]
    n = len(conf)
    mmce = sum((correct[i] - conf[i]) * (correct[j] - conf[j]) * math.exp(-abs(conf[i] - conf[j]) / 0.4)
               for i in range(n) for j in range(n)) / n ** 2
    assert mmce > 0.01
    assert _run("mmce") == pytest.approx(_ce_by_hand() + mmce, rel=1e-12)
    assert _run("mmce", weight=2.0) == pytest.approx(_ce_by_hand() + 2 * mmce, rel=1e-12)


def test_calibration_losses_have_gradients():
    for name in ["ls", "focal", "flsd53", "mbls", "mmce", "brier"]:
        z = torch.tensor(LOGITS, requires_grad=True)
        loss, _ = build_method(name, 3)(nn.Identity(), {"x": z, "y": torch.tensor(LABELS)})
        loss.backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------
# mixing methods with a stub linear model

def _stub(k=4, d=12):
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k))


def _batch(b=8, k=4):
    g = torch.Generator().manual_seed(2)
    return {"x": torch.randn(b, 3, 2, 2, generator=g), "y": torch.randint(0, k, (b,), generator=g)}


def _call(name, seed=0, **settings):
    model, batch = _stub(), _batch()
    method = build_method(name, 4, **settings)
    torch.manual_seed(seed)
    loss, logits = method(model, batch)
    return method, model, batch, loss, logits


def test_draw_mix_uses_the_torch_generator():
    torch.manual_seed(3)
    lam, perm = draw_mix(16, 2.0)
    torch.manual_seed(3)
    lam2, perm2 = draw_mix(16, 2.0)
    assert lam2 == lam and torch.equal(perm2, perm)
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(16))
    torch.manual_seed(4)
    assert draw_mix(16, 2.0)[0] != lam
    assert draw_mix(16, 0.0)[0] == 1.0


@pytest.mark.parametrize("name", MIXING)
def test_mixing_method_is_finite_deterministic_and_not_ce(name):
    method, model, batch, loss, logits = _call(name)
    assert torch.isfinite(loss) and logits.shape == (8, 4)
    _, _, _, loss2, logits2 = _call(name)
    assert loss2.item() == loss.item() and torch.equal(logits, logits2)
    _, _, _, loss3, _ = _call(name, seed=1)
    assert loss3.item() != loss.item()
    ce = F.cross_entropy(model(batch["x"]), batch["y"])
    assert abs(loss.item() - ce.item()) > 1e-4
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_mixup_loss_matches_its_draw():
    method, model, batch, loss, logits = _call("mixup")
    (lam,), (perm,) = method.last_lam, method.last_perm
    x, y = batch["x"], batch["y"]
    mixed = model(lam * x + (1 - lam) * x[perm])
    assert torch.allclose(logits, mixed)  # the mixed batch's logits are returned
    want = lam * F.cross_entropy(mixed, y) + (1 - lam) * F.cross_entropy(mixed, y[perm])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # the same draw again from the same seed
    torch.manual_seed(0)
    assert draw_mix(8, 2.0)[0] == lam


def test_mixup_with_alpha_zero_is_ce():
    _, model, batch, loss, _ = _call("mixup", alpha=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(model(batch["x"]), batch["y"]).item(), rel=1e-6)


def test_regmixup_loss_matches_its_draw():
    method, model, batch, loss, logits = _call("regmixup")
    (lam,), (perm,) = method.last_lam, method.last_perm
    x, y = batch["x"], batch["y"]
    clean, mixed = model(x), model(lam * x + (1 - lam) * x[perm])
    assert torch.allclose(logits, clean, atol=1e-6)  # clean rows returned
    want = 0.5 * F.cross_entropy(clean, y) + 0.5 * (
        lam * F.cross_entropy(mixed, y) + (1 - lam) * F.cross_entropy(mixed, y[perm]))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert 0.2 < lam < 0.8  # Beta(20, 20) concentrates near 0.5


def _mrl_by_hand(model, batch, lam, perm, margin, weight, broadcast=False):
    x, y = batch["x"], batch["y"]
    clean, mixed = model(x).tolist(), model(lam * x + (1 - lam) * x[perm]).tolist()
    hinge = [max(0.0, max(m) - max(c) + margin) for c, m in zip(clean, mixed)]
    keep = [float(y[i] != y[perm[i]]) for i in range(len(y))]
    n = len(y)
    rank = (sum(keep) / n) * (sum(hinge) / n) if broadcast else sum(k * h for k, h in zip(keep, hinge)) / n
    return F.cross_entropy(model(x), y).item() + weight * rank


@pytest.mark.parametrize("broadcast", [False, True])
def test_rankmixup_mrl_loss_matches_its_draw(broadcast):
    method, model, batch, loss, logits = _call("rankmixup_mrl", reference_broadcast=broadcast)
    (lam,), (perm,) = method.last_lam, method.last_perm
    assert torch.allclose(logits, model(batch["x"]))
    y = batch["y"]
    assert (y != y[perm]).any() and (y == y[perm]).any()  # both kinds of pair in this batch
    want = _mrl_by_hand(model, batch, lam, perm, 2.0, 0.1, broadcast)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    other = _mrl_by_hand(model, batch, lam, perm, 2.0, 0.1, not broadcast)
    assert abs(want - other) > 1e-6


def test_rankmixup_mrl_ignores_same_class_pairs():
    model, batch = _stub(), _batch()
    batch["y"] = torch.zeros_like(batch["y"])
    torch.manual_seed(0)
    loss, logits = build_method("rankmixup_mrl", 4)(model, batch)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batch["y"]).item(), rel=1e-7)


def _mndcg_by_hand(model, batch, lams, perms):
    """Loss and the number of samples whose DCG exceeds the IDCG, by a loop over samples."""
    x, y = batch["x"], batch["y"]
    clean = model(x).softmax(1).tolist()
    mixed = [model(lam * x + (1 - lam) * x[perm]).softmax(1).tolist() for lam, perm in zip(lams, perms)]
    total, over = 0.0, 0
    for i in range(len(y)):
        items = [(1.0, max(clean[i]))]          # (label max, confidence); the clean sample first
        mixes = []
        for m, (lam, perm) in enumerate(zip(lams, perms)):
            t = 1.0 if y[i] == y[perm[i]] else max(lam, 1 - lam)
            mixes.append((t, max(mixed[m][i])))
        items += sorted(mixes, key=lambda tc: -tc[0])
        dcg = sum(c / math.log2(r + 2) for r, (_, c) in enumerate(items))
        idcg = sum(t / math.log2(r + 2) for r, (t, _) in enumerate(items))
        total += 1 - (dcg / idcg if idcg > dcg else idcg / dcg)
        over += dcg > idcg
    return F.cross_entropy(model(x), y).item() + 0.1 * total / len(y), over


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_rankmixup_mndcg_loss_matches_its_draws(scale):
    # scale 30 makes the stub over-confident, so that DCG > IDCG for some samples (the inverted ratio)
    model, batch = _stub(), _batch()
    with torch.no_grad():
        model[1].weight.mul_(scale)
    method = build_method("rankmixup_mndcg", 4)
    torch.manual_seed(0)
    loss, logits = method(model, batch)
    assert len(method.last_lam) == 3 and len(set(method.last_lam)) == 3
    want, over = _mndcg_by_hand(model, batch, method.last_lam, method.last_perm)
    assert (over > 0) == (scale > 1)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert torch.allclose(logits, model(batch["x"]))


# --------------------------------------------------------------------------------------------------
# CSM (stub model, generated images with soft targets)

def _csm_batch(b=4, m=3, d=5, k=4):
    g = torch.Generator().manual_seed(5)
    t = torch.rand(b, m, k, generator=g)
    return {"x": torch.randn(b, d, generator=g), "y": torch.randint(0, k, (b,), generator=g),
            "gen_x": torch.randn(b, m, d, generator=g), "gen_t": t / t.sum(-1, keepdim=True)}


def _csm_model(d=5, k=4):
    torch.manual_seed(6)
    return nn.Linear(d, k)


def test_csm_is_ce_plus_l2_by_hand():
    model, batch = _csm_model(), _csm_batch()
    loss, real = build_method("csm", 4)(model, batch)
    assert torch.allclose(real, model(batch["x"]), atol=1e-6)
    ce = F.cross_entropy(model(batch["x"]), batch["y"]).item()
    p = model(batch["gen_x"].flatten(0, 1)).softmax(1).tolist()
    t = batch["gen_t"].flatten(0, 1).tolist()
    l2 = sum(sum((pk - tk) ** 2 for pk, tk in zip(pi, ti)) for pi, ti in zip(p, t)) / len(p)
    assert l2 > 1e-3
    assert loss.item() == pytest.approx(ce + l2, rel=1e-6)
    assert build_method("csm_raw", 4)(model, batch)[0].item() == pytest.approx(ce + l2, rel=1e-6)


def test_csm_ce_uses_soft_cross_entropy():
    model, batch = _csm_model(), _csm_batch()
    loss, _ = build_method("csm_ce", 4)(model, batch)
    ce = F.cross_entropy(model(batch["x"]), batch["y"]).item()
    logp = model(batch["gen_x"].flatten(0, 1)).log_softmax(1).tolist()
    t = batch["gen_t"].flatten(0, 1).tolist()
    soft = sum(-sum(tk * lk for tk, lk in zip(ti, li)) for ti, li in zip(t, logp)) / len(t)
    assert loss.item() == pytest.approx(ce + soft, rel=1e-6)


def test_csm_soft_part_vanishes_at_the_models_softmax():
    model, batch = _csm_model(), _csm_batch()
    with torch.no_grad():
        batch["gen_t"] = model(batch["gen_x"].flatten(0, 1)).softmax(1).view(4, 3, 4)
    loss, _ = build_method("csm", 4)(model, batch)
    ce = F.cross_entropy(model(batch["x"]), batch["y"])
    assert loss.item() == pytest.approx(ce.item(), abs=1e-7)
    # ... whereas cross-entropy to the same targets keeps their entropy
    loss_ce, _ = build_method("csm_ce", 4)(model, batch)
    assert loss_ce.item() > ce.item() + 0.1
