"""pyro_natgrad._arviz_compat on the installed ArviZ line (0.x or 1.x), against closed forms.

Torch-free: the module is loaded from its file, not through the package (whose import needs
torch), so CI's Python 3.12 leg runs these tests on ArviZ 1.x even where no CPU build of torch
for that Python can be installed. The groups are built as ``to_inference_data`` builds them, from
exact posterior draws of a Normal-Normal model.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

from .arviz_versions import ARVIZ_1, group_names, loo, plot_marginal

_SPEC = importlib.util.spec_from_file_location(
    "pyro_natgrad_arviz_compat",
    Path(__file__).resolve().parent.parent / "pyro_natgrad" / "_arviz_compat.py",
)
compat = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compat)

# mu ~ N(M0, S0²), y_i ~ N(mu, SIGMA²): the exact posterior of mu is Gaussian.
M0, S0, SIGMA = 1.0, 2.0, 0.7
Y = np.linspace(-1.0, 3.0, 12) + 0.3 * np.sin(np.arange(12))


def posterior(y: np.ndarray) -> tuple[float, float]:
    precision = 1 / S0**2 + len(y) / SIGMA**2
    return (M0 / S0**2 + y.sum() / SIGMA**2) / precision, precision**-0.5


def groups(num: int, dtype: type = np.float64, seed: int = 0) -> dict:
    """``to_inference_data``'s groups for ``num`` exact posterior draws, one chain."""
    rng = np.random.default_rng(seed)
    mean, sd = posterior(Y)
    mu = (mean + sd * rng.standard_normal(num)).astype(dtype)
    return {
        "posterior": {"mu": mu[None]},
        "posterior_predictive": {
            "y": (mu[:, None] + SIGMA * rng.standard_normal((num, len(Y)))).astype(dtype)[None]
        },
        "log_likelihood": {"y": norm.logpdf(Y, mu[:, None], SIGMA).astype(dtype)[None]},
        "observed_data": {"y": Y.astype(dtype)},
        "constant_data": {"X": np.ones((len(Y), 2), dtype=dtype)},
    }


DIMS = {"mu": [], "y": ["n"], "X": ["n", "X_dim_1"]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_from_dict_groups_dims_shapes_and_dtypes(dtype):
    data = compat.from_dict(groups(300, dtype), dims=DIMS)
    assert type(data).__name__ == ("DataTree" if ARVIZ_1 else "InferenceData")
    assert group_names(data) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
    }
    assert data.posterior["mu"].dims == ("chain", "draw") and data.posterior["mu"].dtype == dtype
    for group in ("posterior_predictive", "log_likelihood"):
        assert data[group]["y"].dims == ("chain", "draw", "n")
        assert data[group]["y"].shape == (1, 300, len(Y))
    assert data.observed_data["y"].dims == ("n",)
    assert data.constant_data["X"].dims == ("n", "X_dim_1")
    np.testing.assert_array_equal(data.observed_data["y"].values, Y.astype(dtype))


def test_loo_matches_exact_leave_one_out_predictive():
    """elpd_loo = Σ_i log N(y_i; m_{-i}, SIGMA² + s_{-i}²) in closed form; PSIS-LOO of 4000 exact
    posterior draws is within 0.2 of it (its error over 20 seeds: sd 0.04)."""
    exact = 0.0
    for i in range(len(Y)):
        m, s = posterior(np.delete(Y, i))
        exact += norm.logpdf(Y[i], m, math.sqrt(SIGMA**2 + s**2))
    elpd, pareto_k = loo(compat.from_dict(groups(4000), dims=DIMS))
    assert elpd == pytest.approx(exact, abs=0.2)
    assert pareto_k.shape == (len(Y),) and (pareto_k < 0.5).all()


def test_summary_and_marginal_plot_read_the_draws():
    import arviz as az

    data = compat.from_dict(groups(500), dims=DIMS)
    draws = data.posterior["mu"].values
    summary = az.summary(data, var_names=["mu"], round_to="none")
    assert summary.loc["mu", "mean"] == pytest.approx(draws.mean(), rel=1e-12)
    assert summary.loc["mu", "sd"] == pytest.approx(draws.std(ddof=1), rel=1e-12)
    assert plot_marginal(data, "mu") == "mu"


@pytest.mark.parametrize("k", [0.2, 0.8])
def test_psis_recovers_a_known_pareto_tail(k):
    """Ratios w = U^(−k) (Pareto tail of shape k): log w = k·E, E ~ Exp(1). Over 10 seeds of 4000
    draws the mean k̂ is k within 0.15 (measured on both lines: bias +0.035 at k = 0.2, ~0 at 0.8;
    sd of one k̂ 0.08-0.11). Fitting the left tail instead (the sign of 1.x's argument) gives
    k̂ < 0. The weights are normalized and monotone in the ratio; only the largest 3√S draws are
    smoothed, the others keep their raw ratios (up to the normalization)."""
    estimates = []
    for seed in range(10):
        log_ratios = k * np.random.default_rng(seed).exponential(size=4000)
        log_weights, k_hat = compat.psislw(log_ratios)
        estimates.append(k_hat)
        assert logsumexp(log_weights) == pytest.approx(0.0, abs=1e-12)
        order = np.argsort(log_ratios)
        assert (np.diff(log_weights[order]) >= -1e-12).all()
        body = order[:-190]  # 3√4000 = 189.7 (0.x rounds up, 1.x down)
        np.testing.assert_allclose(np.ptp(log_weights[body] - log_ratios[body]), 0, atol=1e-12)
    assert np.mean(estimates) == pytest.approx(k, abs=0.15)


def test_ratios_equal_to_rounding_are_flat():
    """An exact guide in float32: log p(x, z) − log q(z) is the log evidence up to rounding, a
    handful of distinct values (ArviZ 1.x cannot fit a tail of ties: k̂ NaN, which read as
    unreliable). Ratios within 1/S nats of each other: uniform weights, k̂ = −∞."""
    num = 2000
    rng = np.random.default_rng(0)
    log_ratios = (np.float32(-21.5) + rng.normal(0, 2e-6, num).astype(np.float32)).astype(float)
    assert len(np.unique(log_ratios)) < 20 and 0 < np.ptp(log_ratios) < 1 / num
    for ratios in (log_ratios, np.full(num, -21.5)):
        log_weights, k_hat = compat.psislw(ratios)
        assert k_hat == -np.inf
        np.testing.assert_allclose(log_weights, -np.log(num), rtol=1e-12)


@pytest.mark.parametrize("ratios", ["two-valued", "four above a tie"])
def test_a_tail_of_ties_has_no_pareto_fit(ratios):
    """Ratios of a discrete guide site: the tail (the largest 134 of 2000, those above the next)
    holds fewer than 5 distinct values, to which no Pareto tail can be fitted: k̂ = NaN on both
    lines (0.x returned ∞ for either; 1.x raised on the first and fitted the second). Weights
    stay raw, normalized."""
    log_ratios = np.where(np.arange(2000) % 3 == 0, np.log(0.7 / 0.5), np.log(0.3 / 0.5))
    if ratios == "four above a tie":
        log_ratios[:4] = np.log([1.5, 1.6, 1.7, 1.8])
    log_weights, k_hat = compat.psislw(log_ratios)
    assert np.isnan(k_hat)
    np.testing.assert_allclose(log_weights, log_ratios - logsumexp(log_ratios), rtol=1e-12)
