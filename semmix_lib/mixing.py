"""Semantic mixing (PAPER.md section 1): the group plan and class-mixed generation to disk.

A *group* is ``n_mix`` images (8 in the paper) generated from **one** initial noise with the class vectors
``c_j = lam_j * onehot(c1) + (1 - lam_j) * onehot(c2)``, ``lam = linspace(0, 1, n_mix)`` (both pure
endpoints included; ``lam`` is the weight on ``c1``, the smaller class index). The g-th seed of the seed
list makes group g, for pair number ``g mod K(K-1)/2`` of the unordered pairs ``c1 < c2`` in lexicographic
order, so the pairs wrap around until the seeds are used up (CIFAR-10, seeds 0-19979: 45 pairs x 444
groups, 159,840 images).

Layout of a generation folder ``out_dir``::

    generation.json                         sampler settings, seeds, n_mix, classes (checked on re-runs)
    manifest.csv                            the plan: one row per image (see :func:`group_plan`)
    images/{c1:03d}-{c2:03d}/{seed}_{c1}_{c2}_{lam:.4f}.png

The file name is the official one, ``{seed}_{c1}_{c2}_{lam}.png``, except that ``lam`` is written with 4
decimals (the official code writes the float32 value's repr, e.g. ``0.1428571492433548``), inside one folder
per pair so that no folder holds 160k files. Pixels are ``uint8(clip(x * 127.5 + 128, 0, 255))`` with the
conversion to uint8 *truncating*, as the official ``.to(torch.uint8)`` after the clip does (:func:`to_uint8`).

Differences from the official generator, on purpose:

* Sharding (the official multi-GPU run had every rank write the same files): rank ``r`` of ``w`` makes
  exactly the groups with ``group % w == r`` and writes only their files. The initial noise of a group is
  drawn from its own CPU ``torch.Generator().manual_seed(seed)`` with shape (C, H, W) and then moved to the
  device, so it depends neither on batching nor on the device (the official code used one CUDA generator per
  image, hence its noise is not reproduced on CPU).
* Batch invariance: matrix kernels may give a row a result that depends on the number of rows around it
  (on our CPU a float32 ``linear`` differs by ~1e-6 between 3 and 8 rows, while batches whose row count is a
  multiple of 8 give bitwise identical rows). Every group therefore occupies a block of rows padded to a
  multiple of :data:`ROW_ALIGN` (8; the padding rows repeat the last image and are discarded; nothing is
  added for ``n_mix = 8``), and batches are made of whole groups. On CPU this makes every image bitwise
  independent of batch size and world size (tested). On GPUs, cuBLAS/cuDNN may pick other kernels for other
  shapes; use the same batch size for runs that must agree bit for bit.
* Stochastic sampling (``S_churn > 0``, not the paper's setting): the fresh noise of each step comes from
  the group's generator too, identical for the images of a group (as with the official ``d8`` seed list).
* Resumable and checked: a group is skipped when all its PNGs exist; PNGs are written atomically; a re-run
  with other settings in the same folder is refused (:class:`GenerationMismatchError`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from .progress import tqdm

from .distributed import barrier, is_on, rank_and_world, torchrun_session
from .io import atomic_path, read_json, settings_diff, sha256_file, write_json

__all__ = [
    "ROW_ALIGN", "PATH_TEMPLATE", "PLAN_COLUMNS", "GenerationMismatchError", "class_pairs", "parse_seeds",
    "format_seeds", "group_plan", "shard", "class_vectors", "to_uint8", "generate_mixed", "read_manifest",
    "check_images", "MixedImages", "main",
]

#: Rows of a network call are padded per group to a multiple of this (see the module docstring).
ROW_ALIGN = 8
#: Relative path of an image inside a generation folder (``w`` = width of the class numbers, at least 3).
PATH_TEMPLATE = "images/{c1:0{w}d}-{c2:0{w}d}/{seed}_{c1}_{c2}_{lam:.4f}.png"
PLAN_COLUMNS = ["image_id", "group", "seed", "c1", "c2", "lam_index", "lam", "path"]
_FORMAT = "semmix.mixing/1"
_MAX_SEED = 2 ** 63 - 1


class GenerationMismatchError(ValueError):
    """A generation folder already holds images made with other settings."""


# --------------------------------------------------------------------------------------------------
# The plan.

def class_pairs(num_classes: int) -> list[tuple[int, int]]:
    """Every unordered pair ``(c1, c2)``, ``c1 < c2``, in lexicographic order: (0, 1), (0, 2), ..., (K-2, K-1)."""
    num_classes = _check_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return [(a, b) for a in range(num_classes) for b in range(a + 1, num_classes)]


def parse_seeds(spec) -> list[int]:
    """Seeds from ``"0-19979"``, ``"0-9,20,30-31"`` (ranges inclusive), an int, or a sequence of ints.

    Seeds must be non-negative and unique; order is kept.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("empty seed specification")
        seeds: list[int] = []
        for part in text.split(","):
            part = part.strip()
            if re.fullmatch(r"d\d+", part):
                raise ValueError(f"seed spec part {part!r}: the official 'dN,' duplication prefix is not used "
                                 "here; each seed makes one group of n_mix images")
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ValueError(f"seed range {part!r} is empty (start > end)")
                seeds.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                seeds.append(int(part))
            else:
                raise ValueError(f"cannot parse seed spec part {part!r} in {spec!r}; "
                                 "use non-negative integers and inclusive ranges like '0-9,20,30-31'")
    elif isinstance(spec, (bool, np.bool_)):
        raise TypeError("seeds must be integers, not booleans")
    elif isinstance(spec, (int, np.integer)):
        seeds = [int(spec)]
    elif isinstance(spec, (Sequence, range, np.ndarray, pd.Series, pd.Index)):
        seeds = [_check_int(s, "seed") for s in (spec.tolist() if hasattr(spec, "tolist") else spec)]
    else:
        raise TypeError(f"cannot read seeds from {type(spec).__name__}")
    if not seeds:
        raise ValueError("no seeds given")
    bad = [s for s in seeds if not 0 <= s <= _MAX_SEED]
    if bad:
        raise ValueError(f"seeds must be in [0, 2**63 - 1], got {bad[:5]}")
    if len(set(seeds)) != len(seeds):
        dup = pd.Series(seeds)
        raise ValueError(f"duplicate seeds: {sorted(set(dup[dup.duplicated()].tolist()))[:10]}")
    return seeds


def format_seeds(seeds) -> str:
    """The compact form of a seed list (inverse of :func:`parse_seeds`): ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    seeds = parse_seeds(seeds)
    parts, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            lo, hi = seeds[start], seeds[i - 1]
            parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
            start = i
    return ",".join(parts)


def group_plan(seeds, num_classes: int, n_mix: int = 8) -> pd.DataFrame:
    """One row per image, ordered by group then ``lam_index``.

    Columns: ``image_id`` (``f"{seed}_{c1}_{c2}_{j}"``, unique), ``group`` (position of the seed in the seed
    list), ``seed``, ``c1 < c2`` (pair number ``group mod K(K-1)/2`` of :func:`class_pairs`), ``lam_index``
    ``j``, ``lam = linspace(0, 1, n_mix)[j]`` (the weight on ``c1``) and ``path``, the PNG's path relative to
    the generation folder: ``images/{c1:03d}-{c2:03d}/{seed}_{c1}_{c2}_{lam:.4f}.png`` (the official file
    name inside a folder per pair; class numbers padded to at least 3 digits). ``seeds`` is anything
    :func:`parse_seeds` reads.
    """
    seeds = np.asarray(parse_seeds(seeds), dtype=np.int64)
    class_pairs(num_classes)  # validates
    pairs = np.stack(np.triu_indices(num_classes, k=1), axis=1).astype(np.int64)  # same order, fast for big K
    n_mix = _check_int(n_mix, "n_mix")
    if not 2 <= n_mix <= 10001:  # 4 decimals keep the lam values of a group apart up to 10001
        raise ValueError(f"n_mix must be between 2 and 10001, got {n_mix}")
    n_groups = len(seeds)
    group = np.repeat(np.arange(n_groups, dtype=np.int64), n_mix)
    pair = pairs[group % len(pairs)]
    lam_index = np.tile(np.arange(n_mix, dtype=np.int64), n_groups)
    lam = np.linspace(0.0, 1.0, n_mix)[lam_index]
    seed = seeds[group]
    width = max(3, len(str(num_classes - 1)))
    c1, c2 = pair[:, 0], pair[:, 1]
    cols = list(zip(seed.tolist(), c1.tolist(), c2.tolist(), lam_index.tolist(), lam.tolist()))
    return pd.DataFrame({
        "image_id": [f"{s}_{a}_{b}_{j}" for s, a, b, j, _ in cols],
        "group": group, "seed": seed, "c1": c1, "c2": c2, "lam_index": lam_index, "lam": lam,
        "path": [PATH_TEMPLATE.format(c1=a, c2=b, seed=s, lam=x, w=width) for s, a, b, _, x in cols],
    })


def shard(plan: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """The rows of the groups of one rank: ``group % world_size == rank`` (the plan's index is kept)."""
    rank, world_size = _check_rank(rank, world_size)
    return plan[plan["group"].to_numpy() % world_size == rank]


def class_vectors(rows: pd.DataFrame, num_classes: int) -> torch.Tensor:
    """(N, K) float32 class vectors ``lam * onehot(c1) + (1 - lam) * onehot(c2)`` (computed in float32)."""
    lam = torch.tensor(rows["lam"].to_numpy(dtype=np.float64), dtype=torch.float32)
    idx = torch.arange(len(rows))
    c = torch.zeros(len(rows), num_classes, dtype=torch.float32)
    c[idx, torch.tensor(rows["c1"].to_numpy(dtype=np.int64))] = lam
    c[idx, torch.tensor(rows["c2"].to_numpy(dtype=np.int64))] = 1 - lam
    return c


def to_uint8(x) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> uint8 (N, H, W, C): ``uint8(clip(x * 127.5 + 128, 0, 255))``.

    As in the official generator the conversion truncates (``.to(torch.uint8)`` after the clip), so -1 -> 0
    (0.5 truncated), 0 -> 128, 1 -> 255 (255.5 clipped). Non-finite values are an error.
    """
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values (a broken network or checkpoint?)")
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Generation.

def generate_mixed(net, plan: pd.DataFrame, out_dir, num_steps: int = 20, sigma_min: float = 0.002,
                   sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                   S_max: float = float("inf"), S_noise: float = 1.0, batch_size: int = 64, device=None,
                   rank: int | None = None, world_size: int | None = None, progress: bool = True,
                   extra: dict | None = None) -> pd.DataFrame:
    """Generate this rank's groups of ``plan`` (a full :func:`group_plan`) into ``out_dir``; return its rows.

    ``net`` is an EDM network in eval mode (``net(x, sigma, class_labels)``, attributes ``img_channels``,
    ``img_resolution``, ``label_dim``), on ``device`` (default: the device of its parameters). Sampling is EDM
    Heun (:func:`semmix_lib.edm.heun_sampler`); the defaults are the paper's CIFAR-10 settings (20 steps).
    ``batch_size`` counts images and is rounded down to whole groups (at least one). ``rank`` and
    ``world_size`` default to torch.distributed's when it is initialised, else 0 and 1.

    Before generating, ``generation.json`` (settings, seeds, ``extra``, e.g. the checkpoint's hash) and
    ``manifest.csv`` (the plan) are written, or, when present, the settings are checked: other settings raise
    :class:`GenerationMismatchError` and nothing is written. Groups whose PNGs all exist are skipped.
    """
    from . import edm  # looked up at call time (tests wrap the sampler)

    K = _check_int(getattr(net, "label_dim", 0), "net.label_dim")
    C, R = int(net.img_channels), int(net.img_resolution)
    if C not in (1, 3):
        raise ValueError(f"can save 1- or 3-channel images only, the network makes {C} channels")
    if getattr(net, "training", False):
        raise ValueError("the network is in training mode (dropout would randomise the images); call net.eval()")
    plan = _check_plan(plan, K)
    n_mix = int((plan["group"] == 0).sum())
    rank, world_size = rank_and_world(rank, world_size)
    if device is None:
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
    device = torch.device(device)
    batch_size = _check_int(batch_size, "batch_size")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sampler: dict = dict(num_steps=int(num_steps), sigma_min=float(sigma_min), sigma_max=float(sigma_max),
                         rho=float(rho), S_churn=float(S_churn), S_min=float(S_min), S_max=float(S_max),
                         S_noise=float(S_noise))
    seeds = plan.loc[plan["lam_index"] == 0, "seed"].tolist()
    settings = {
        "format": _FORMAT, "layout": PATH_TEMPLATE, "num_classes": K, "n_mix": n_mix,
        "seeds": format_seeds(seeds), "num_groups": len(seeds), "num_images": len(plan),
        "img_channels": C, "img_resolution": R,
        "sampler": {"name": "edm-heun", **{k: v if math.isfinite(v) else str(v) for k, v in sampler.items()}},
        "latents": "per group: randn((C, H, W), generator=torch.Generator().manual_seed(seed)), shared by its images",
        "pixels": "uint8(clip(x * 127.5 + 128, 0, 255)), truncated",
        "extra": extra,
    }
    out_dir = Path(out_dir)
    _prepare_folder(out_dir, settings, plan, rank)

    mine = shard(plan, rank, world_size)
    done = mine["path"].isin(list(_scan_pngs(out_dir))).groupby(mine["group"]).all()
    todo = done.index[~done.to_numpy()].tolist()
    todo_set = set(todo)
    rows_by_group = {g: rows for g, rows in mine.groupby("group", sort=True) if g in todo_set}
    pad = -n_mix % ROW_ALIGN
    per_batch = max(1, batch_size // n_mix)
    bar = tqdm(total=len(todo), unit="group", disable=not progress,
               desc=f"mixing (rank {rank}/{world_size})" if world_size > 1 else "mixing")
    with torch.no_grad():
        for start in range(0, len(todo), per_batch):
            groups = [rows_by_group[g] for g in todo[start:start + per_batch]]
            gens = [torch.Generator().manual_seed(int(rows["seed"].iloc[0])) for rows in groups]
            latents = torch.cat([torch.randn((C, R, R), generator=gen).expand(n_mix + pad, C, R, R)
                                 for gen in gens]).to(device)
            labels = torch.cat([_pad_rows(class_vectors(rows, K), pad) for rows in groups]).to(device)

            def randn_like(x, gens=gens):  # churn noise: from each group's generator, shared by its images
                shape = tuple(x.shape[1:])
                noise = [torch.randn(shape, generator=gen, dtype=x.dtype).expand(n_mix + pad, *shape) for gen in gens]
                return torch.cat(noise).to(x.device)

            x = edm.heun_sampler(net, latents, labels, randn_like=randn_like, **sampler)
            pixels = to_uint8(x).reshape(len(groups), n_mix + pad, R, R, C)[:, :n_mix]
            for rows, imgs in zip(groups, pixels):
                for rel, img in zip(rows["path"], imgs):
                    _save_png(img, out_dir / rel)
            bar.update(len(groups))
    bar.close()
    return mine


def read_manifest(out_dir) -> pd.DataFrame:
    """The ``manifest.csv`` of a generation folder, with the dtypes of :func:`group_plan` (lam exact)."""
    path = Path(out_dir) / "manifest.csv"
    if not path.exists():
        raise FileNotFoundError(f"no manifest.csv in {out_dir}: not a generation folder (see generate_mixed)")
    return pd.read_csv(path, dtype={"image_id": str, "path": str})  # pandas 3 parses floats exactly


def check_images(out_dir) -> None:
    """Compare ``manifest.csv`` with the PNGs under ``out_dir/images``; raise ``ValueError`` naming missing
    images and PNGs that are not in the manifest (the first few of each, and their counts)."""
    manifest = read_manifest(out_dir)
    expected, present = set(manifest["path"]), _scan_pngs(out_dir)
    missing = [p for p in manifest["path"] if p not in present]
    extra = sorted(present - expected)
    if missing or extra:
        msg = [f"generation folder {out_dir} does not match its manifest ({len(manifest)} images):"]
        if missing:
            msg.append(f"{len(missing)} missing, e.g. {', '.join(missing[:5])}")
        if extra:
            msg.append(f"{len(extra)} PNG(s) not in the manifest, e.g. {', '.join(extra[:5])}")
        raise ValueError(" ".join(msg))


class MixedImages(Dataset):
    """The images of a generation folder: item ``i`` is ``(image, i)``, ``i`` the row of :attr:`manifest`.

    Without ``transform`` the image is a float32 (C, H, W) tensor ``pixels / 127.5 - 1`` in [-1, 1];
    with one (e.g. a torchvision transform) it is ``transform(PIL image)``.
    """

    def __init__(self, root, transform=None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self.manifest):
            raise IndexError(f"index {index} out of range for {len(self.manifest)} images")
        with Image.open(self.root / self.manifest["path"].iat[index]) as img:
            img.load()
            if self.transform is not None:
                return self.transform(img), index
            arr = np.asarray(img, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr) / 127.5 - 1), index


# --------------------------------------------------------------------------------------------------
# Helpers.

def _check_int(x, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {x!r}")
    return int(x)


def _check_rank(rank, world_size) -> tuple[int, int]:
    rank, world_size = _check_int(rank, "rank"), _check_int(world_size, "world_size")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def _check_plan(plan: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """The plan must be a whole :func:`group_plan` for the network's class count (sharding happens here)."""
    missing = [c for c in PLAN_COLUMNS if c not in plan.columns]
    if missing:
        raise ValueError(f"plan lacks columns {missing}; make it with group_plan")
    plan = plan[PLAN_COLUMNS].reset_index(drop=True)
    if not len(plan) or (plan["group"] == 0).sum() < 2:
        raise ValueError("plan is empty or does not start at group 0; pass the whole group_plan")
    n_mix = int((plan["group"] == 0).sum())
    seeds = plan.loc[plan["lam_index"] == 0, "seed"].tolist()
    try:
        expected = group_plan(seeds, num_classes, n_mix)
    except ValueError as err:
        raise ValueError(f"plan is not a group_plan: {err}") from err
    if not plan.equals(expected):
        raise ValueError(f"plan is not group_plan(seeds, {num_classes}, n_mix={n_mix}) for its seeds: pass the "
                         f"whole plan (generate_mixed shards it) made for the network's {num_classes} classes")
    return plan


def _pad_rows(t: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) if pad else t


def _scan_pngs(out_dir) -> set[str]:
    """Relative posix paths of the (non-hidden) PNGs under ``out_dir/images``."""
    root = Path(out_dir)
    found = set()
    for folder, _, files in os.walk(root / "images"):
        rel = Path(folder).relative_to(root).as_posix()
        found.update(f"{rel}/{f}" for f in files if f.endswith(".png") and not f.startswith("."))
    return found


def _save_png(img: np.ndarray, path: Path) -> None:
    """Write (H, W, C) uint8 as PNG ("L" for 1 channel, "RGB" for 3) via a temp file + ``os.replace``."""
    pil = Image.fromarray(np.ascontiguousarray(img[..., 0] if img.shape[-1] == 1 else img))
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, sort_keys=True))


def _prepare_folder(out_dir: Path, settings: dict, plan: pd.DataFrame, rank: int) -> None:
    """Write or check ``generation.json``, then write ``manifest.csv`` if absent. Under torch.distributed
    rank 0 goes first and the others check after a barrier."""
    sync = is_on()
    if not sync or rank == 0:
        _write_or_check(out_dir, settings, plan)
    if sync:
        torch.distributed.barrier()
        if rank != 0:
            _write_or_check(out_dir, settings, plan)


def _write_or_check(out_dir: Path, settings: dict, plan: pd.DataFrame) -> None:
    gen_path, man_path = out_dir / "generation.json", out_dir / "manifest.csv"
    settings = _jsonable(settings)
    if gen_path.exists():
        old = read_json(gen_path)
        if old != settings:
            diffs = settings_diff(old, settings)
            raise GenerationMismatchError(
                f"{out_dir} holds a generation made with other settings ({'; '.join(diffs)}). "
                "Use another folder, or delete this one to start afresh; images are never mixed.")
    else:
        if man_path.exists() or _scan_pngs(out_dir):
            raise GenerationMismatchError(
                f"{out_dir} has a manifest or images but no generation.json; it is not a folder written by "
                "generate_mixed. Use an empty folder.")
        write_json(gen_path, settings)
    if not man_path.exists():
        with atomic_path(man_path) as tmp:
            plan.to_csv(tmp, index=False)


# --------------------------------------------------------------------------------------------------
# Command line (single process or torchrun).

def main(argv=None) -> int:
    """``python -m semmix_lib.mixing --checkpoint PATH --out DIR --seeds 0-19979 [...]``; under torchrun
    each rank generates its own groups and rank 0 checks the folder at the end."""
    p = argparse.ArgumentParser(prog="python -m semmix_lib.mixing", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="EDM checkpoint: an official .pkl or one of ours (.pt)")
    p.add_argument("--out", required=True, help="generation folder")
    p.add_argument("--seeds", required=True, help="e.g. 0-19979 (CIFAR-10) or 0-19799 (CIFAR-100)")
    p.add_argument("--n-mix", type=int, default=8)
    p.add_argument("--num-steps", type=int, default=20, help="20 for CIFAR-10, 25 for CIFAR-100/Tiny")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--batch-size", type=int, default=512, help="images per batch (whole groups)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from . import edm

    with torchrun_session(args.device) as device:
        net = edm.load_edm_checkpoint(args.checkpoint, device=device).eval()
        plan = group_plan(parse_seeds(args.seeds), int(net.label_dim), args.n_mix)
        generate_mixed(net, plan, args.out, num_steps=args.num_steps, sigma_min=args.sigma_min,
                       sigma_max=args.sigma_max, rho=args.rho, batch_size=args.batch_size, device=device,
                       progress=not args.no_progress, extra={"checkpoint_sha256": sha256_file(args.checkpoint)})
        barrier()
        if rank_and_world()[0] == 0:
            check_images(args.out)
            print(f"{len(plan)} images of {plan['group'].nunique()} groups in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
