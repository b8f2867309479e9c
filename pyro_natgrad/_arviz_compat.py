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

_MIN_TAIL = 5  # fewest distinct ratios a Pareto tail is fitted to (both lines need 5 draws)


def _arviz() -> ModuleType:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        import arviz

    return arviz


def is_arviz_1(az: ModuleType | None = None) -> bool:
    """Whether the installed ArviZ (or ``az``) is the 1.x line (DataTree, arviz-stats)."""
    az = az or _arviz()
    return int(az.__version__.split(".")[0]) >= 1


def from_dict(
    groups: dict[str, dict[str, np.ndarray]],
    *,
    dims: dict[str, list[str]],
    coords: dict[str, np.ndarray] | None = None,
) -> Any:
    """InferenceData (0.x) or DataTree (1.x) from ``{group: {variable: array}}``.

    Arrays of sample groups lead with (chain, draw); ``dims`` names the remaining axes and
    ``coords`` gives the labels of some of them (else 0, 1, ...). 0.x takes one keyword argument
    per group, 1.x the nested dict itself.
    """
    az = _arviz()
    if is_arviz_1(az):
        return az.from_dict(groups, dims=dims, coords=coords)
    return az.from_dict(**groups, dims=dims, coords=coords)


def psislw(log_ratios: np.ndarray, r_eff: float = 1.0) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, normalized log importance weights of a 1-d array of log ratios, and k̂.

    Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto smoothed importance sampling", JMLR 25.
    0.x: ``az.psislw`` smooths its argument. 1.x: ``arviz_stats``' array ``psislw`` takes
    log-likelihoods (LOO's ratios are 1 / p(y_i | θ)), i.e. smooths the *negated* argument.

    Ratios that span at most 1/S nats (S draws; all equal included) are flat: every weight is
    within a factor e^(1/S) of the others, so a weighted mean moves from the plain one by less
    than 1/S of the draws' range, below its Monte Carlo error. Their differences are rounding
    (float32 log densities of an exact guide take a handful of values) and the Pareto fit is not
    defined on such ties: uniform weights and k̂ = −∞ (bounded weights) on both lines.

    A tail of fewer than 5 distinct values has no Pareto fit either. The tail is the largest
    M = ⌊min(S/5, 3√(S/r_eff))⌋ ratios (1.x's M; 0.x rounds up) less those equal to the next
    largest (0.x's rule); 0.x returns k̂ = ∞ for fewer than 5 draws there, 1.x raises on one value.
    A guide on a discrete support gives such ties: raw weights, normalized, and k̂ = NaN on both
    lines; whether the weights are bounded (a finite support) is for the caller to say.
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    num = len(log_ratios)
    if np.ptp(log_ratios) <= 1.0 / num:
        return np.full_like(log_ratios, -np.log(num)), -np.inf
    ordered = np.sort(log_ratios)
    tail_length = int(min(num / 5, 3 * np.sqrt(num / r_eff)))
    tail = ordered[num - tail_length :]
    if len(np.unique(tail[tail > ordered[num - tail_length - 1]])) < _MIN_TAIL:
        return log_ratios - logsumexp(log_ratios), np.nan
    az = _arviz()
    if is_arviz_1(az):
        from arviz_stats.base import array_stats

        log_weights, k_hat = array_stats.psislw(-log_ratios, r_eff=r_eff)
    else:
        log_weights, k_hat = az.psislw(log_ratios, reff=r_eff)
    log_weights = np.asarray(log_weights, dtype=np.float64)
    return log_weights - logsumexp(log_weights), float(k_hat)
