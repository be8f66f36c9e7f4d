"""Figures: reliability diagrams, confidence histograms, training curves; saved as PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .metrics import bin_stats, check_labels, ece, softmax

__all__ = ["reliability_diagram", "confidence_histogram", "reliability_grid", "training_curves",
           "save_figure", "mixing_grid", "mixing_check", "reannotation", "annotated_examples",
           "ece_vs_accuracy"]


def _top1(logits, labels):
    probs = softmax(logits)
    labels = check_labels(labels, probs.shape[1], probs.shape[0])
    return probs, probs.max(1), (probs.argmax(1) == labels).astype(float), labels


def reliability_diagram(logits, labels, n_bins: int = 15, ax=None, title: str | None = None):
    """Accuracy per equal-width confidence bin against the diagonal; red shows the gap (ECE)."""
    ax = ax or plt.gca()
    probs, conf, correct, labels = _top1(logits, labels)
    s = bin_stats(conf, correct, n_bins, "width")
    centers = (s["edges"][:-1] + s["edges"][1:]) / 2
    width = 1.0 / n_bins
    filled = s["count"] > 0
    ax.bar(centers[filled], s["acc"][filled], width=width, edgecolor="black", color="#4c72b0",
           label="accuracy")
    # the gap from accuracy to mean confidence: above the bar = overconfident, inside it = under
    ax.bar(centers[filled], s["conf"][filled] - s["acc"][filled], bottom=s["acc"][filled], width=width,
           edgecolor="#c44e52", fill=False, hatch="///", lw=0.8, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.text(0.04, 0.92, f"ECE {100 * ece(probs, labels, n_bins):.2f}%", transform=ax.transAxes,
            bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return ax


def confidence_histogram(logits, labels, n_bins: int = 15, ax=None, title: str | None = None):
    """Share of samples per confidence bin, with mean confidence and accuracy marked."""
    ax = ax or plt.gca()
    _, conf, correct, _ = _top1(logits, labels)
    ax.hist(conf, bins=np.linspace(0, 1, n_bins + 1), weights=np.full(len(conf), 1 / len(conf)),
            color="#4c72b0", edgecolor="black")
    ax.axvline(correct.mean(), color="#55a868", ls="--", lw=2, label=f"accuracy {correct.mean():.2f}")
    ax.axvline(conf.mean(), color="#c44e52", ls=":", lw=2, label=f"mean conf. {conf.mean():.2f}")
    ax.set(xlim=(0, 1), xlabel="confidence", ylabel="share of samples")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    return ax


def reliability_grid(panels: dict[str, tuple], n_bins: int = 15, histograms: bool = True):
    """One column per entry ``name -> (logits, labels)``: reliability diagram over a histogram."""
    n = len(panels)
    rows = 2 if histograms else 1
    fig, axes = plt.subplots(rows, n, figsize=(3.4 * n, 5.4 if histograms else 3.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.5]} if histograms else None)
    for j, (name, (logits, labels)) in enumerate(panels.items()):
        reliability_diagram(logits, labels, n_bins, ax=axes[0, j], title=name)
        if histograms:
            confidence_histogram(logits, labels, n_bins, ax=axes[1, j])
    fig.tight_layout()
    return fig


def training_curves(histories: dict[str, list[dict]], keys=("train_loss", "val_acc", "val_ece")):
    """Per-epoch curves, one line per run, one panel per key (rows as read from ``history.csv``)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in histories.items():
            ax.plot([int(r["epoch"]) for r in rows], [float(r[key]) for r in rows], label=name, lw=1.2)
        ax.set(xlabel="epoch", title=key.replace("_", " "))
    axes[0, -1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_figure(fig, path_without_suffix) -> list[Path]:
    """Save as PNG (150 dpi) and PDF; returns both paths."""
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".png"), base.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def mixing_grid(images, lams, row_labels, title: str | None = None):
    """Rows of generated images (e.g. one group per class pair), one column per ``lam``.

    ``images``: array (rows, n_mix, H, W[, C]) of uint8 or floats in [0, 1].
    """
    images = np.asarray(images)
    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols + 1.2, 0.9 * rows + 0.6), squeeze=False)
    cmap = "gray" if images.ndim == 4 else None
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(images[i, j], cmap=cmap, vmin=0, vmax=255 if images.dtype == np.uint8 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{lams[j]:.2f}", fontsize=8)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=8, rotation=0, ha="right", va="center")
    fig.supxlabel("lam (weight on the first class)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def mixing_check(table, spearman):
    """Left: mean ``p(c1) / (p(c1) + p(c2))`` against ``lam`` (band: interquartile range);
    right: the per-group Spearman correlations between the two."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    stats = table.groupby("lam")["r"].describe()
    axes[0].plot(stats.index, stats["50%"], "o-", color="#4c72b0", label="median")
    axes[0].fill_between(stats.index, stats["25%"], stats["75%"], color="#4c72b0", alpha=0.25, label="IQR")
    axes[0].plot([0, 1], [0, 1], "--", color="gray", lw=1)
    axes[0].set(xlabel="lam (generation)", ylabel="p(c1) / (p(c1) + p(c2))", xlim=(0, 1), ylim=(0, 1))
    axes[0].legend(fontsize="small")
    rho = spearman["spearman"].dropna()
    axes[1].hist(rho, bins=np.linspace(-1, 1, 21), color="#55a868", edgecolor="black")
    axes[1].axvline(rho.median(), color="#c44e52", ls="--", label=f"median {rho.median():.2f}")
    axes[1].set(xlabel="Spearman(lam, relative probability) per group", ylabel="groups")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def reannotation(table, s: float):
    """Left: CLIP's ``lam_clip`` against the generation ``lam`` (violins, with the diagonal);
    right: the soft label ``sigmoid(s (lam_clip - 0.5))`` the classifier is trained on."""
    import seaborn as sns

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    lams = sorted(table["lam"].unique())
    data = table.assign(lam_label=table["lam"].map(lambda v: f"{v:.2f}"))
    sns.violinplot(data=data, x="lam_label", y="lam_clip", order=[f"{v:.2f}" for v in lams], ax=axes[0],
                   color="#8da0cb", inner="quartile", cut=0, density_norm="width")
    axes[0].plot(range(len(lams)), lams, "o--", color="#c44e52", lw=1, label="lam_clip = lam")
    axes[0].axhspan(0, 1, color="gray", alpha=0.08)
    outside = float(((table["lam_clip"] < 0) | (table["lam_clip"] > 1)).mean())
    axes[0].set(xlabel="lam (generation)", ylabel="lam_clip (CLIP projection)",
                title=f"{100 * outside:.1f}% of images outside [0, 1]")
    axes[0].legend(fontsize="small", loc="upper left")
    grid = np.linspace(min(-0.5, table["lam_clip"].min()), max(1.5, table["lam_clip"].max()), 200)
    axes[1].plot(grid, 1 / (1 + np.exp(-s * (grid - 0.5))), color="#4c72b0", label=f"s = {s:g}")
    axes[1].hist(table["lam_clip"], bins=40, density=True, alpha=0.3, color="gray", label="lam_clip")
    axes[1].set(xlabel="lam_clip", ylabel="soft label for c1", ylim=(0, 1.05))
    axes[1].legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    return fig


def annotated_examples(gen_dir, table, rows: int = 4):
    """A few groups with both numbers under each image: generation ``lam`` and CLIP's ``lam_clip``."""
    from PIL import Image

    groups = table["group"].drop_duplicates().iloc[:rows].tolist()
    n_mix = int(table["lam_index"].max()) + 1
    fig, axes = plt.subplots(len(groups), n_mix, figsize=(1.1 * n_mix, 1.35 * len(groups)), squeeze=False)
    for i, group in enumerate(groups):
        g = table[table.group == group].sort_values("lam_index")
        for j, row in enumerate(g.itertuples()):
            img = np.asarray(Image.open(Path(gen_dir) / row.path))
            axes[i, j].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].set_xlabel(f"{row.lam:.2f} | {row.lam_clip:.2f}", fontsize=7)
        axes[i, 0].set_ylabel(f"{g.c2.iloc[0]}->{g.c1.iloc[0]}", fontsize=8)
    fig.suptitle("lam (generation) | lam_clip (reannotation)", fontsize=9)
    fig.tight_layout()
    return fig


def ece_vs_accuracy(runs, ts: bool = False):
    """One point per trained model (method, seed), method means as large markers: calibration
    against accuracy, in percent. ``ts``: ECE after temperature scaling."""
    import seaborn as sns

    col = "ece_ts" if ts else "ece"
    data = runs.assign(acc_pct=100 * runs["acc"], ece_pct=100 * runs[col])
    fig, ax = plt.subplots(figsize=(5.2, 4))
    sns.scatterplot(data=data, x="acc_pct", y="ece_pct", hue="method", alpha=0.45, s=30, ax=ax, legend=False)
    means = data.groupby("method", sort=False)[["acc_pct", "ece_pct"]].mean().reset_index()
    sns.scatterplot(data=means, x="acc_pct", y="ece_pct", hue="method", s=140, marker="D", edgecolor="black", ax=ax)
    ax.set(xlabel="test accuracy (%)", ylabel=f"test ECE (%){' after TS' if ts else ''}")
    ax.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig
