"""EDM, Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models".

What CSM's generation stage needs (PAPER.md section 1), written for this project:

* the DDPM++ U-Net (:class:`SongUNet`, Song et al. 2021, as re-implemented by EDM) whose class label
  enters through a *linear* map, so a soft class vector ``lam * e_c1 + (1 - lam) * e_c2`` is a valid
  condition;
* the preconditionings :class:`VPPrecond` (EDM Table 1, "VP" column, used by the official CIFAR
  checkpoints) and :class:`EDMPrecond` (Table 1, "EDM" column, used for models we train ourselves);
* the deterministic / stochastic 2nd-order Heun sampler of EDM Algorithm 2 over the Karras noise
  schedule (Eq. 5), :func:`heun_sampler`;
* the EDM training loss (Eq. 2 with the log-normal ``p(sigma)`` and ``lambda(sigma)`` of Table 1) and
  an exponential moving average of the weights.

Module and parameter names follow the official networks exactly (``map_label``, ``enc.32x32_block0
.conv0.weight``, ...) so that the official weights load strictly (see :mod:`semmix_lib.edm_checkpoint`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding", "SongUNet",
    "VPPrecond", "EDMPrecond", "PRECONDITIONERS", "karras_sigmas", "heun_sampler", "edm_loss",
    "ema_beta", "ema_update", "EDM_CONFIGS", "build_edm", "load_edm_checkpoint", "check_compatible",
]


# --------------------------------------------------------------------------------------------------
# Layers. Weights are cast to the activation dtype in forward, as in the official networks, so the
# same module runs in float32 or (with ``use_fp16``) float16.

def _init_weight(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """The initialisers of the official networks (uniform ones scaled to the stated variance)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init_weight([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init_weight([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """3x3 / 1x1 convolution with optional 2x up- or down-sampling by a separable FIR filter.

    ``kernel=0`` gives a pure resampling layer (no weights). ``fused_resample`` does the resampling
    and the convolution in one strided call (the NCSN++ residual encoder uses it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter=(1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        if up and down:
            raise ValueError("Conv2d cannot both up- and down-sample")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(_init_weight([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(_init_weight([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()  # normalised 2-D FIR filter
        self.register_buffer("resample_filter", f if (up or down) else None)

    def _resample(self, x, f, channels: int, f_pad: int):
        if self.up:  # zero-insertion upsampling followed by the filter (gain 4 keeps the mean)
            return F.conv_transpose2d(x, (f * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=f_pad)
        return F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=f_pad)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up or self.down:
                x = self._resample(x, f, self.in_channels, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most ``num_groups`` groups of at least ``min_channels_per_group``."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-conv, noise/label embedding added (or scale/shift), GN-SiLU-dropout-conv,
    skip connection, optional multi-head self-attention; outputs scaled by ``skip_scale``."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter=(1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None else out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def _attention(self, x):
        n, c, h, w = x.shape
        heads = self.num_heads
        # Channel layout of qkv as in the official networks: (head, channel, {q,k,v}).
        q, k, v = self.qkv(self.norm2(x)).reshape(n * heads, c // heads, 3, h * w).unbind(2)
        # softmax(q^T k / sqrt(d)) v over positions, in float32 for stability.
        a = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                           v.transpose(1, 2).float())
        return self.proj(a.transpose(1, 2).to(x.dtype).reshape(n, c, h, w))

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            x = (self._attention(x) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the noise level (DDPM++): ``[cos(x w_i), sin(x w_i)]``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise level (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net. The class vector enters as ``map_label(c * sqrt(label_dim))``: linear,
    hence defined for soft vectors, which is what semantic mixing feeds it."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10,
                 label_dropout: float = 0.0, embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard", resample_filter=(1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual") or decoder_type not in ("standard", "skip"):
            raise ValueError(f"unsupported encoder/decoder type {encoder_type!r}/{decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise level (+ class vector, + augmentation labels) -> embedding.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder: per resolution, a down block (except the first level) and num_blocks blocks.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        # Decoder: mirror image, concatenating the encoder's activations.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def _embed(self, x, noise_labels, class_labels, augment_labels):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            c = class_labels
            if self.training and self.label_dropout:
                c = c * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(c.dtype)
            emb = emb + self.map_label(c * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embed(x, noise_labels, class_labels, augment_labels)
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# --------------------------------------------------------------------------------------------------
# Preconditioning, EDM Eq. 7: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), Table 1.

MODEL_TYPES = {"SongUNet": SongUNet}


class _Precond(nn.Module):
    """Shared plumbing: build the wrapped network, shape the inputs, apply Eq. 7."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool,
                 model_type: str, model_kwargs: dict):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not implemented; available: {sorted(MODEL_TYPES)}")
        self.init_kwargs: dict = {}  # filled by the subclass: every constructor argument, for saving
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):  # -> c_skip, c_out, c_in, c_noise
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim:
            class_labels = (torch.zeros([1, self.label_dim], device=x.device) if class_labels is None
                            else class_labels.to(torch.float32).reshape(-1, self.label_dim))
        else:
            class_labels = None
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021), the official CIFAR checkpoints':
    ``c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma)``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t,
                                model_type=model_type, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        """VP noise level at time t: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1.0, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class EDMPrecond(_Precond):
    """EDM's own preconditioning: unit-variance network inputs and targets for every sigma,
    ``c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
    c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                                sigma_data=sigma_data, model_type=model_type, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        return (sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt(),
                1 / (sd ** 2 + sigma ** 2).sqrt(), sigma.log() / 4)


PRECONDITIONERS = {"VPPrecond": VPPrecond, "EDMPrecond": EDMPrecond}


# --------------------------------------------------------------------------------------------------
# Sampling: EDM Algorithm 2.

def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> torch.Tensor:
    """EDM Eq. 5: ``sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, then 0."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    s = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros_like(s[:1])])


@torch.no_grad()
def heun_sampler(net, latents, class_labels=None, num_steps: int = 18, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                 S_max: float = float("inf"), S_noise: float = 1.0, randn_like=torch.randn_like):
    """EDM Algorithm 2: Heun's 2nd-order method on the probability-flow ODE, with optional churn.

    ``latents`` are standard normal (scaled here by ``sigma_max``); with ``S_churn = 0`` (the paper's
    setting) the map from latents to images is deterministic. ``2 * num_steps - 1`` network
    evaluations. The state is kept in float64 as in the reference sampler.
    """
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", float("inf")))
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    t_steps = torch.cat([net.round_sigma(t_steps[:-1]), t_steps[-1:]])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Lines 4-6: raise the noise level to t_hat = (1 + gamma) t_cur by adding fresh noise.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        # noise is drawn on every step once churn is on (as the reference does), none without it
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur) if S_churn > 0 else x_cur
        # Lines 7-8: Euler step with d = (x - D(x; t)) / t.
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Lines 9-11: 2nd-order correction, except on the last step to sigma = 0.
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# --------------------------------------------------------------------------------------------------
# Training: EDM Eq. 2 with Table 1's p(sigma) and lambda(sigma); EMA of the weights.

def edm_loss(net, images, labels=None, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
             augment_labels=None):
    """Per-pixel EDM loss ``lambda(sigma) ||D(y + n; sigma) - y||^2`` with ``ln sigma ~ N(P_mean, P_std^2)``
    and ``lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2``. Average it for the training objective."""
    sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    noise = torch.randn_like(images) * sigma
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
    denoised = net(images + noise, sigma, labels, **kwargs)
    return weight * (denoised - images) ** 2


def ema_beta(step: int, batch_size: int, halflife_nimg: float, rampup_ratio: float | None = 0.05) -> float:
    """Per-step EMA decay for a half-life given in images; the half-life ramps up with the images
    seen so far (``rampup_ratio * nimg``), as in EDM's training loop."""
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, step * batch_size * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * net`` for parameters; buffers are copied."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


# --------------------------------------------------------------------------------------------------
# Named configurations.

#: Network settings by name. ``cifar-ddpmpp`` is the official CIFAR-10/100 checkpoints' SongUNet
#: (PAPER.md section 1, 55,735,299 parameters); ``digits-small`` (0.38M) is the embedded study's.
EDM_CONFIGS: dict[str, dict] = {
    "cifar-ddpmpp": dict(precond="VPPrecond", model_channels=128, channel_mult=[2, 2, 2], channel_mult_noise=1,
                         embedding_type="positional", encoder_type="standard", decoder_type="standard",
                         resample_filter=[1, 1], augment_dim=9, dropout=0.13),
    "digits-small": dict(precond="EDMPrecond", model_channels=32, channel_mult=[1, 1], channel_mult_emb=2,
                         num_blocks=2, attn_resolutions=[4], channel_mult_noise=1, embedding_type="positional",
                         encoder_type="standard", decoder_type="standard", resample_filter=[1, 1], dropout=0.1),
}


def build_edm(config: str | dict, img_resolution: int, img_channels: int, label_dim: int) -> nn.Module:
    """A preconditioned network from a named configuration (or a dict with ``precond`` + kwargs)."""
    if isinstance(config, str):
        if config not in EDM_CONFIGS:
            raise ValueError(f"unknown EDM config {config!r}; choose one of {sorted(EDM_CONFIGS)}")
        config = EDM_CONFIGS[config]
    kwargs = dict(config)
    precond = kwargs.pop("precond", "EDMPrecond")
    if precond not in PRECONDITIONERS:
        raise ValueError(f"unknown preconditioning {precond!r}; choose one of {sorted(PRECONDITIONERS)}")
    return PRECONDITIONERS[precond](img_resolution=img_resolution, img_channels=img_channels,
                                    label_dim=label_dim, **kwargs)


def load_edm_checkpoint(path, key: str = "ema", device="cpu") -> nn.Module:
    """Load an EDM network: an official ``.pkl`` (safely, see :mod:`semmix_lib.edm_checkpoint`) or
    one of ours (``.pt``, read with ``weights_only=True``). Returned in eval mode."""
    from .edm_checkpoint import load_edm_checkpoint as _load  # imported late: it builds on this module

    return _load(path, key=key, device=device)


def check_compatible(net: nn.Module, num_classes: int, image_shape) -> None:
    """A generator must match the dataset: class count, channels and resolution; say what differs."""
    c, h, _ = image_shape
    problems = []
    if net.label_dim != num_classes:
        problems.append(f"it is conditioned on {net.label_dim} classes, the dataset has {num_classes}")
    if net.img_channels != c or net.img_resolution != h:
        problems.append(f"it makes {net.img_channels}x{net.img_resolution}x{net.img_resolution} images, "
                        f"the dataset has {c}x{h}x{h}")
    if problems:
        raise ValueError("the EDM checkpoint does not fit this dataset: " + "; ".join(problems)
                         + ". Use the checkpoint trained for this dataset, or checkpoint='train'.")
