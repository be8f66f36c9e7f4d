"""Training methods behind one registry keyed by name: CSM's loss and the paper's baselines.

A *method* turns one training batch into a loss. The batch is a dict: ``x`` (real images), ``y``
(their labels) and, for methods with ``uses_generated = True`` (CSM), ``gen_x`` (generated images,
shape (B, m, C, H, W)) and ``gen_t`` (their soft targets, (B, m, K)). A method calls the model itself,
because mixing methods feed it mixed inputs; it returns the loss and the logits of the real images
(for the running training accuracy).

``build_method(name, num_classes, **settings)`` builds one with the paper's settings (PAPER.md
section 3) unless overridden.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Method", "CriterionMethod", "METHODS", "register_method", "build_method", "soft_l2", "soft_ce",
           "CSM"]

METHODS: dict[str, Callable[..., "Method"]] = {}


class Method(nn.Module):
    """Base class: ``forward(model, batch) -> (loss, real_logits)``."""

    uses_generated: bool = False


class CriterionMethod(Method):
    """A loss on the real images' logits only: ``criterion(model(x), y)``."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, model, batch):
        logits = model(batch["x"])
        return self.criterion(logits, batch["y"]), logits


def register_method(name: str):
    """Decorator adding a builder ``fn(num_classes, **settings) -> Method``."""
    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = fn
        return fn
    return wrap


def build_method(name: str, num_classes: int, **settings) -> Method:
    """Build a registered method; an unknown name lists the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](num_classes=num_classes, **settings)


@register_method("ce")
def cross_entropy(num_classes: int) -> Method:
    """Plain cross-entropy on one-hot labels, the baseline every method is compared with."""
    return CriterionMethod(nn.CrossEntropyLoss())


# --------------------------------------------------------------------------------------------------
# CSM (PAPER.md section 3): CE on the real images + a loss to the soft labels of the generated ones.

def soft_l2(logits, targets):
    """CSM's loss on generated images: ``mean_i sum_k (softmax_k(z_i) - t_ik)^2``.

    The paper uses L2 rather than cross-entropy on soft labels, arguing CE fits them unevenly.
    """
    return (logits.softmax(dim=1) - targets).pow(2).sum(dim=1).mean()


def soft_ce(logits, targets):
    """Cross-entropy to soft labels, ``mean_i -sum_k t_ik log softmax_k(z_i)`` (the ``csm_ce`` ablation)."""
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


class CSM(Method):
    """``L = CE(f(x), y) + w * soft_loss(f(x_gen), t_gen)``; real and generated images go through
    the network in one batch (so batch-norm statistics see both)."""

    uses_generated = True

    def __init__(self, soft_loss: Callable = soft_l2, weight: float = 1.0):
        super().__init__()
        self.soft_loss, self.weight = soft_loss, weight

    def forward(self, model, batch):
        x, gen_x, gen_t = batch["x"], batch["gen_x"], batch["gen_t"]
        logits = model(torch.cat([x, gen_x.flatten(0, 1)]))
        real, gen = logits[: len(x)], logits[len(x):]
        loss = F.cross_entropy(real, batch["y"]) + self.weight * self.soft_loss(gen, gen_t.flatten(0, 1))
        return loss, real


@register_method("csm")
def csm(num_classes: int, weight: float = 1.0) -> Method:
    """CSM: CLIP-reannotated soft labels, L2 loss."""
    return CSM(soft_l2, weight)


@register_method("csm_ce")
def csm_ce(num_classes: int, weight: float = 1.0) -> Method:
    """Ablation: cross-entropy to the soft labels instead of L2."""
    return CSM(soft_ce, weight)


@register_method("csm_raw")
def csm_raw(num_classes: int, weight: float = 1.0) -> Method:
    """Ablation: L2 to soft labels made from the generation ``lam`` instead of the CLIP reannotation
    (the data side reads ``lam`` instead of ``soft_label``; the loss is CSM's)."""
    return CSM(soft_l2, weight)


#: Methods whose soft targets come from the generation lam rather than the reannotation.
RAW_LAMBDA_METHODS = {"csm_raw"}


# ==================================================================================================
# Baselines (PAPER.md section 3): calibration losses and mixing methods the paper compares CSM with.
#
# Formulas, defaults and reductions follow the RankMixup code that the CSM code forks
# (cvlab-yonsei/RankMixup: calibrate/losses/*.py, configs/loss/*.yaml, configs/model/*_mixup*.yaml,
# calibrate/net/resnet_mixup.py); RegMixup follows its authors' code (FrancescoPinto/RegMixup).
# These are independent re-implementations, written from the formulas.
#
# Randomness (Beta draws, permutations) comes from the global *CPU* torch generator only
# (``torch.manual_seed`` makes it deterministic, and the training loop saves/restores it for resume);
# the reference draws from numpy instead. Every mixing method records what it drew in ``last_lam``
# and ``last_perm`` (lists, one entry per mixed copy) so that tests can recompute the loss.
# ==================================================================================================

__all__ += ["LabelSmoothingCE", "FocalLoss", "FocalLossSD", "MarginLabelSmoothing", "MMCELoss", "BrierLoss",
            "Mixup", "RegMixup", "RankMixupMRL", "RankMixupMNDCG", "draw_mix"]


def draw_mix(batch_size: int, alpha: float, device=None) -> tuple[float, torch.Tensor]:
    """One mixup draw: ``lam ~ Beta(alpha, alpha)`` (``lam = 1`` if ``alpha <= 0``, as the reference) and a
    random permutation of the batch, both from the global CPU torch generator."""
    if alpha > 0:
        a = torch.tensor(float(alpha), dtype=torch.float64)
        lam = float(torch.distributions.Beta(a, a).sample())
    else:
        lam = 1.0
    perm = torch.randperm(batch_size)
    return lam, perm.to(device) if device is not None else perm


def _mix(x, lam: float, perm):
    """``lam * x + (1 - lam) * x[perm]`` (Zhang et al. 2018)."""
    return lam * x + (1.0 - lam) * x[perm]


class LabelSmoothingCE(nn.Module):
    """Label smoothing as RankMixup's ``LabelSmoothingCrossEntropy``: the target is
    ``(1 - alpha) * onehot(y) + alpha / K`` (alpha spread over all K classes, the true one included), i.e.
    ``L = mean_i [(1 - alpha) * (-log p_{i,y_i}) + alpha * mean_k (-log p_ik)]``."""

    def __init__(self, alpha: float = 0.2):
        super().__init__()
        self.alpha = alpha

    def forward(self, logits, y):
        logp = logits.log_softmax(dim=1)
        nll = -logp.gather(1, y[:, None]).squeeze(1)
        return ((1.0 - self.alpha) * nll - self.alpha * logp.mean(dim=1)).mean()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``L = mean_i -(1 - p_i)^gamma log p_i`` with ``p_i`` the true-class
    probability; mean over the batch (RankMixup's ``focal.yaml``: ``size_average: True``)."""

    def __init__(self, gamma: float = 3.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, y):
        logp = logits.log_softmax(dim=1).gather(1, y[:, None]).squeeze(1)
        return (-(1.0 - logp.exp()).pow(self.gamma) * logp).mean()


class FocalLossSD(nn.Module):
    """Sample-dependent focal loss FLSD-53 (Mukhoti et al. 2020): focal loss with
    ``gamma_i = gamma_low_p if p_i < p_switch else gamma`` (5 below p = 0.2, 3 otherwise; strict ``<``,
    as RankMixup's ``FocalLossAdaptive`` with ``focal_adaptive.yaml``). ``gamma_i`` is chosen from the
    detached probability; mean over the batch."""

    def __init__(self, gamma: float = 3.0, gamma_low_p: float = 5.0, p_switch: float = 0.2):
        super().__init__()
        self.gamma, self.gamma_low_p, self.p_switch = gamma, gamma_low_p, p_switch

    def forward(self, logits, y):
        logp = logits.log_softmax(dim=1).gather(1, y[:, None]).squeeze(1)
        p = logp.exp()
        gamma = torch.where(p.detach() < self.p_switch, self.gamma_low_p, self.gamma).to(p.dtype)
        return (-(1.0 - p).pow(gamma) * logp).mean()


class MarginLabelSmoothing(nn.Module):
    """Margin-based label smoothing, MbLS (Liu et al. 2022), as RankMixup's ``LogitMarginL1``:
    ``L = CE + alpha * mean_{i,k} relu(max_j z_ij - z_ik - margin)``. The reference averages the hinge
    over batch *and* classes (``.mean()`` of the B x K matrix), i.e. the paper's sum over k divided by K.
    Defaults margin 6, alpha 0.1 (``logit_margin.yaml``; the class default there is margin 10)."""

    def __init__(self, margin: float = 6.0, alpha: float = 0.1):
        super().__init__()
        self.margin, self.alpha = margin, alpha

    def forward(self, logits, y):
        gaps = logits.max(dim=1, keepdim=True).values - logits
        return F.cross_entropy(logits, y) + self.alpha * F.relu(gaps - self.margin).mean()


class MMCELoss(nn.Module):
    """CE + weight * MMCE (Kumar et al. 2018), the *unweighted* MMCE_m that RankMixup's ``mmce.yaml`` selects
    (``calibrate.losses.MMCE``, not ``MMCE_weighted``):
    ``MMCE = (1/N^2) sum_{i,j} (c_i - r_i)(c_j - r_j) exp(-|r_i - r_j| / 0.4)`` with ``r_i`` the max softmax
    probability and ``c_i = 1[argmax = y_i]``; no square root (as the reference). weight (``lamda``) 1."""

    def __init__(self, weight: float = 1.0, width: float = 0.4):
        super().__init__()
        self.weight, self.width = weight, width

    def forward(self, logits, y):
        r, pred = logits.softmax(dim=1).max(dim=1)
        d = (pred == y).to(r.dtype) - r
        kernel = torch.exp(-(r[:, None] - r[None, :]).abs() / self.width)
        mmce = (d[:, None] * d[None, :] * kernel).sum() / len(r) ** 2
        return F.cross_entropy(logits, y) + self.weight * mmce


class BrierLoss(nn.Module):
    """Brier score as a loss, as RankMixup's ``BrierScore``: ``(1/N) sum_i sum_k (p_ik - 1[k = y_i])^2``."""

    def forward(self, logits, y):
        onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return (logits.softmax(dim=1) - onehot).pow(2).sum() / len(y)


class Mixup(Method):
    """Input mixup (Zhang et al. 2018): ``lam ~ Beta(alpha, alpha)`` and a permutation ``pi`` per batch,
    ``L = lam * CE(f(x_mix), y) + (1 - lam) * CE(f(x_mix), y[pi])``, ``x_mix = lam x + (1 - lam) x[pi]``.

    Returns the logits of the *mixed* batch as ``real_logits``: the reference's mixup helper
    (``Trainer.mixup_data``/``mixup_criterion`` in RankMixup, unused by its training loop) does not
    forward the clean images either, so the running training accuracy is measured against ``y``.
    """

    def __init__(self, alpha: float = 2.0):
        super().__init__()
        self.alpha = alpha
        self.last_lam: list[float] = []
        self.last_perm: list[torch.Tensor] = []

    def forward(self, model, batch):
        x, y = batch["x"], batch["y"]
        lam, perm = draw_mix(len(x), self.alpha, x.device)
        self.last_lam, self.last_perm = [lam], [perm]
        logits = model(_mix(x, lam, perm))
        loss = lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[perm])
        return loss, logits


class RegMixup(Method):
    """RegMixup (Pinto et al. 2022), as its authors' ``training_step``: the clean batch and one mixed copy
    go through the model in one forward, and the mixup criterion is applied to the 2B rows with targets
    ``[y, y]`` / ``[y, y[pi]]`` and mean reduction, so
    ``L = (1/2) CE(f(x), y) + (1/2) [lam CE(f(x_mix), y) + (1 - lam) CE(f(x_mix), y[pi])]``.
    ``lam ~ Beta(alpha, alpha)``; alpha 20 is the authors' default and CIFAR-10 setting (10 on CIFAR-100).
    Returns the clean rows' logits."""

    def __init__(self, alpha: float = 20.0):
        super().__init__()
        self.alpha = alpha
        self.last_lam: list[float] = []
        self.last_perm: list[torch.Tensor] = []

    def forward(self, model, batch):
        x, y = batch["x"], batch["y"]
        lam, perm = draw_mix(len(x), self.alpha, x.device)
        self.last_lam, self.last_perm = [lam], [perm]
        logits = model(torch.cat([x, _mix(x, lam, perm)]))
        loss = (lam * F.cross_entropy(logits, torch.cat([y, y]))
                + (1.0 - lam) * F.cross_entropy(logits, torch.cat([y, y[perm]])))
        return loss, logits[: len(x)]


class RankMixupMRL(Method):
    """RankMixup with the mixup ranking loss, MRL (Noh et al. 2023), as RankMixup's ``RankMixup_MRL`` with
    its trainer: ``f(x)`` and ``f(x_mix)`` are two separate forwards (one mixed copy, ``num_mixup: 1 mrl``),
    ``L = CE(f(x), y) + weight * mean_i m_i relu(max_k f(x_mix)_ik - max_k f(x)_ik + margin)``.

    * The ranking is on **logits** (the reference's ``get_logit_diff``; its confidence version is
      commented out), which is why the margin is 2.0 (CIFAR) / 1.0 (Tiny-ImageNet, pass ``margin=1.0``).
    * ``m_i`` drops pairs whose mixed label is one-hot (same class, ``y_i = y[pi]_i``), as the reference's
      ``self_mixup_mask``. The reference multiplies a (B,) mask with a (B, 1) hinge, which broadcasts to
      B x B, so its term is ``mean(m) * mean_i relu(...)``; ``reference_broadcast=True`` reproduces that,
      the default applies the mask per sample as intended.
    * Defaults: weight (``alpha`` in ``mrl.yaml``) 0.1, margin 2.0, Beta alpha (``mixup_alpha`` in
      ``resnet50_mixup.yaml``) 2.0 on CIFAR, 1.0 on Tiny-ImageNet.
    Returns the clean logits."""

    def __init__(self, alpha: float = 2.0, margin: float = 2.0, weight: float = 0.1,
                 reference_broadcast: bool = False):
        super().__init__()
        self.alpha, self.margin, self.weight = alpha, margin, weight
        self.reference_broadcast = reference_broadcast
        self.last_lam: list[float] = []
        self.last_perm: list[torch.Tensor] = []

    def forward(self, model, batch):
        x, y = batch["x"], batch["y"]
        logits = model(x)
        lam, perm = draw_mix(len(x), self.alpha, x.device)
        self.last_lam, self.last_perm = [lam], [perm]
        mixed = model(_mix(x, lam, perm))
        hinge = F.relu(mixed.max(dim=1).values - logits.max(dim=1).values + self.margin)
        keep = ((y != y[perm]) & (0.0 < lam < 1.0)).to(hinge.dtype)
        rank = keep.mean() * hinge.mean() if self.reference_broadcast else (keep * hinge).mean()
        return F.cross_entropy(logits, y) + self.weight * rank, logits


class RankMixupMNDCG(Method):
    """RankMixup with the M-NDCG loss (Noh et al. 2023), as RankMixup's ``RankMixup_MNDCG``: M mixed copies
    (each with its own ``lam_m ~ Beta(alpha, alpha)`` and permutation) go through one forward, the clean
    batch through another. Per sample, the M+1 items (clean, mixes) are ordered by their label's max
    ``t_m = max_k (lam_m onehot(y) + (1 - lam_m) onehot(y[pi_m]))_k`` (clean: 1), descending, and
    ``DCG = sum_r g_r / log2(r + 1)`` with gains the max softmax confidences, ``IDCG`` the same with gains
    the ``t``; ``NDCG = DCG/IDCG`` if ``IDCG > DCG`` else ``IDCG/DCG``;
    ``L = CE(f(x), y) + weight * mean_i (1 - NDCG_i)``.
    Defaults: M = 3 (``num_mixup: 3 mndcg``), weight (``alpha`` in ``mndcg.yaml``) 0.1, Beta alpha 2.0 on
    CIFAR (1.0 on Tiny-ImageNet). Returns the clean logits."""

    def __init__(self, num_classes: int, alpha: float = 2.0, weight: float = 0.1, num_mixup: int = 3):
        super().__init__()
        self.num_classes, self.alpha, self.weight, self.num_mixup = num_classes, alpha, weight, num_mixup
        self.last_lam: list[float] = []
        self.last_perm: list[torch.Tensor] = []

    def forward(self, model, batch):
        x, y = batch["x"], batch["y"]
        logits = model(x)
        draws = [draw_mix(len(x), self.alpha, x.device) for _ in range(self.num_mixup)]
        self.last_lam, self.last_perm = [d[0] for d in draws], [d[1] for d in draws]
        mixed = model(torch.cat([_mix(x, lam, perm) for lam, perm in draws]))
        conf_mix = mixed.softmax(dim=1).max(dim=1).values.view(self.num_mixup, len(x)).t()    # B x M
        onehot = F.one_hot(y, self.num_classes).to(logits.dtype)
        t_max = torch.stack([(lam * onehot + (1.0 - lam) * onehot[perm]).max(dim=1).values
                             for lam, perm in draws], dim=1)                                 # B x M
        order = torch.argsort(t_max, dim=1, descending=True, stable=True)
        conf_clean = logits.softmax(dim=1).max(dim=1, keepdim=True).values
        gains = torch.cat([conf_clean, conf_mix.gather(1, order)], dim=1)
        ideal = torch.cat([torch.ones_like(conf_clean), t_max.gather(1, order)], dim=1)
        discount = torch.log2(torch.arange(2, self.num_mixup + 3, device=x.device, dtype=logits.dtype))
        dcg, idcg = (gains / discount).sum(dim=1), (ideal / discount).sum(dim=1)
        ndcg = torch.where(idcg > dcg, dcg / idcg, idcg / dcg)
        return F.cross_entropy(logits, y) + self.weight * (1.0 - ndcg).mean(), logits


@register_method("ls")
def label_smoothing(num_classes: int, alpha: float = 0.2) -> Method:
    """Label smoothing, alpha 0.2 (PAPER; RankMixup ``ls.yaml``), spread over all K classes."""
    return CriterionMethod(LabelSmoothingCE(alpha))


@register_method("focal")
def focal(num_classes: int, gamma: float = 3.0) -> Method:
    """Focal loss, gamma 3 (RankMixup ``focal.yaml``)."""
    return CriterionMethod(FocalLoss(gamma))


@register_method("flsd53")
def flsd53(num_classes: int, gamma: float = 3.0, gamma_low_p: float = 5.0, p_switch: float = 0.2) -> Method:
    """FLSD-53: gamma 5 when the true-class probability is below 0.2, else 3 (RankMixup
    ``focal_adaptive.yaml``)."""
    return CriterionMethod(FocalLossSD(gamma, gamma_low_p, p_switch))


@register_method("mbls")
def mbls(num_classes: int, margin: float = 6.0, alpha: float = 0.1) -> Method:
    """MbLS, margin 6, alpha 0.1 (RankMixup ``logit_margin.yaml``)."""
    return CriterionMethod(MarginLabelSmoothing(margin, alpha))


@register_method("mmce")
def mmce(num_classes: int, weight: float = 1.0) -> Method:
    """CE + 1.0 * MMCE_m, Laplacian kernel of width 0.4 (RankMixup ``mmce.yaml``)."""
    return CriterionMethod(MMCELoss(weight))


@register_method("brier")
def brier(num_classes: int) -> Method:
    """Brier score loss (RankMixup ``BrierScore``)."""
    return CriterionMethod(BrierLoss())


@register_method("mixup")
def mixup(num_classes: int, alpha: float = 2.0) -> Method:
    """Input mixup, Beta alpha 2.0 (CIFAR; pass 1.0 for Tiny-ImageNet, as RankMixup's mixup configs)."""
    return Mixup(alpha)


@register_method("regmixup")
def regmixup(num_classes: int, alpha: float = 20.0) -> Method:
    """RegMixup, Beta alpha 20 (its authors' default / CIFAR-10; 10 on CIFAR-100)."""
    return RegMixup(alpha)


@register_method("rankmixup_mrl")
def rankmixup_mrl(num_classes: int, alpha: float = 2.0, margin: float = 2.0, weight: float = 0.1,
                  reference_broadcast: bool = False) -> Method:
    """RankMixup-MRL: margin 2.0 (1.0 Tiny), weight 0.1, Beta alpha 2.0 (1.0 Tiny), one mixed copy."""
    return RankMixupMRL(alpha, margin, weight, reference_broadcast)


@register_method("rankmixup_mndcg")
def rankmixup_mndcg(num_classes: int, alpha: float = 2.0, weight: float = 0.1, num_mixup: int = 3) -> Method:
    """RankMixup-M-NDCG: 3 mixed copies, weight 0.1, Beta alpha 2.0 (1.0 Tiny)."""
    return RankMixupMNDCG(num_classes, alpha, weight, num_mixup)
