"""Temperature scaling (Guo et al. 2017), fitted on the validation split (PAPER.md section 4).

Two ways to fit the single temperature ``T`` in ``softmax(z / T)``:

* ``"grid-ece"`` (the paper's): try ``T = 0.1, 0.2, ..., 10.0`` and keep the one with the lowest
  validation ECE (ties: the smallest such T).
* ``"nll"`` (Guo et al.'s): minimise validation NLL over ``log T`` with L-BFGS.
"""

from __future__ import annotations

import numpy as np
import torch

from .metrics import as_numpy, check_labels, ece, softmax

__all__ = ["TEMPERATURE_GRID", "METHODS", "apply_temperature", "fit_temperature"]

#: The paper's grid, 0.1 to 10.0 in steps of 0.1 (rounded so that 0.3 is 0.3, not 0.30000000000000004).
TEMPERATURE_GRID = np.round(np.arange(1, 101) * 0.1, 1)
METHODS = ("grid-ece", "nll")


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Logits divided by ``temperature`` (float64 numpy)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return as_numpy(logits).astype(np.float64) / temperature


def _fit_grid_ece(logits: np.ndarray, labels: np.ndarray, n_bins: int, grid) -> float:
    errors = [ece(softmax(logits / t), labels, n_bins) for t in grid]
    return float(grid[int(np.argmin(errors))])  # argmin keeps the first (smallest T) on ties


def _fit_nll(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    z = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().item())


def fit_temperature(logits, labels, method: str = "grid-ece", n_bins: int = 15, grid=None) -> float:
    """Fit the temperature on held-out logits; returns ``T`` (divide logits by it)."""
    z = as_numpy(logits).astype(np.float64)
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"expected logits of shape (N, K) with N > 0, got {z.shape}")
    y = check_labels(labels, z.shape[1], z.shape[0])
    if method == "grid-ece":
        return _fit_grid_ece(z, y, n_bins, TEMPERATURE_GRID if grid is None else np.asarray(grid))
    if method == "nll":
        return _fit_nll(z, y)
    raise ValueError(f"unknown temperature-fitting method {method!r}; choose one of {METHODS}")
