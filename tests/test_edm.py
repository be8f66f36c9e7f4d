"""Tests for semmix_lib.edm: the Karras schedule, the Heun sampler against distributions whose exact
denoiser is known, the official DDPM++ CIFAR network, the preconditionings, the loss and the EMA.

Facts about the official networks (names, shapes, formulas) are taken from NVlabs/edm
(``training/networks.py``, ``generate.py``, ``training/loss.py``, ``training/training_loop.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from semmix_lib.edm import (
    EDM_CONFIGS,
    EDMPrecond,
    VPPrecond,
    build_edm,
    edm_loss,
    ema_beta,
    ema_update,
    heun_sampler,
    karras_sigmas,
)

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
N_SAMPLES = 20_000
Z = 4.5  # tolerance in standard errors for the statistical checks (two-sided p ~ 7e-6 per check)


# --------------------------------------------------------------------------------------------------
# Analytic "networks": exact denoisers D(x; sigma) = E[y | y + sigma n = x], in float64.

class _Stub(nn.Module):
    """What heun_sampler needs from a network: sigma_min / sigma_max / round_sigma and forward.
    Counts calls and records the noise levels it is evaluated at."""

    sigma_min = 0.0
    sigma_max = float("inf")

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.sigmas: list[float] = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        self.sigmas.append(float(torch.as_tensor(sigma).flatten()[0]))
        return self.denoise(x, torch.as_tensor(sigma, dtype=torch.float64), class_labels)


class GaussianDenoiser(_Stub):
    """Data N(mu, s^2) independently per channel: D = (s^2 x + sigma^2 mu) / (s^2 + sigma^2).
    With ``class_mus`` the mean is a linear function of the (soft) class vector: mu = c @ class_mus."""

    def __init__(self, mu=0.0, s=1.0, class_mus=None):
        super().__init__()
        self.mu = torch.as_tensor(mu, dtype=torch.float64).reshape(1, -1, 1, 1)
        self.s = torch.as_tensor(s, dtype=torch.float64).reshape(1, -1, 1, 1)
        self.class_mus = None if class_mus is None else torch.as_tensor(class_mus, dtype=torch.float64)

    def denoise(self, x, sigma, class_labels):
        mu = self.mu
        if self.class_mus is not None:
            mu = (class_labels.to(torch.float64) @ self.class_mus).reshape(-1, 1, 1, 1)
        s2 = self.s ** 2
        return (s2 * x + sigma ** 2 * mu) / (s2 + sigma ** 2)


class MixtureDenoiser(_Stub):
    """1-D mixture sum_k w_k N(m_k, s_k^2): D = sum_k r_k(x) (s_k^2 x + sigma^2 m_k) / (s_k^2 + sigma^2)
    with posterior responsibilities r_k(x) proportional to w_k N(x; m_k, s_k^2 + sigma^2)."""

    def __init__(self, weights, means, stds):
        super().__init__()
        self.w, self.m, self.s = (torch.as_tensor(v, dtype=torch.float64) for v in (weights, means, stds))

    def denoise(self, x, sigma, class_labels):
        var = self.s ** 2 + sigma ** 2
        logp = self.w.log() - 0.5 * (x[..., None] - self.m) ** 2 / var - 0.5 * var.log()
        post_mean = (self.s ** 2 * x[..., None] + sigma ** 2 * self.m) / var
        return (logp.softmax(-1) * post_mean).sum(-1)


def _heun_gain(s: float, num_steps: int) -> float:
    """For Gaussian data the probability-flow ODE is linear: d(x - mu)/dsigma = sigma (x - mu) / (s^2 + sigma^2).
    Algorithm 2 (churn-free) therefore maps x - mu at sigma_max to G * (x - mu) at 0; G is computed here
    step by step in plain Python floats (Euler + trapezoidal correction, Euler on the last step)."""
    t = [(SIGMA_MAX ** (1 / RHO) + i / (num_steps - 1) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
         for i in range(num_steps)] + [0.0]
    f = lambda sig: sig / (s * s + sig * sig)  # noqa: E731
    gain = 1.0
    for i in range(num_steps):
        h = t[i + 1] - t[i]
        euler = 1 + h * f(t[i])
        gain *= euler if i == num_steps - 1 else 1 + h / 2 * (f(t[i]) + f(t[i + 1]) * euler)
    return gain


def _latents(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# Noise schedule, EDM Eq. 5.

def test_karras_sigmas_schedule():
    n = 18
    t = karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, RHO)
    assert t.shape == (n + 1,) and t.dtype == torch.float64
    assert t[0].item() == pytest.approx(80.0, rel=1e-12)
    assert t[n - 1].item() == pytest.approx(0.002, rel=1e-12)
    assert t[n].item() == 0.0
    assert bool((t[1:] < t[:-1]).all())
    # Eq. 5 by hand for i = 9: (80^(1/7) + 9/17 (0.002^(1/7) - 80^(1/7)))^7
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)  # 1.870122..., 0.411560...
    expected = (a + 9 / 17 * (b - a)) ** 7
    assert expected == pytest.approx(1.9233398370400499, rel=1e-14)  # 40-digit decimal arithmetic
    assert t[9].item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        karras_sigmas(1)


# --------------------------------------------------------------------------------------------------
# Sampler against analytic distributions.

@pytest.mark.parametrize("num_steps", [18, 32])
def test_heun_gaussian_matches_closed_form_map(num_steps):
    """Per sample, the sampler output equals mu + G (sigma_max z - mu) with G from the closed-form recursion."""
    mu, s = [1.5, -0.7], [0.5, 1.2]
    z = _latents((2000, 2, 1, 1), seed=0)
    x = heun_sampler(GaussianDenoiser(mu, s), z, num_steps=num_steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO)
    assert x.shape == z.shape and x.dtype == torch.float64
    for c in range(2):
        expected = mu[c] + _heun_gain(s[c], num_steps) * (SIGMA_MAX * z[:, c] - mu[c])
        torch.testing.assert_close(x[:, c], expected, rtol=1e-10, atol=1e-10)


def test_heun_gain_converges_second_order_to_exact_ode():
    """The exact ODE gain is s / sqrt(s^2 + sigma_max^2); Heun's error shrinks ~4x per doubling of steps."""
    s = 0.5
    exact = s / math.sqrt(s * s + SIGMA_MAX ** 2)
    errors = [_heun_gain(s, n) / exact - 1 for n in (16, 32, 64, 128)]
    assert 0 < errors[-1] < errors[0] < 0.08  # 16 steps: +7.2% in the output spread; 128 steps: +0.09%
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0


def test_heun_gaussian_sample_statistics():
    """20,000 draws per channel from N(mu, s^2) with 32 steps: mean / std within 4.5 standard errors of
    the sampler's predicted law, and within that plus the known 2nd-order bias of the true data law."""
    mu, s, n_steps = np.array([1.5, -0.7]), np.array([0.5, 1.2]), 32
    z = _latents((N_SAMPLES, 2, 1, 1), seed=1)
    x = heun_sampler(GaussianDenoiser(mu, s), z, num_steps=n_steps).numpy()[:, :, 0, 0]
    for c in range(2):
        gain = _heun_gain(s[c], n_steps)
        pred_std = SIGMA_MAX * gain  # output = mu (1 - G) + sigma_max G z with z ~ N(0, 1)
        pred_mean = mu[c] * (1 - gain)
        se_mean, se_std = pred_std / math.sqrt(N_SAMPLES), pred_std / math.sqrt(2 * N_SAMPLES)
        assert abs(x[:, c].mean() - pred_mean) < Z * se_mean
        assert abs(x[:, c].std(ddof=1) - pred_std) < Z * se_std
        # against the data law itself: bias = |pred - truth| (1.6% of s in std, ~1% of s in mean)
        assert abs(x[:, c].mean() - mu[c]) < Z * se_mean + abs(pred_mean - mu[c])
        assert abs(x[:, c].std(ddof=1) - s[c]) < Z * se_std + abs(pred_std - s[c])
        assert abs(x[:, c].std(ddof=1) / s[c] - 1) < 0.03


def test_heun_gaussian_mixture_weights_and_means():
    """Two-component 1-D mixture, 32 steps. Latents are drawn from the exact sigma_max marginal,
    z = (y + sigma_max n) / sigma_max, so the exact flow maps them onto the data law itself; the
    components are separated at 0 (P(N(-2, 0.5^2) > 0) = 3e-5)."""
    w, m, sd, n_steps = [0.3, 0.7], [-2.0, 2.0], [0.5, 0.5], 32
    g = torch.Generator().manual_seed(2)
    comp = (torch.rand(N_SAMPLES, generator=g) < w[1]).long()
    y = torch.tensor(m, dtype=torch.float64)[comp] + sd[0] * torch.randn(N_SAMPLES, generator=g, dtype=torch.float64)
    z = (y / SIGMA_MAX + torch.randn(N_SAMPLES, generator=g, dtype=torch.float64)).reshape(-1, 1, 1, 1)
    x = heun_sampler(MixtureDenoiser(w, m, sd), z, num_steps=n_steps).flatten()

    frac = (x > 0).double().mean().item()
    assert abs(frac - w[1]) < Z * math.sqrt(w[0] * w[1] / N_SAMPLES)  # 0.7 +- 0.015
    assert (x.abs() < 1).double().mean().item() < 0.04  # 2 sd from both means: 2.3% in the exact law
    for k, part in enumerate((x[x < 0], x[x > 0])):
        n_k = part.numel()
        assert abs(part.mean().item() - m[k]) < Z * sd[k] / math.sqrt(n_k) + 0.01
        # 32-step Heun inflates the spread by ~1.6% (see the Gaussian tests); allow 3%
        assert abs(part.std().item() - sd[k]) < Z * sd[k] / math.sqrt(2 * n_k) + 0.03 * sd[k]
    # in 1-D the flow is monotone: the sampler preserves the order of the latents
    order = torch.argsort(z.flatten())
    assert bool((x[order].diff() >= 0).all())


def test_heun_soft_class_vector_moves_mean_linearly():
    """CSM's premise on an analytic model: mu = lam mu1 + (1 - lam) mu2 selected by the soft class vector
    (lam, 1 - lam) through a linear map; the samples (not just their mean) are affine in lam."""
    mu1, mu2, s = 2.0, -1.0, 0.5
    net = GaussianDenoiser(s=s, class_mus=[mu1, mu2])
    z = _latents((N_SAMPLES, 1, 1, 1), seed=3)
    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    outs = {}
    for lam in lams:
        labels = torch.tensor([[lam, 1 - lam]], dtype=torch.float64).expand(N_SAMPLES, 2)
        outs[lam] = heun_sampler(net, z, labels, num_steps=18).flatten()
    for lam in lams:
        torch.testing.assert_close(outs[lam], lam * outs[1.0] + (1 - lam) * outs[0.0], rtol=0, atol=1e-9)
    means = np.array([outs[lam].mean().item() for lam in lams])
    slope, intercept = np.polyfit(lams, means, 1)
    assert np.abs(means - (slope * np.array(lams) + intercept)).max() < 1e-9
    gain = _heun_gain(s, 18)
    assert slope == pytest.approx((mu1 - mu2) * (1 - gain), rel=1e-9)  # = 3 (1 - 0.0066)
    se = SIGMA_MAX * gain / math.sqrt(N_SAMPLES)
    for lam, mean in zip(lams, means):
        assert abs(mean - (lam * mu1 + (1 - lam) * mu2)) < Z * se + 0.01 * abs(mu1 - mu2)


# --------------------------------------------------------------------------------------------------
# Sampler mechanics.

@pytest.mark.parametrize("num_steps", [2, 5, 18])
def test_heun_number_and_order_of_evaluations(num_steps):
    net = GaussianDenoiser(0.0, 1.0)
    heun_sampler(net, _latents((4, 1, 1, 1), seed=0), num_steps=num_steps)
    assert net.calls == 2 * num_steps - 1
    t = karras_sigmas(num_steps).tolist()
    # Euler at t_i, then the correction at t_{i+1}; no correction on the final step to sigma = 0
    expected = [v for i in range(num_steps - 1) for v in (t[i], t[i + 1])] + [t[num_steps - 1]]
    assert net.sigmas == pytest.approx(expected, rel=1e-12)


def test_heun_clamps_to_network_sigma_range():
    net = GaussianDenoiser(0.0, 1.0)
    net.sigma_min, net.sigma_max = 0.01, 10.0
    heun_sampler(net, _latents((4, 1, 1, 1), seed=0), num_steps=6)
    assert net.sigmas[0] == pytest.approx(10.0) and net.sigmas[-1] == pytest.approx(0.01)
    assert net.sigmas == pytest.approx([v for v in karras_sigmas(6, 0.01, 10.0).tolist()[:-1] for _ in (0, 1)][1:])


def _seeded_randn_like(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = build_edm("digits-small", 8, 1, 10).eval()
    with torch.no_grad():  # the output layer is initialised at 1e-5: give the network a non-trivial output
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_heun_deterministic_and_churn_reproducible(small_net):
    z = _latents((3, 1, 8, 8), seed=4)
    labels = torch.eye(10)[:3]
    a = heun_sampler(small_net, z, labels, num_steps=4)
    b = heun_sampler(small_net, z.clone(), labels, num_steps=4)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    # with S_churn = 0 no noise is drawn at all
    def no_noise(x):
        raise AssertionError("randn_like called with S_churn = 0")

    assert torch.equal(heun_sampler(small_net, z, labels, num_steps=4, randn_like=no_noise), a)
    c1 = heun_sampler(small_net, z, labels, num_steps=4, S_churn=10, randn_like=_seeded_randn_like(7))
    c2 = heun_sampler(small_net, z, labels, num_steps=4, S_churn=10, randn_like=_seeded_randn_like(7))
    c3 = heun_sampler(small_net, z, labels, num_steps=4, S_churn=10, randn_like=_seeded_randn_like(8))
    assert torch.equal(c1, c2)
    assert (c1 - a).abs().max() > 1e-3 and (c3 - c1).abs().max() > 1e-3


@pytest.mark.parametrize("churn, s_min, s_max", [(1.0, 0.0, float("inf")), (10.0, 0.0, float("inf")),
                                                 (10.0, 0.05, 50.0)])
def test_heun_churn_noise_levels(churn, s_min, s_max):
    """Algorithm 2 lines 4-5: t_hat = (1 + gamma) t_i with gamma = min(S_churn / N, sqrt(2) - 1) inside
    [S_min, S_max], 0 outside; the evaluation count is unchanged."""
    net = GaussianDenoiser(0.0, 1.0)
    n = 5
    heun_sampler(net, _latents((4, 1, 1, 1), seed=0), num_steps=n, S_churn=churn, S_min=s_min, S_max=s_max,
                 randn_like=_seeded_randn_like(0))
    assert net.calls == 2 * n - 1
    gamma = min(churn / n, math.sqrt(2) - 1)  # 0.2, then capped at 0.4142
    t = karras_sigmas(n).tolist()
    t_hat = [(1 + gamma) * v if s_min <= v <= s_max else v for v in t[:n]]
    assert net.sigmas[0::2] == pytest.approx(t_hat, rel=1e-12)
    assert net.sigmas[1::2] == pytest.approx(t[1:n], rel=1e-12)


# --------------------------------------------------------------------------------------------------
# The official DDPM++ CIFAR network (VPPrecond + SongUNet, NVlabs/edm train.py --arch=ddpmpp --cond=1).

@pytest.fixture(scope="module")
def cifar_net():
    torch.manual_seed(0)
    return build_edm("cifar-ddpmpp", 32, 3, 10).eval()


def test_cifar_ddpmpp_parameter_count(cifar_net):
    assert isinstance(cifar_net, VPPrecond)
    assert sum(p.numel() for p in cifar_net.parameters()) == 55_735_299


def test_cifar_ddpmpp_state_dict_matches_official_layout(cifar_net):
    sd = cifar_net.state_dict()
    # 427 entries, in the official order (checked by loading into NVlabs/edm's VPPrecond strictly)
    assert len(sd) == 427
    expected = {
        "model.map_label.weight": (128, 10),            # Linear(label_dim, noise_channels = 128)
        "model.map_label.bias": (128,),
        "model.map_augment.weight": (128, 9),           # augment_dim = 9, no bias
        "model.map_layer0.weight": (512, 128),          # emb_channels = 128 * channel_mult_emb 4
        "model.map_layer1.weight": (512, 512),
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3),   # channel_mult = [2, 2, 2]
        "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "model.enc.32x32_block0.affine.weight": (256, 512),        # adaptive_scale = False
        "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),      # resample_proj = True
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.enc.16x16_block0.proj.weight": (256, 256, 1, 1),
        "model.dec.8x8_in0.qkv.weight": (768, 256, 1, 1),
        "model.dec.16x16_up.conv0.resample_filter": (1, 1, 2, 2),
        "model.dec.16x16_block0.conv0.weight": (256, 512, 3, 3),   # concatenated skip
        "model.dec.32x32_block4.conv0.weight": (256, 384, 3, 3),   # 256 + the 128-channel stem
        "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert "model.map_augment.bias" not in sd
    assert "model.enc.8x8_down.conv0.resample_filter" in sd and "model.dec.32x32_up.skip.resample_filter" in sd
    for name, buf in sd.items():
        if name.endswith("resample_filter"):  # [1, 1] outer [1, 1] / 4
            torch.testing.assert_close(buf, torch.full((1, 1, 2, 2), 0.25))
    attn = {n.rsplit(".qkv.weight", 1)[0] for n in sd if n.endswith(".qkv.weight")}
    assert attn == {f"model.enc.16x16_block{i}" for i in range(4)} | {"model.dec.16x16_block4", "model.dec.8x8_in0"}
    enc = [n for n in cifar_net.model.enc]
    dec = [n for n in cifar_net.model.dec]
    assert enc == ["32x32_conv", *[f"32x32_block{i}" for i in range(4)], "16x16_down",
                   *[f"16x16_block{i}" for i in range(4)], "8x8_down", *[f"8x8_block{i}" for i in range(4)]]
    assert dec == ["8x8_in0", "8x8_in1", *[f"8x8_block{i}" for i in range(5)], "16x16_up",
                   *[f"16x16_block{i}" for i in range(5)], "32x32_up", *[f"32x32_block{i}" for i in range(5)],
                   "32x32_aux_norm", "32x32_aux_conv"]


def test_cifar_ddpmpp_forward_shape(cifar_net):
    torch.manual_seed(0)
    x = 10 * torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[0.0] * 10, [0.0] * 10])
    labels[0, 3], labels[1, 3], labels[1, 7] = 1.0, 0.4, 0.6  # a hard and a soft class vector
    with torch.no_grad():
        out = cifar_net(x, torch.tensor([2.0, 0.5]), labels)
        out_aug = cifar_net(x, torch.tensor([2.0, 0.5]), labels, augment_labels=torch.zeros(2, 9))
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out_aug, out)  # zero augmentation labels add nothing (no bias)
    # VP: D = x - sigma F with F ~ 0 at initialisation (output layer initialised at 1e-5)
    assert (out - x).abs().max() < 0.1 * x.abs().max()


def test_digits_small_parameter_count(small_net):
    # same count as the official SongUNet with these keyword arguments
    assert isinstance(small_net, EDMPrecond)
    assert sum(p.numel() for p in small_net.parameters()) == 384_577


# --------------------------------------------------------------------------------------------------
# Preconditioning, EDM Table 1 and Eq. 7.

def test_edm_precond_coefficients_by_hand():
    net = EDMPrecond(8, 1, 0, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma)
    # sigma_data = 0.5; at sigma = 0.5: c_skip = 0.25 / 0.5, c_out = 0.25 / sqrt(0.5), c_in = 1 / sqrt(0.5)
    torch.testing.assert_close(c_skip, torch.tensor([0.25 / 0.250004, 0.5, 0.25 / 6400.25], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([0.001 / math.sqrt(0.250004), 0.25 / math.sqrt(0.5),
                                                    40 / math.sqrt(6400.25)], dtype=torch.float64))
    torch.testing.assert_close(c_in, torch.tensor([1 / math.sqrt(0.250004), math.sqrt(2), 1 / math.sqrt(6400.25)],
                                                  dtype=torch.float64))
    torch.testing.assert_close(c_noise, torch.tensor([math.log(0.002) / 4, math.log(0.5) / 4, math.log(80) / 4],
                                                     dtype=torch.float64))
    # unit variance (EDM Appendix B.6): network input c_in (y + n) and effective training target
    # (y - c_skip (y + n)) / c_out both have unit variance when y ~ (0, s_d^2), n ~ (0, sigma^2)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(c_in ** 2 * (sigma ** 2 + 0.25), ones)
    torch.testing.assert_close(((1 - c_skip) ** 2 * 0.25 + c_skip ** 2 * sigma ** 2) / c_out ** 2, ones)


class _EchoModel(nn.Module):
    """Replaces the U-Net: F(x_in; c_noise) = 2 x_in, recording what it was given."""

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.x_in, self.noise_labels, self.class_labels = x, noise_labels, class_labels
        return 2 * x


@pytest.mark.parametrize("kind", ["EDMPrecond", "VPPrecond"])
def test_precond_forward_applies_eq7(kind):
    cfg = dict(precond=kind, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    net = build_edm(cfg, 8, 1, 4)
    net.model = _EchoModel()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    labels = torch.eye(4)[:3]
    out = net(x, sigma, labels)
    s = sigma.reshape(-1, 1, 1, 1)
    if kind == "EDMPrecond":
        c_skip, c_out, c_in = 0.25 / (s ** 2 + 0.25), 0.5 * s / (s ** 2 + 0.25).sqrt(), 1 / (s ** 2 + 0.25).sqrt()
        c_noise = sigma.log() / 4
    else:
        c_skip, c_out, c_in = 1.0, -s, 1 / (s ** 2 + 1).sqrt()
        t = ((0.1 ** 2 + 2 * 19.9 * (1 + sigma ** 2).log()).sqrt() - 0.1) / 19.9
        c_noise = 999 * t  # evaluated in float32 by the network (as in the official code): ~1e-4 relative
    assert out.dtype == torch.float32 and net.model.x_in.dtype == torch.float32
    torch.testing.assert_close(net.model.x_in.double(), c_in * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net.model.noise_labels.double(), c_noise, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(out.double(), c_skip * x + c_out * 2 * c_in * x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.model.class_labels, labels)
    net(x, sigma)  # no labels: a zero class vector
    assert torch.equal(net.model.class_labels, torch.zeros(1, 4))


@pytest.mark.parametrize("kind", ["EDMPrecond", "VPPrecond"])
def test_denoiser_tends_to_identity_as_sigma_vanishes(kind, small_net):
    if kind == "EDMPrecond":
        net = small_net
    else:
        net = build_edm(dict(EDM_CONFIGS["digits-small"], precond="VPPrecond"), 8, 1, 10).eval()
        net.load_state_dict(small_net.state_dict())
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    labels = torch.eye(10)[:4]
    with torch.no_grad():
        far = (net(x, torch.full((4,), 1.0), labels) - x).abs().max().item()
        gaps = [(net(x, torch.full((4,), sig), labels) - x).abs().max().item() for sig in (1e-2, 1e-3, 1e-4)]
    assert far > 0.05  # not trivially the identity
    assert gaps[-1] < 1e-3 * max(far, 1.0)
    assert gaps[0] > gaps[1] > gaps[2]


def test_vp_precond_sigma_roundtrip_and_range():
    net = VPPrecond(8, 1, 0, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    s = torch.logspace(-3, 2.5, 50, dtype=torch.float64)
    torch.testing.assert_close(net.sigma(net.sigma_inv(s)), s, rtol=1e-9, atol=0)
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t, rtol=1e-8, atol=0)
    assert net.sigma_max == float(net.sigma(1)) == pytest.approx(math.sqrt(math.exp(19.9 / 2 + 0.1) - 1), rel=1e-6)
    assert net.sigma_max == pytest.approx(152.167, abs=1e-3)
    assert net.sigma_min == float(net.sigma(1e-5))
    # sqrt(expm1(1e-6 + 9.95e-10)) = 1.0004976e-3, but as in the official code it is evaluated in float32
    # (exp(1e-6) - 1 rounds to 2^-20), giving 2^-10; the sampler's 0.002 floor makes this moot.
    assert net.sigma_min == pytest.approx(2 ** -10, rel=1e-6)
    assert float(net.sigma(torch.tensor(1e-5, dtype=torch.float64))) == pytest.approx(
        math.sqrt(math.expm1(0.5 * 19.9e-10 + 0.1e-5)), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# The class label enters through a linear map: soft vectors interpolate the embedding.

def test_map_label_is_affine_and_soft_labels_interpolate(small_net):
    ml = small_net.model.map_label
    e1, e2 = torch.eye(10)[2:3], torch.eye(10)[7:8]
    with torch.no_grad():
        for lam in (0.0, 0.3, 0.5, 0.9):
            mix = ml(lam * e1 + (1 - lam) * e2)
            torch.testing.assert_close(mix, lam * ml(e1) + (1 - lam) * ml(e2), rtol=1e-5, atol=1e-6)
        # affine, not linear: the bias appears once, so ml(2 e1) = 2 ml(e1) - bias
        torch.testing.assert_close(ml(2 * e1), 2 * ml(e1) - ml.bias, rtol=1e-5, atol=1e-6)
        assert ml.bias.abs().max() > 1e-2  # (zero at initialisation; the fixture perturbed it)

    # inside the network: the input of map_layer0 (noise embedding + label embedding) interpolates
    seen = []
    hook = small_net.model.map_layer0.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    try:
        x, sigma, lam = torch.randn(1, 1, 8, 8), torch.tensor([0.7]), 0.3
        with torch.no_grad():
            for c in (e1, e2, lam * e1 + (1 - lam) * e2):
                small_net(x, sigma, c)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[2], lam * seen[0] + (1 - lam) * seen[1], rtol=1e-5, atol=1e-6)
    assert (seen[0] - seen[1]).abs().max() > 1e-2  # the classes do change the embedding
    # the class vector is scaled by sqrt(label_dim) before map_label (official networks)
    with torch.no_grad():
        noise_only = seen[0] - ml(e1 * math.sqrt(10))
        torch.testing.assert_close(seen[1] - ml(e2 * math.sqrt(10)), noise_only, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# EDM loss, Eq. 2 with Table 1's p(sigma) and lambda(sigma).

class _ConstDenoiser(nn.Module):
    """D(x; sigma) = target (a point mass at target is perfectly denoised by returning it)."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.x, self.sigma = x, sigma
        return torch.zeros_like(x) + self.target


def test_edm_loss_shape_and_perfect_denoiser():
    torch.manual_seed(0)
    y = torch.randn(6, 3, 4, 4)
    net = _ConstDenoiser(y)
    loss = edm_loss(net, y, torch.eye(10)[:6])
    assert loss.shape == y.shape
    assert torch.equal(loss, torch.zeros_like(y))


def test_edm_loss_weighting_and_noise():
    y = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    net = _ConstDenoiser(0.0)
    torch.manual_seed(123)
    loss = edm_loss(net, y)
    torch.manual_seed(123)
    rnd = torch.randn(5, 1, 1, 1)
    sigma = (rnd * 1.2 - 1.2).exp()  # ln sigma ~ N(P_mean = -1.2, P_std = 1.2)
    noise = torch.randn_like(y) * sigma
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2  # lambda(sigma), sigma_data = 0.5
    torch.testing.assert_close(net.sigma, sigma)
    torch.testing.assert_close(net.x, y + noise)
    torch.testing.assert_close(loss, weight * y ** 2)
    # custom P_mean / P_std / sigma_data are honoured
    torch.manual_seed(5)
    loss2 = edm_loss(net, y, P_mean=0.0, P_std=0.5, sigma_data=1.0)
    torch.manual_seed(5)
    sigma2 = (torch.randn(5, 1, 1, 1) * 0.5).exp()
    torch.testing.assert_close(loss2, (sigma2 ** 2 + 1) / sigma2 ** 2 * y ** 2)


def test_edm_loss_is_one_for_exact_denoiser_of_sigma_data_gaussian():
    """For data N(0, s_d^2) the exact denoiser's error has variance s_d^2 sigma^2 / (s_d^2 + sigma^2) = 1 / lambda:
    the weighted loss is chi^2_1 with mean 1 at every sigma (EDM's unit-loss design)."""
    torch.manual_seed(0)
    y = 0.5 * torch.randn(1000, 1, 8, 8, dtype=torch.float64)
    net = GaussianDenoiser(0.0, 0.5)
    loss = edm_loss(net, y)
    n = loss.numel()
    assert abs(loss.mean().item() - 1) < Z * math.sqrt(2 / n)  # 1 +- 0.025


# --------------------------------------------------------------------------------------------------
# EMA of the weights (EDM training loop: half-life in images, ramp-up with the images seen).

def test_ema_beta_by_hand():
    assert ema_beta(10_000, 512, 512, rampup_ratio=None) == pytest.approx(0.5)
    assert ema_beta(10_000, 512, 512) == pytest.approx(0.5)  # 10_000 * 512 * 0.05 >> 512: no ramp-up
    assert ema_beta(10, 512, 512) == pytest.approx(0.25)  # half-life min(512, 5120 * 0.05 = 256)
    assert ema_beta(0, 512, 512) == 0.0  # the first update copies the network
    assert ema_beta(100, 100, 1000, rampup_ratio=None) ** 10 == pytest.approx(0.5)  # 10 steps = 1 half-life
    assert ema_beta(1, 256, 500_000) == pytest.approx(0.5 ** (256 / 12.8))


def test_ema_update_lerps_parameters_and_copies_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    net[1].running_mean.fill_(0.7)
    old = [p.detach().clone() for p in ema.parameters()]
    new = [p.detach().clone() for p in net.parameters()]
    beta = 0.3
    ema_update(ema, net, beta)
    for p_ema, o, n in zip(ema.parameters(), old, new):
        torch.testing.assert_close(p_ema, beta * o + (1 - beta) * n)
    for p, n in zip(net.parameters(), new):
        assert torch.equal(p, n)
    assert torch.equal(ema[1].running_mean, torch.full((3,), 0.7))
    ema_update(ema, net, 0.0)
    for p_ema, n in zip(ema.parameters(), new):
        assert torch.equal(p_ema, n)


# --------------------------------------------------------------------------------------------------
# Training sanity: the small network learns a fixed batch of digits.

def test_tiny_edm_training_reduces_loss():
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    images = torch.tensor(digits.images[:32], dtype=torch.float32)[:, None] / 8 - 1  # [0, 16] -> [-1, 1]
    labels = torch.eye(10)[torch.tensor(digits.target[:32])]
    torch.manual_seed(0)
    net = build_edm("digits-small", 8, 1, 10).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):
        loss = edm_loss(net, images, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert np.isfinite(losses).all()
    assert last < 0.75 * first, (first, last)
