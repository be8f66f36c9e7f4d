"""Does semantic mixing work? A classifier trained on real images judges the generated groups.

For an image generated with class vector ``lam * e_c1 + (1 - lam) * e_c2``, a classifier trained on
the real data should find more of ``c1`` in it as ``lam`` grows. We measure the relative probability
``r = p(c1) / (p(c1) + p(c2))`` per image and, per group of ``n_mix`` images sharing one noise, the
Spearman rank correlation between ``lam`` and ``r`` (1 = a perfectly monotone morph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy.stats import spearmanr

from .metrics import softmax

__all__ = ["renormalize", "relative_probability", "group_spearman", "judge", "example_groups", "summary"]


def renormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Images in [-1, 1] (the generator's range) to a classifier's ``Normalize(mean, std)`` input."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x + 1) / 2 - m) / s


def relative_probability(logits, c1, c2) -> np.ndarray:
    """``p(c1) / (p(c1) + p(c2))`` per row of logits."""
    p = softmax(logits)
    rows = np.arange(len(p))
    p1, p2 = p[rows, np.asarray(c1)], p[rows, np.asarray(c2)]
    return p1 / np.maximum(p1 + p2, 1e-300)


def group_spearman(table: pd.DataFrame, value: str = "r") -> pd.DataFrame:
    """Spearman correlation of ``lam`` with ``value`` within each group; NaN where ``value`` is constant."""
    def rho(g: pd.DataFrame) -> float:
        if g[value].nunique() < 2:
            return float("nan")
        return float(spearmanr(g["lam"], g[value]).statistic)

    rows = [{"group": group, "seed": int(g["seed"].iloc[0]), "c1": int(g["c1"].iloc[0]),
             "c2": int(g["c2"].iloc[0]), "spearman": rho(g)}
            for group, g in table.groupby("group", sort=True)]
    return pd.DataFrame(rows)


@torch.no_grad()
def judge(gen_dir, classifier_dir, splits, device="cpu", batch_size: int = 512) -> pd.DataFrame:
    """The generation manifest with the classifier's ``r = p(c1) / (p(c1) + p(c2))`` per image.

    ``classifier_dir`` is a finished :func:`semmix_lib.train.train_run` folder trained on ``splits``.
    """
    from .mixing import MixedImages
    from .train import load_trained_model

    model, _ = load_trained_model(classifier_dir, splits, device)
    images = MixedImages(gen_dir)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False)
    logits = torch.cat([model(renormalize(x, splits.mean, splits.std).to(device)).float().cpu()
                        for x, _ in loader]).numpy()
    table = images.manifest.copy()
    table["r"] = relative_probability(logits, table["c1"], table["c2"])
    return table


def summary(spearman: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """One-row table: groups, median Spearman, share of groups >= 0.8, median r at both ends."""
    rho = spearman["spearman"]
    lo, hi = table["lam"].min(), table["lam"].max()
    return pd.DataFrame([{
        "groups": len(spearman), "median spearman": float(rho.median()),
        "share >= 0.8": float((rho >= 0.8).mean()),
        "median r at lam=0": float(table.loc[table.lam == lo, "r"].median()),
        "median r at lam=1": float(table.loc[table.lam == hi, "r"].median()),
    }]).round(3)


def example_groups(gen_dir, manifest: pd.DataFrame, max_rows: int = 10):
    """The first group of up to ``max_rows`` class pairs: (uint8 images (rows, n_mix, ...), lams, labels)."""
    firsts = manifest.groupby(["c1", "c2"], sort=True)["group"].min().head(max_rows)
    rows, labels = [], []
    for (c1, c2), group in firsts.items():
        g = manifest[manifest.group == group].sort_values("lam")
        rows.append([np.asarray(Image.open(Path(gen_dir) / p)) for p in g["path"]])
        labels.append(f"{c2} -> {c1}")
    lams = manifest[manifest.group == firsts.iloc[0]].sort_values("lam")["lam"].tolist()
    return np.stack([np.stack(r) for r in rows]), lams, labels
