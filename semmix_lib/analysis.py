"""Results from saved files only: collect a run's trained models and tabulate their metrics."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .calibration import apply_temperature
from .io import load_arrays, read_json

__all__ = ["collect_runs", "results_table", "format_table", "TABLE_METRICS", "write_table",
           "test_logits", "method_order"]

#: (column, metrics.json section, key): the paper's numbers, before and after temperature scaling.
TABLE_METRICS = (
    ("acc", "test", "acc"), ("ece", "test", "ece"), ("adaece", "test", "adaece"),
    ("cece", "test", "cece"), ("nll", "test", "nll"),
    ("ece_ts", "test_ts", "ece"), ("adaece_ts", "test_ts", "adaece"), ("cece_ts", "test_ts", "cece"),
    ("nll_ts", "test_ts", "nll"), ("T", None, "temperature"),
)
PERCENT = {"acc", "ece", "adaece", "cece", "ece_ts", "adaece_ts", "cece_ts"}


def collect_runs(train_dir) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished ``<method>/seed<k>/metrics.json``; also the folders that did not finish."""
    train_dir = Path(train_dir)
    rows, missing = [], []
    for run in sorted(p for p in train_dir.glob("*/seed*") if p.is_dir()):
        path = run / "metrics.json"
        if not path.exists():
            missing.append(str(run.relative_to(train_dir)))
            continue
        m = read_json(path)
        row = {"method": m["method"], "model": m["model"], "seed": m["seed"], "path": str(run)}
        for col, section, key in TABLE_METRICS:
            row[col] = m[key] if section is None else m[section][key]
        rows.append(row)
    return pd.DataFrame(rows), missing


def results_table(runs: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (model, method); metrics stay fractions."""
    cols = [c for c, _, _ in TABLE_METRICS]
    grouped = runs.groupby(["model", "method"], sort=False)[cols]
    table = grouped.mean().join(grouped.std(ddof=1).fillna(0.0), rsuffix="_std")
    table.insert(0, "seeds", grouped.size())
    if order:
        table = table.reindex(sorted(table.index, key=lambda i: order.index(i[1]) if i[1] in order else 99))
    return table


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings ``mean ± std``, percent for the rate metrics (the library keeps fractions)."""
    out = pd.DataFrame(index=table.index)
    out["seeds"] = table["seeds"]
    for col, _, _ in TABLE_METRICS:
        scale, digits = (100.0, 2) if col in PERCENT else (1.0, 3)
        mean, std = table[col] * scale, table[f"{col}_std"] * scale
        name = f"{col} (%)" if col in PERCENT else col
        out[name] = [f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(mean, std)]
    return out


def write_table(table: pd.DataFrame, out_dir, name: str = "results") -> dict[str, Path]:
    """The numeric table as CSV, the formatted one as Markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{name}.csv", "md": out_dir / f"{name}.md"}
    table.to_csv(paths["csv"], float_format="%.6f")
    paths["md"].write_text(format_table(table).reset_index().to_markdown(index=False) + "\n")
    return paths


def test_logits(runs: pd.DataFrame, temperature_scaled: bool = False, seed=None) -> dict[str, tuple]:
    """``method -> (test logits, test labels)`` of one seed per method (the first, unless given)."""
    panels = {}
    for method, group in runs.groupby("method", sort=False):
        row = group.sort_values("seed").iloc[0] if seed is None else group[group.seed == seed].iloc[0]
        arrays = load_arrays(Path(row["path"]) / "logits.npz")
        logits = arrays["test_logits"]
        if temperature_scaled:
            logits = apply_temperature(logits, row["T"])
        panels[f"{method} (T={row['T']:.1f})" if temperature_scaled else method] = (logits, arrays["test_labels"])
    return panels


def method_order(run_dir, runs: pd.DataFrame) -> list[str]:
    """Methods in the order the study listed them (the train stage's manifest), else as found."""
    for name in ("manifest.json", "stage.json"):
        path = Path(run_dir) / "train" / name
        if path.exists():
            listed = read_json(path)["parameters"].get("methods", [])
            return [m for m in listed if m in set(runs.method)] + sorted(set(runs.method) - set(listed))
    return list(dict.fromkeys(runs.method))
