"""The training loop (PAPER.md section 3): SGD, MultiStep schedule, gradient clipping, best-by-val.

One call of :func:`train_run` trains one (method, seed) into its own folder::

    config.json    the settings (and the data fingerprint) the folder belongs to
    last.pt        model + optimiser + scheduler + RNG state after the last finished epoch (resume)
    checkpoint.pt  the best weights by validation accuracy (a plain state dict)
    history.csv    one row per epoch
    logits.npz     val and test logits and labels of the best weights
    metrics.json   test (and val) metrics before and after temperature scaling; marks the run done

A folder with ``metrics.json`` for the same config is returned as is; one with ``last.pt`` resumes
from it and ends with the same numbers as an uninterrupted run (on the CPU).
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from .progress import tqdm

from .calibration import fit_temperature, apply_temperature
from .io import load_checkpoint, read_json, save_arrays, save_checkpoint, write_json, load_arrays
from .losses import RAW_LAMBDA_METHODS, build_method
from .metrics import calibration_report
from .distributed import barrier, rank_and_world as world, torchrun_session
from .models import build_model
from .runs import RunMismatchError

__all__ = ["TrainConfig", "RunMismatchError", "GeneratedData", "load_generated", "train_run", "predict",
           "resolve_device", "load_run", "load_trained_model", "world", "main"]


@dataclass
class TrainConfig:
    """One training run. Defaults are the paper's CIFAR recipe (PAPER.md section 3)."""
    model: str = "resnet50"
    method: str = "ce"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [80, 120])
    gamma: float = 0.1
    grad_clip: float = 2.0
    seed: int = 12345
    ts_method: str = "grid-ece"
    n_bins: int = 15
    num_workers: int = 0
    n_aug: int = 1              # CSM: generated middle images per real image (plus the class endpoint)
    method_settings: dict = field(default_factory=dict)  # overrides of the method's defaults, e.g. {"alpha": 1.0}
    amp: str = "none"           # "bf16": bfloat16 autocast for the training forward pass (GPU)
    channels_last: bool = False # NHWC memory format (faster convolutions on recent GPUs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = [int(m) for m in d["milestones"]]
        return d


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU."""
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@torch.no_grad()
def predict(model, dataset, batch_size: int = 512, device="cpu", num_workers: int = 0):
    """Logits (float32 numpy, N x K) and labels of a whole dataset, in dataset order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(logits).numpy(), torch.cat(labels).numpy().astype(np.int64)


def _check_folder(out_dir: Path, config: dict, write: bool = True) -> None:
    path = out_dir / "config.json"
    if path.exists():
        old = read_json(path)
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise RunMismatchError(
                f"{out_dir} holds a run with other settings (differs in: {', '.join(diff)}). "
                "Use another run folder, or delete this one to retrain.")
    elif write:
        write_json(path, config)


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _batch(items, device, channels_last: bool = False) -> dict:
    """A loader's tuple as the dict methods take: x, y (+ gen_x, gen_t for CSM)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in zip(("x", "y", "gen_x", "gen_t"), items)}
    if channels_last:
        batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
    return batch


def _train_epoch(model, loader, method, optimizer, cfg: TrainConfig, device) -> dict:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for items in loader:
        batch = _batch(items, device, cfg.channels_last)
        y = batch["y"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            loss, logits = method(model, batch)
        loss = loss.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return {"train_loss": total_loss / seen, "train_acc": correct / seen}


def _write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _finish(model, splits, cfg: TrainConfig, out_dir: Path, device, history, best_epoch, wall) -> dict:
    """Best weights -> val/test logits -> temperature on val -> metrics before and after."""
    model.load_state_dict(load_checkpoint(out_dir / "checkpoint.pt"))
    val_logits, val_labels = predict(model, splits.val, device=device, num_workers=cfg.num_workers)
    test_logits, test_labels = predict(model, splits.test, device=device, num_workers=cfg.num_workers)
    save_arrays(out_dir / "logits.npz", val_logits=val_logits, val_labels=val_labels,
                test_logits=test_logits, test_labels=test_labels)
    t = fit_temperature(val_logits, val_labels, method=cfg.ts_method, n_bins=cfg.n_bins)
    metrics = {
        "dataset": splits.name, "method": cfg.method, "model": cfg.model, "seed": cfg.seed,
        "best_epoch": best_epoch, "epochs": cfg.epochs, "temperature": t, "ts_method": cfg.ts_method,
        "val": calibration_report(val_logits, val_labels, cfg.n_bins),
        "test": calibration_report(test_logits, test_labels, cfg.n_bins),
        "test_ts": calibration_report(apply_temperature(test_logits, t), test_labels, cfg.n_bins),
        "train_seconds": wall, "n_train": len(splits.train), "n_val": len(val_labels),
        "n_test": len(test_labels),
    }
    _write_history(out_dir / "history.csv", history)
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)  # the run is done; keep only the best weights
    return metrics


@dataclass
class GeneratedData:
    """What CSM-style methods train on besides the real images: the generation folder, the
    annotation table (one row per image) and a fingerprint of that table."""
    gen_dir: Path
    table: object
    fingerprint: str


def load_generated(run_dir) -> GeneratedData:
    """The generate + annotate stages' outputs of a run folder, validated against each other."""
    from .annotation import read_annotations
    from .io import sha256_file

    gen_dir, ann_dir = Path(run_dir) / "generate", Path(run_dir) / "annotate"
    table = read_annotations(ann_dir, gen_dir)
    return GeneratedData(gen_dir, table, sha256_file(ann_dir / "annotations.csv"))


def _train_set(splits, method, cfg: TrainConfig, generated: GeneratedData | None):
    """The real training split, or for CSM-style methods the real images paired with generated ones."""
    if not method.uses_generated:
        return splits.train
    if generated is None:
        raise ValueError(f"method {cfg.method!r} trains on generated images: pass generated="
                         "load_generated(run_dir) after the generate and annotate stages")
    from .csm_data import CSMPairs, generated_transform

    target = "lam" if cfg.method in RAW_LAMBDA_METHODS else "soft_label"
    return CSMPairs(splits.train, generated.gen_dir, generated.table, splits.num_classes,
                    generated_transform(splits), n_aug=cfg.n_aug, target=target)


def train_run(splits, cfg: TrainConfig, out_dir, device: str = "auto", progress: bool = True,
              data_fingerprint: str | None = None, generated: GeneratedData | None = None) -> dict:
    """Train one (method, seed) run into ``out_dir``; resume or return it if it is there already.

    ``generated`` (:func:`load_generated`) is needed by methods that train on generated images
    (CSM); its fingerprint then joins the run's config, so a folder never mixes two annotations.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**cfg.to_dict(), "data": data_fingerprint or getattr(splits, "fingerprint", None)}
    method = build_method(cfg.method, splits.num_classes, **cfg.method_settings)
    if method.uses_generated and generated is not None:
        config["generated"] = generated.fingerprint
    rank, size = world()
    if rank == 0:
        _check_folder(out_dir, config)
    barrier()
    _check_folder(out_dir, config, write=False)
    if (out_dir / "metrics.json").exists():
        return read_json(out_dir / "metrics.json")

    device = resolve_device(device)
    torch.manual_seed(cfg.seed)
    c, h, w = splits.image_shape
    model = build_model(cfg.model, splits.num_classes, in_channels=c, image_size=h).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model if size == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
    loader, sampler, generator = _loader(_train_set(splits, method, cfg, generated), cfg, rank, size, device)

    start_epoch, history, best_acc, best_epoch, wall = 0, [], -1.0, -1, 0.0
    if (out_dir / "last.pt").exists():
        state = load_checkpoint(out_dir / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(load_checkpoint(out_dir / _rng_file(rank, size)) if size > 1 else state["rng"], generator)
        start_epoch, history = state["epoch"], state["history"]
        best_acc, best_epoch, wall = state["best_acc"], state["best_epoch"], state["wall"]

    bar = tqdm(range(start_epoch, cfg.epochs), desc=f"{cfg.method} seed {cfg.seed}", initial=start_epoch,
               total=cfg.epochs, disable=not progress or rank != 0, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row.update(_train_epoch(net, loader, method, optimizer, cfg, device))
        scheduler.step()
        # every rank scores the whole validation split, so all take the same best-epoch decision
        val_logits, val_labels = predict(model, splits.val, device=device, num_workers=cfg.num_workers)
        val = calibration_report(val_logits, val_labels, cfg.n_bins)
        row.update(val_loss=val["nll"], val_acc=val["acc"], val_ece=val["ece"])
        wall += time.perf_counter() - t0
        row["seconds"] = wall
        history.append(row)
        improved = val["acc"] > best_acc
        if improved:
            best_acc, best_epoch = val["acc"], epoch + 1
        _save_epoch(out_dir, model, optimizer, scheduler, generator, rank, size, improved, {
            "epoch": epoch + 1, "history": history, "best_acc": best_acc, "best_epoch": best_epoch, "wall": wall})
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{val['acc']:.3f}", refresh=False)
    if rank == 0:
        _finish(model, splits, cfg, out_dir, device, history, best_epoch, wall)
        for r in range(size if size > 1 else 0):
            (out_dir / _rng_file(r, size)).unlink(missing_ok=True)
    barrier()
    return read_json(out_dir / "metrics.json")


def _rng_file(rank: int, size: int) -> str:
    return f"rng.rank{rank}-of-{size}.pt"


def _loader(train_set, cfg: TrainConfig, rank: int, size: int, device):
    """Shuffled batches from a seeded generator; under DDP a DistributedSampler gives each rank its
    share and ``batch_size`` stays the global batch (``batch_size // world`` per rank)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = None
    if size > 1:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=size, rank=rank, shuffle=True,
                                                      seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=max(cfg.batch_size // size, 1), shuffle=sampler is None,
                        sampler=sampler, drop_last=False, generator=generator, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0)
    return loader, sampler, generator


def _save_epoch(out_dir: Path, model, optimizer, scheduler, generator, rank: int, size: int, improved: bool,
                progress: dict) -> None:
    """Rank 0 writes the best weights and the resume state; every rank its own RNG state."""
    if size > 1:
        save_checkpoint(out_dir / _rng_file(rank, size), _rng_state(generator))
    if rank == 0:
        if improved:
            save_checkpoint(out_dir / "checkpoint.pt", model.state_dict())
        save_checkpoint(out_dir / "last.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(generator), **progress})
    barrier()


def load_trained_model(run_dir, splits, device="cpu"):
    """The best weights of a finished run folder as an eval-mode model, and its temperature
    (``metrics.json``; None while the run is unfinished)."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json")
    c, h, _ = splits.image_shape
    model = build_model(config["model"], splits.num_classes, in_channels=c, image_size=h)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint.pt"))
    metrics = run_dir / "metrics.json"
    temperature = read_json(metrics).get("temperature") if metrics.exists() else None
    return model.to(device).eval(), temperature


def load_run(out_dir) -> dict:
    """A finished run's metrics, config, history rows and logits, from its folder alone."""
    out_dir = Path(out_dir)
    if not (out_dir / "metrics.json").exists():
        raise FileNotFoundError(f"{out_dir} has no metrics.json: the run has not finished")
    with open(out_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    return {"metrics": read_json(out_dir / "metrics.json"), "config": read_json(out_dir / "config.json"),
            "history": history, "logits": load_arrays(out_dir / "logits.npz")}


def main(argv=None) -> int:
    """``python -m semmix_lib.train STUDY.yaml [--run NAME] [--methods ...] [--seeds ...]``: the train
    stage of a study without notebooks, for ``torchrun`` on many GPUs / nodes (DDP; NCCL on GPUs,
    gloo on CPUs). It writes the same run folders as the notebook, which then finds them finished."""
    import argparse

    from . import data
    from .losses import build_method as _build
    from .params import STAGES, load_study, stage_parameters

    p = argparse.ArgumentParser(prog="python -m semmix_lib.train", description=main.__doc__.splitlines()[0])
    p.add_argument("study", help="a study file (params/*.yaml)")
    p.add_argument("--run", help="run folder name (default: the study's)")
    p.add_argument("--outputs", default="outputs")
    p.add_argument("--methods", nargs="+", help="default: the study's train.methods")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the study's train.seeds")
    args = p.parse_args(argv)

    study = load_study(args.study)
    prm = stage_parameters(study, next(s for s in STAGES if s.name == "train"))
    run_dir = Path(args.outputs) / (args.run or study["run"])
    with torchrun_session(prm.get("device", "auto")) as device:
        splits = data.load_dataset(prm.get("dataset", "digits"), prm.get("data_root"),
                                   split_seed=prm.get("split_seed", 0), noise_sigma=prm.get("noise_sigma", 0.5),
                                   download=prm.get("download", False))
        fields = set(TrainConfig.__dataclass_fields__) - {"method", "seed", "method_settings"}
        recipe = {k: v for k, v in prm.items() if k in fields}
        per_method = prm.get("method_settings") or {}
        methods, seeds = args.methods or prm.get("methods", ["ce"]), args.seeds or prm.get("seeds", [0])
        needs = any(_build(m, splits.num_classes).uses_generated for m in methods)
        generated = load_generated(run_dir) if needs else None
        for method in methods:
            for seed in seeds:
                cfg = TrainConfig(method=method, seed=seed, method_settings=per_method.get(method, {}), **recipe)
                m = train_run(splits, cfg, run_dir / "train" / method / f"seed{seed}", device=device,
                              progress=world()[0] == 0, generated=generated)
                if world()[0] == 0:
                    print(f"{method} seed {seed}: acc {m['test']['acc']:.4f} ECE {m['test']['ece']:.4f} "
                          f"-> {m['test_ts']['ece']:.4f} (T = {m['temperature']:.1f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
