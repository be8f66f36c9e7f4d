"""CSM's training data (PAPER.md section 3): every real image comes with generated ones of its class.

For a real image of class ``y``: pick a random group whose pair contains ``y``; order the group by the
soft label of ``c1`` (``lam'``, descending), so index 0 is the most ``c1``-like image and index
``n_mix - 1`` the most ``c2``-like; take ``y``'s endpoint (0 if ``y == c1``, else ``n_mix - 1``) plus
``n_aug`` random middle images (indices 1 .. n_mix - 2). Their targets are ``t[c1] = lam'``,
``t[c2] = 1 - lam'``. Generated images get the same augmentation as the real ones.

The hand-over from the annotation stage is its table (:func:`semmix_lib.annotation.read_annotations`):
one row per generated image with ``path, group, c1, c2, lam, soft_label``. ``target="lam"`` uses the
generation ``lam`` instead of the reannotated ``soft_label`` (the ``csm_raw`` ablation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = ["CSMPairs", "generated_transform"]


def generated_transform(splits):
    """The real training images' transform (augmentation + normalisation) for PIL images; datasets
    held as ready tensors (the digits) get just ``ToTensor`` + their normalisation."""
    tf = getattr(splits.train, "transform", None)
    return tf if tf is not None else T.Compose([T.ToTensor(), T.Normalize(splits.mean, splits.std)])


class CSMPairs(Dataset):
    """Yields ``(x, y, gen_x, gen_t)``: a real image, its label, ``1 + n_aug`` generated images
    ``(m, C, H, W)`` and their soft targets ``(m, K)``."""

    def __init__(self, real: Dataset, gen_dir, table: pd.DataFrame, num_classes: int, transform,
                 n_aug: int = 1, target: str = "soft_label"):
        if target not in ("soft_label", "lam"):
            raise ValueError(f"target must be 'soft_label' or 'lam', got {target!r}")
        self.real, self.gen_dir, self.transform = real, Path(gen_dir), transform
        self.num_classes, self.n_aug = num_classes, n_aug
        self.targets = list(real.targets)
        groups = []  # per group: (c1, c2, paths ordered by target desc, targets in that order)
        for _, g in table.groupby("group", sort=True):
            g = g.sort_values([target, "lam_index"], ascending=[False, False], kind="stable")
            groups.append((int(g.c1.iloc[0]), int(g.c2.iloc[0]), g["path"].tolist(),
                           g[target].to_numpy(np.float32)))
        self.groups = groups
        n_mix = {len(p) for _, _, p, _ in groups}
        if len(n_mix) != 1 or min(n_mix) < 3:
            raise ValueError(f"every group needs the same n_mix >= 3 images, found sizes {sorted(n_mix)}")
        self.n_mix = n_mix.pop()
        if n_aug > self.n_mix - 2:
            raise ValueError(f"n_aug = {n_aug} exceeds the {self.n_mix - 2} middle images of a group")
        self.by_class = [[i for i, (c1, c2, _, _) in enumerate(groups) if k in (c1, c2)] for k in range(num_classes)]
        missing = [k for k in set(self.targets) if not self.by_class[k]]
        if missing:
            raise ValueError(f"no generated group contains class(es) {sorted(missing)}: generate more seeds "
                             "so that every class pair is covered")
        self._cache: dict[str, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.real)

    def _image(self, rel: str):
        if rel not in self._cache:  # small PNGs: decode each once per worker
            with Image.open(self.gen_dir / rel) as im:
                self._cache[rel] = im.copy()
        return self._cache[rel]

    def __getitem__(self, i):
        x, y = self.real[i]
        choices = self.by_class[y]
        c1, c2, paths, lam1 = self.groups[choices[int(torch.randint(len(choices), ()))]]
        end = 0 if y == c1 else self.n_mix - 1
        middle = 1 + torch.randperm(self.n_mix - 2)[: self.n_aug]
        idx = [end, *middle.tolist()]
        gen_x = torch.stack([self.transform(self._image(paths[j])) for j in idx])
        gen_t = torch.zeros(len(idx), self.num_classes)
        gen_t[:, c1] = torch.from_numpy(lam1[idx])
        gen_t[:, c2] = 1 - gen_t[:, c1]
        return x, y, gen_x, gen_t
