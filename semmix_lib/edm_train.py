"""Train a small class-conditional EDM on a dataset's training split (when no pretrained one exists).

The embedded study has no pretrained diffusion model for its 8x8 digits, so it trains one: the EDM
loss (:func:`semmix_lib.edm.edm_loss`, EDM Eq. 2 with Table 1's log-normal sigma) with Adam, a
linear learning-rate warm-up, and an EMA of the weights whose half-life ramps up as in EDM's own
training loop. The EMA network is what generation uses. A run is resumable: ``state.pt`` holds the
network, EMA, optimiser and RNG states after the last checkpointed step, and the finished EMA is
saved as ``edm.pt`` in the format :func:`semmix_lib.edm.load_edm_checkpoint` reads.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from .progress import tqdm

from .edm import build_edm, edm_loss, ema_beta, ema_update
from .io import load_checkpoint, read_json, save_checkpoint, write_json
from .runs import RunMismatchError

__all__ = ["EDMTrainConfig", "train_edm", "images_in_unit_range"]


@dataclass
class EDMTrainConfig:
    config: str = "digits-small"     # a name in semmix_lib.edm.EDM_CONFIGS
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    lr_rampup_steps: int = 200
    ema_halflife_nimg: float = 20_000
    ema_rampup_ratio: float = 0.05
    xflip: bool = False               # horizontal flips as augmentation (not for digits)
    seed: int = 0
    checkpoint_every: int = 250


def images_in_unit_range(dataset, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a (non-augmenting) dataset mapped to EDM's [-1, 1] range, and their labels.

    The dataset yields ``Normalize(mean, std)``-ed tensors of pixels in [0, 1]; undo that, then
    ``x * 2 - 1``.
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=512, shuffle=False)
    xs, ys = zip(*[(x, torch.as_tensor(y)) for x, y in loader])
    x = torch.cat(xs)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m) * 2 - 1, torch.cat(ys).long()


def _check_folder(out_dir: Path, config: dict) -> None:
    path = out_dir / "edm_config.json"
    if path.exists() and read_json(path) != config:
        old = read_json(path)
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise RunMismatchError(f"{out_dir} holds an EDM trained with other settings (differs in: "
                               f"{', '.join(diff)}); use another folder or delete it to retrain")
    write_json(path, config)


def train_edm(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: EDMTrainConfig, out_dir,
              device: str | torch.device = "cpu", progress: bool = True, data_fingerprint: str | None = None):
    """Train (or resume, or load) a class-conditional EDM on ``images`` in [-1, 1]; returns the EMA net."""
    from .edm_checkpoint import load_edm_checkpoint, save_edm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_folder(out_dir, {**asdict(cfg), "num_classes": num_classes, "data": data_fingerprint,
                            "image_shape": list(images.shape[1:])})
    if (out_dir / "edm.pt").exists():
        return load_edm_checkpoint(out_dir / "edm.pt", device=device)

    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    c, h, _ = images.shape[1:]
    net = build_edm(cfg.config, img_resolution=h, img_channels=c, label_dim=num_classes).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(cfg.seed)
    onehot = torch.eye(num_classes)[labels]
    step, losses = 0, []
    if (out_dir / "state.pt").exists():
        state = load_checkpoint(out_dir / "state.pt")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step, losses = state["step"], state["losses"]

    bar = tqdm(total=cfg.steps, initial=step, desc="EDM training", disable=not progress)
    while step < cfg.steps:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x, y = images[idx], onehot[idx]
        if cfg.xflip:
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        for group in opt.param_groups:  # linear warm-up, as EDM's lr_rampup
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.lr_rampup_steps, 1))
        loss = edm_loss(net, x.to(device), y.to(device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_update(ema, net, ema_beta(step, cfg.batch_size, cfg.ema_halflife_nimg, cfg.ema_rampup_ratio))
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}", refresh=False)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(out_dir / "state.pt", {"net": net.state_dict(), "ema": ema.state_dict(),
                                                    "opt": opt.state_dict(), "gen": gen.get_state(),
                                                    "torch_rng": torch.get_rng_state(), "step": step,
                                                    "losses": losses})
    bar.close()
    with open(out_dir / "edm_loss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("step", "loss"), *enumerate(losses, 1)])
    save_edm(out_dir / "edm.pt", ema)
    (out_dir / "state.pt").unlink(missing_ok=True)
    return ema.eval()
