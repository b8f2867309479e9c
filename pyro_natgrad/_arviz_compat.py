"""The two ArviZ calls this library makes, for ArviZ 0.x (InferenceData) and 1.x (DataTree).

ArviZ is imported lazily (it costs about two seconds), with the 0.x notice about its coming
refactor silenced: that notice is for people who call ArviZ, not for users of this library.
This module imports nothing from the package (numpy, scipy and ArviZ only), so its tests run
where torch is not installed.
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


def is_arviz_1(az: ModuleType | None = None) -> bool:
    """Whether the installed ArviZ (or ``az``) is the 1.x line (DataTree, arviz-stats)."""
    az = az or _arviz()
    return int(az.__version__.split(".")[0]) >= 1


def from_dict(groups: dict[str, dict[str, np.ndarray]], *, dims: dict[str, list[str]]) -> Any:
    """InferenceData (0.x) or DataTree (1.x) from ``{group: {variable: array}}``.

    Arrays of sample groups lead with (chain, draw); ``dims`` names the remaining axes.
    0.x takes one keyword argument per group, 1.x the nested dict itself.
    """
    az = _arviz()
    if is_arviz_1(az):
        return az.from_dict(groups, dims=dims)
    return az.from_dict(**groups, dims=dims)


def psislw(log_ratios: np.ndarray, r_eff: float = 1.0) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, normalized log importance weights of a 1-d array of log ratios, and k̂.

    Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto smoothed importance sampling", JMLR 25.
    0.x: ``az.psislw`` smooths its argument. 1.x: ``arviz_stats``' array ``psislw`` takes
    log-likelihoods (LOO's ratios are 1 / p(y_i | θ)), i.e. smooths the *negated* argument.

    Ratios that span at most 1/S nats (S draws; all equal included) are flat: every weight is
    within a factor e^(1/S) of the others, so a weighted mean moves from the plain one by less
    than 1/S of the draws' range, below its Monte Carlo error. Their differences are rounding
    (float32 log densities of an exact guide take a handful of values) and the Pareto fit is not
    defined on such ties: uniform weights and k̂ = −∞ (bounded weights) on both lines. Where
    ArviZ 1.x cannot fit the tail otherwise (ties) k̂ is NaN, which reads as unreliable.
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    if np.ptp(log_ratios) <= 1.0 / len(log_ratios):
        return np.full_like(log_ratios, -np.log(len(log_ratios))), -np.inf
    az = _arviz()
    if is_arviz_1(az):
        from arviz_stats.base import array_stats

        try:
            log_weights, k_hat = array_stats.psislw(-log_ratios, r_eff=r_eff)
        except ValueError:  # "All tail values are the same": no tail to fit
            log_weights, k_hat = log_ratios, np.nan
    else:
        log_weights, k_hat = az.psislw(log_ratios, reff=r_eff)
    log_weights = np.asarray(log_weights, dtype=np.float64)
    return log_weights - logsumexp(log_weights), float(k_hat)
