"""Temperature scaling recovers a known temperature and follows the paper's grid."""

import numpy as np
import pytest

from semmix_lib.calibration import TEMPERATURE_GRID, apply_temperature, fit_temperature
from semmix_lib.metrics import ece, softmax


def _calibrated_logits(seed=0, n=20_000, k=5):
    """Logits z with labels drawn from softmax(z): calibrated by construction (T = 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, (n, k))
    p = softmax(z)
    labels = (rng.uniform(size=(n, 1)) > np.cumsum(p, 1)).sum(1)
    return z, labels


def test_grid_is_the_papers():
    assert len(TEMPERATURE_GRID) == 100
    assert TEMPERATURE_GRID[0] == 0.1 and TEMPERATURE_GRID[-1] == 10.0 and TEMPERATURE_GRID[2] == 0.3


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_nll_fit_recovers_the_temperature(true_t):
    z, y = _calibrated_logits()
    # logits sharpened (true_t > 1: overconfident) or flattened; dividing by true_t undoes it
    t = fit_temperature(z * true_t, y, method="nll")
    assert t == pytest.approx(true_t, rel=0.05)


def test_grid_ece_fit_recovers_the_temperature_and_lowers_ece():
    z, y = _calibrated_logits(seed=1)
    t = fit_temperature(z * 3.0, y, method="grid-ece")
    assert t in TEMPERATURE_GRID
    assert t == pytest.approx(3.0, abs=0.3)
    assert ece(softmax(apply_temperature(z * 3.0, t)), y) < 0.5 * ece(softmax(z * 3.0), y)


def test_grid_ties_pick_the_smallest_temperature():
    # every prediction right with a huge margin: every T up to 10 gives confidence 1, ECE 0
    z = np.array([[200.0, 0.0], [0.0, 200.0]])
    assert fit_temperature(z, [0, 1], method="grid-ece") == 0.1


def test_bad_inputs():
    z, y = _calibrated_logits(n=100)
    with pytest.raises(ValueError, match="grid-ece"):
        fit_temperature(z, y, method="lbfgs")
    with pytest.raises(ValueError, match="outside"):
        fit_temperature(z, y + 5)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(z, 0.0)
