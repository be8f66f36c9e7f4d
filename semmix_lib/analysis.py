"""Results from saved files only: collect a run's trained models and tabulate their metrics."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .calibration import apply_temperature
from .io import load_arrays, read_json

__all__ = ["collect_runs", "check_consistent", "results_table", "format_table", "TABLE_METRICS", "write_table",
           "test_logits", "method_order", "best_mask", "to_latex", "first_seed_histories", "upstream_figures",
           "corruption_tables", "ood_table"]

#: (column, metrics.json section, key): the paper's numbers, before and after temperature scaling.
_KEYS = ("acc", "ece", "adaece", "cece", "nll", "brier", "oe", "ue")
TABLE_METRICS = tuple((k, "test", k) for k in _KEYS) + tuple(
    (f"{k}_ts", "test_ts", k) for k in _KEYS if k != "acc") + (("T", None, "temperature"),)
PERCENT = {c for c, _, k in TABLE_METRICS if k in ("acc", "ece", "adaece", "cece", "oe", "ue")}
#: Columns where higher is better; every other metric column is lower-is-better (T is not ranked).
HIGHER_BETTER = {"acc"}


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
        row = {"dataset": m.get("dataset", "?"), "method": m["method"], "model": m["model"], "seed": m["seed"],
               "path": str(run)}
        for col, section, key in TABLE_METRICS:
            row[col] = m[key] if section is None else m[section][key]
        rows.append(row)
    runs = pd.DataFrame(rows)
    if not runs.empty:
        check_consistent(runs)
    return runs, missing


def check_consistent(runs: pd.DataFrame) -> None:
    """The seeds of one (dataset, model, method) must share every setting but the seed."""
    for key, group in runs.groupby(["dataset", "model", "method"]):
        configs = [{k: v for k, v in read_json(Path(p) / "config.json").items() if k != "seed"} for p in group.path]
        differing = sorted({k for c in configs for k in set(c) | set(configs[0]) if c.get(k) != configs[0].get(k)})
        if differing:
            raise ValueError(f"the seeds of {'/'.join(key)} were trained with different settings "
                             f"({', '.join(differing)}): they cannot be averaged. Keep one setting per run folder.")


def results_table(runs: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (model, method); metrics stay fractions."""
    cols = [c for c, _, _ in TABLE_METRICS]
    grouped = runs.groupby(["dataset", "model", "method"], sort=False)[cols]
    table = grouped.mean().join(grouped.std(ddof=1).fillna(0.0).add_suffix("_std"))
    table.insert(0, "seeds", grouped.size())
    if order:
        table = table.reindex(sorted(table.index, key=lambda i: order.index(i[2]) if i[2] in order else 99))
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


def best_mask(table: pd.DataFrame) -> pd.DataFrame:
    """True where a row has the best mean of its column within its (dataset, model) block."""
    mask = pd.DataFrame(False, index=table.index, columns=[c for c, _, _ in TABLE_METRICS])
    for col in mask.columns:
        if col == "T":
            continue
        block = table[col].groupby(level=["dataset", "model"])
        best = block.transform("max" if col in HIGHER_BETTER else "min")
        mask[col] = table[col] == best
    return mask


def _marked(table: pd.DataFrame, bold) -> pd.DataFrame:
    out = format_table(table)
    mask = best_mask(table)
    for col, _, _ in TABLE_METRICS:
        name = f"{col} (%)" if col in PERCENT else col
        out[name] = [bold(v) if m else v for v, m in zip(out[name], mask[col])]
    return out


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs LaTeX table, best value per column in bold, ``mean \\pm std``."""
    out = _marked(table, lambda v: f"\\textbf{{{v}}}").reset_index()
    out.columns = [str(c).replace("_", r"\_").replace("%", r"\%") for c in out.columns]
    body = out.map(lambda v: str(v).replace(" ± ", r" $\pm$ ").replace("_", r"\_"))
    lines = [r"\begin{tabular}{" + "l" * 3 + "r" * (len(out.columns) - 3) + "}", r"\toprule",
             " & ".join(out.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(row) + r" \\" for row in body.astype(str).values.tolist()]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, out_dir, name: str = "results") -> dict[str, Path]:
    """The numeric table as CSV; Markdown and LaTeX (booktabs) with the best value per column in bold."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{name}.csv", "md": out_dir / f"{name}.md", "tex": out_dir / f"{name}.tex"}
    table.to_csv(paths["csv"], float_format="%.6f")
    paths["md"].write_text(_marked(table, lambda v: f"**{v}**").reset_index().to_markdown(index=False) + "\n")
    paths["tex"].write_text(to_latex(table))
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


def first_seed_histories(runs: pd.DataFrame) -> dict[str, list[dict]]:
    """``method -> history rows`` of each method's first seed (for the training-curve figure)."""
    from .train import load_run

    first = runs.sort_values("seed").groupby("method", sort=False).head(1)
    return {r.method: load_run(r.path)["history"] for r in first.itertuples()}


def upstream_figures(run_dir, out_dir) -> list[str]:
    """The generation grid and the reannotation figure, redrawn from ``generate/`` and ``annotate/``;
    returns what was drawn or why not (a missing stage is reported, not an error)."""
    from . import mixcheck, plots
    from .annotation import read_annotations
    from .mixing import read_manifest

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    gen_dir, ann_dir = run_dir / "generate", run_dir / "annotate"
    done = []
    if (gen_dir / "manifest.csv").exists():
        grid, lams, labels = mixcheck.example_groups(gen_dir, read_manifest(gen_dir), max_rows=10)
        plots.save_figure(plots.mixing_grid(grid, lams, labels), out_dir / "mixing_grid")
        done.append("mixing_grid")
    else:
        done.append(f"no generation in {gen_dir}: mixing grid skipped")
    if (ann_dir / "annotations.csv").exists():
        table = read_annotations(ann_dir, gen_dir)
        s = read_json(ann_dir / "annotation.json")["s"]
        plots.save_figure(plots.reannotation(table, s), out_dir / "reannotation")
        done.append("reannotation")
    else:
        done.append(f"no annotation in {ann_dir}: reannotation figure skipped")
    return done


def _first_seeds(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.sort_values("seed").groupby("method", sort=False).head(1)


def corruption_tables(runs: pd.DataFrame, splits, device="cpu", cifar_c_root=None, progress=True) -> pd.DataFrame:
    """Accuracy and ECE (before / after each model's temperature) under every corruption and
    severity, for the first seed of each method; one table with a ``method`` column."""
    from .progress import tqdm
    from .robustness import evaluate_corruptions
    from .train import load_trained_model

    tables = []
    for row in tqdm(list(_first_seeds(runs).itertuples()), desc="corruptions", disable=not progress):
        model, t = load_trained_model(row.path, splits, device)
        table = evaluate_corruptions(model, splits, device=device, temperature=t, cifar_c_root=cifar_c_root)
        tables.append(table.assign(method=row.method, seed=row.seed))
    return pd.concat(tables, ignore_index=True)


def ood_table(runs: pd.DataFrame, splits, data_root=None, device="cpu") -> pd.DataFrame:
    """AUROC, AUPR and FPR at 95% TPR on the dataset's OOD sets (those available; see
    :func:`semmix_lib.ood.ood_sets`), max-softmax and entropy scores, first seed of each method."""
    from .ood import evaluate_ood, ood_sets
    from .train import load_trained_model

    sets = ood_sets(splits, data_root, missing="skip")
    tables = []
    for row in _first_seeds(runs).itertuples():
        model, _ = load_trained_model(row.path, splits, device)
        tables.append(evaluate_ood(model, splits, sets, device=device).assign(method=row.method, seed=row.seed))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
