"""The two ArviZ calls this library makes, for ArviZ 0.x (InferenceData) and 1.x (DataTree).

ArviZ is imported lazily (it costs about two seconds), with the 0.x notice about its coming
refactor silenced: that notice is for people who call ArviZ, not for users of this library.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

import numpy as np
from scipy.special import logsumexp


def _arviz() -> ModuleType:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        import arviz

    return arviz


def _is_arviz_1(az: ModuleType) -> bool:
    return int(az.__version__.split(".")[0]) >= 1


def from_dict(groups: dict[str, dict[str, np.ndarray]], *, dims: dict[str, list[str]]) -> Any:
    """InferenceData (0.x) or DataTree (1.x) from ``{group: {variable: array}}``.

    Arrays of sample groups lead with (chain, draw); ``dims`` names the remaining axes.
    0.x takes one keyword argument per group, 1.x the nested dict itself.
    """
    az = _arviz()
    if _is_arviz_1(az):
        return az.from_dict(groups, dims=dims)
    return az.from_dict(**groups, dims=dims)


def psislw(log_ratios: np.ndarray, r_eff: float = 1.0) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, normalized log importance weights of a 1-d array of log ratios, and k̂.

    Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto smoothed importance sampling", JMLR 25.
    0.x: ``az.psislw`` smooths its argument and normalizes. 1.x: ``arviz_stats``' array
    ``psislw`` takes log-likelihoods, i.e. smooths the *negated* argument, and does not normalize.
    Constant ratios (q proportional to p) have no tail to fit: uniform weights and k̂ = −∞ (bounded
    weights), where ArviZ 0.x would report +∞.
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    if np.ptp(log_ratios) == 0:
        return np.full_like(log_ratios, -np.log(len(log_ratios))), -np.inf
    az = _arviz()
    if _is_arviz_1(az):
        from arviz_stats.base import array_stats

        log_weights, k_hat = array_stats.psislw(-log_ratios, r_eff=r_eff)
        log_weights = log_weights - logsumexp(log_weights)
    else:
        log_weights, k_hat = az.psislw(log_ratios, reff=r_eff)
    return np.asarray(log_weights), float(k_hat)
