"""to_inference_data and vi_diagnostics against closed-form posteriors, evidences and LOO, and NUTS.

Monte Carlo tolerances are 4 standard errors of the estimate (a false failure has probability
about 6e-5 per comparison); the seeds are fixed, so each test is deterministic.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.nn import PyroModule, PyroParam, PyroSample

from pyro_natgrad.diagnostics import to_inference_data, vi_diagnostics
from pyro_natgrad.fit import fit

from .arviz_versions import group_names, loo, plot_marginal

matplotlib.use("Agg")

DTYPES = [torch.float32, torch.float64]
MC_SE = 4.0  # tolerance in Monte Carlo standard errors


# Normal-Normal with known noise: mu ~ N(M0, S0²), y_i ~ N(mu, SIGMA²); exact Gaussian posterior.
M0, S0, SIGMA = 1.0, 2.0, 0.7


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(M0, dtype=y.dtype), S0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu, SIGMA), obs=y)


def normal_data(dtype, n=12):
    return torch.linspace(-1.0, 3.0, n, dtype=dtype) + 0.3 * torch.sin(torch.arange(n, dtype=dtype))


def normal_posterior(y, skip=None):
    """Exact posterior (mean, sd) of mu, optionally without observation ``skip``."""
    keep = torch.ones(len(y), dtype=torch.bool)
    if skip is not None:
        keep[skip] = False
    precision = 1 / S0**2 + keep.sum().item() / SIGMA**2
    mean = (M0 / S0**2 + y[keep].sum().item() / SIGMA**2) / precision
    return mean, precision**-0.5


def normal_log_evidence(y):
    """log N(y; M0·1, SIGMA² I + S0² 11ᵀ)."""
    y = y.double()
    cov = SIGMA**2 * torch.eye(len(y), dtype=y.dtype) + S0**2
    return dist.MultivariateNormal(torch.full_like(y, M0), cov).log_prob(y).item()


def exact_autonormal(y):
    guide = AutoNormal(normal_model)
    guide(y)
    mean, sd = normal_posterior(y)
    guide.locs.mu = PyroParam(torch.tensor(mean, dtype=y.dtype))
    guide.scales.mu = PyroParam(torch.tensor(sd, dtype=y.dtype), constraints.softplus_positive)
    return guide


def exact_custom_guide(y):
    mean, sd = normal_posterior(y)

    def guide(y):
        loc = pyro.param("mu_loc", torch.tensor(mean, dtype=y.dtype))
        scale = pyro.param(
            "mu_scale", torch.tensor(sd, dtype=y.dtype), constraint=constraints.positive
        )
        pyro.sample("mu", dist.Normal(loc, scale))

    return guide


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "make_guide", [exact_autonormal, exact_custom_guide], ids=["AutoNormal", "custom"]
)
def test_round_trip_matches_exact_posterior(dtype, make_guide):
    y, num = normal_data(dtype), 4000
    guide = make_guide(y)
    idata = to_inference_data(normal_model, guide, y, num_samples=num)
    draws = idata.posterior["mu"].values
    assert draws.shape == (1, num) and draws.dtype == np.dtype(str(dtype).split(".")[-1])
    mean, sd = normal_posterior(y)
    assert abs(draws.mean() - mean) < MC_SE * sd / math.sqrt(num)
    assert abs(draws.std(ddof=1) - sd) < MC_SE * sd / math.sqrt(2 * (num - 1))
    summary = az.summary(idata, var_names=["mu"], round_to="none")
    assert summary.loc["mu", "mean"] == pytest.approx(draws.mean(), rel=1e-6)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())


def test_loo_matches_exact_leave_one_out_predictive():
    """elpd_loo = Σ_i log N(y_i; m_{-i}, SIGMA² + s_{-i}²) in closed form (-26.73). PSIS-LOO of 4000
    exact posterior draws, measured over 20 seeds: error mean 0.004, sd 0.043; tolerance 0.2."""
    y = normal_data(torch.float64)
    idata = to_inference_data(normal_model, exact_autonormal(y), y, num_samples=4000)
    exact = 0.0
    for i in range(len(y)):
        m, s = normal_posterior(y, skip=i)
        exact += dist.Normal(m, math.sqrt(SIGMA**2 + s**2)).log_prob(y[i]).item()
    elpd, pareto_k = loo(idata)
    assert elpd == pytest.approx(exact, abs=0.2)
    assert (pareto_k < 0.5).all()


def test_plot_posterior_runs():
    """az.plot_posterior (0.x) or arviz-plots' plot_dist (1.x)."""
    y = normal_data(torch.float64)
    idata = to_inference_data(normal_model, exact_autonormal(y), y, num_samples=200)
    assert plot_marginal(idata, "mu") == "mu"


# A model with a vector latent, a plate of latents and a positive latent.
N_OBS, DIM, GROUPS = 9, 3, 4


def plated_model(X, group, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(DIM, dtype=X.dtype), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=X.dtype), 0.5))
    with pyro.plate("groups", GROUPS):
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 1.0))
    with pyro.plate("n", N_OBS):
        pyro.sample("y", dist.Normal((X * w).sum(-1) + b[..., group], s), obs=y)


def plated_custom_guide(X, group, y):
    w_loc = pyro.param("w_loc", torch.linspace(-1, 1, DIM, dtype=X.dtype))
    pyro.sample("w", dist.Normal(w_loc, 0.2).to_event(1))
    pyro.sample("s", dist.LogNormal(pyro.param("s_loc", torch.tensor(0.1, dtype=X.dtype)), 0.2))
    with pyro.plate("groups", GROUPS):
        pyro.sample("b", dist.Normal(pyro.param("b_loc", torch.zeros(GROUPS, dtype=X.dtype)), 0.3))


def plated_data(dtype):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N_OBS, DIM, generator=g, dtype=dtype)
    return X, torch.arange(N_OBS) % GROUPS, torch.randn(N_OBS, generator=g, dtype=dtype)


GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoDiagonalNormal": AutoDiagonalNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "custom": lambda m: plated_custom_guide,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("guide_name", GUIDES)
def test_groups_dims_and_shapes_with_plates(guide_name, dtype):
    data, num = plated_data(dtype), 500
    guide = GUIDES[guide_name](plated_model)
    guide(*data)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*one at a time")  # it must vectorize
        idata = to_inference_data(plated_model, guide, *data, num_samples=num)
    assert group_names(idata) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
    }
    post = idata.posterior
    assert post["w"].dims == ("chain", "draw", "w_dim_0") and post["w"].shape == (1, num, DIM)
    assert post["s"].dims == ("chain", "draw") and (post["s"].values > 0).all()
    assert post["b"].dims == ("chain", "draw", "groups") and post["b"].shape == (1, num, GROUPS)
    for group in ("posterior_predictive", "log_likelihood"):
        assert idata[group]["y"].dims == ("chain", "draw", "n")
        assert idata[group]["y"].shape == (1, num, N_OBS)
    assert idata.observed_data["y"].dims == ("n",)
    assert set(idata.constant_data) == {"X", "group"}  # y is the observation, not a constant
    assert idata.constant_data["X"].shape == (N_OBS, DIM)

    X, group, y = (t.double() for t in data)
    w, s, b = (torch.as_tensor(post[k].values[0]).double() for k in ("w", "s", "b"))
    loc = (X * w[:, None, :]).sum(-1) + b[:, group.long()]
    scale = s[:, None]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    expected = dist.Normal(loc, scale).log_prob(y)
    np.testing.assert_allclose(
        idata.log_likelihood["y"].values[0], expected.numpy(), rtol=tol, atol=tol
    )
    # Replicated data given each draw: standardized residuals are N(0, 1) over num·N_OBS values.
    z = (torch.as_tensor(idata.posterior_predictive["y"].values[0]).double() - loc) / scale
    count = z.numel()
    assert abs(z.mean().item()) < MC_SE / math.sqrt(count)
    assert abs(z.var().item() - 1) < MC_SE * math.sqrt(2 / count)


def test_draws_leave_param_store_and_grad_mode_alone():
    data = plated_data(torch.float64)
    guide = AutoMultivariateNormal(plated_model)
    guide(*data)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    to_inference_data(plated_model, guide, *data, num_samples=50)
    vi_diagnostics(plated_model, guide, *data, num_samples=50)
    after = dict(pyro.get_param_store().items())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k].detach()) for k in before)
    assert torch.is_grad_enabled()


class ModuleRegression(PyroModule):
    """A PyroModule with a ``pyro.deterministic``, a ``pyro.factor`` and a keyword argument."""

    def __init__(self):
        super().__init__()
        self.w = PyroSample(dist.Normal(0.0, 1.0).expand([DIM]).to_event(1))

    def forward(self, X, y=None, *, noise):
        pyro.factor("shrink", -0.1 * self.w.pow(2).sum(-1))
        with pyro.plate("n", len(X)):
            mu = pyro.deterministic("mu", (X * self.w).sum(-1), event_dim=0)
            return pyro.sample("y", dist.Normal(mu, noise), obs=y)


def test_pyro_module_with_deterministic_and_factor_sites():
    X, _, y = plated_data(torch.float64)
    model, noise = ModuleRegression(), torch.tensor(0.5, dtype=torch.float64)
    guide = AutoNormal(model)
    guide(X, y, noise=noise)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*one at a time")
        idata = to_inference_data(model, guide, X, y, num_samples=100, noise=noise)
    assert set(idata.posterior) == {"w", "mu"} and set(idata.log_likelihood) == {"y"}
    assert set(idata.constant_data) == {"X", "noise"}
    assert idata.posterior["mu"].dims == ("chain", "draw", "n")
    w = idata.posterior["w"].values[0]
    np.testing.assert_allclose(idata.posterior["mu"].values[0], w @ X.numpy().T, rtol=1e-12)
    assert idata.posterior_predictive["y"].shape == (1, 100, N_OBS)


def test_point_mass_guide_is_refused():
    y = normal_data(torch.float64)
    guide = AutoDelta(normal_model)
    guide(y)
    with pytest.raises(ValueError, match="point-mass"):
        vi_diagnostics(normal_model, guide, y, num_samples=100)


# A latent the guide does not sample: mu ~ N(0, 1), d_i ~ Bernoulli(P_D), y_i ~ N(mu + 2 d_i, 0.5).
P_D = 0.3
MIXTURE_Y = [0.1, 1.3, -0.4, 0.9, 2.8, 1.0]


def mixture_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    with pyro.plate("n", len(y)):
        d = pyro.sample("d", dist.Bernoulli(torch.tensor(P_D, dtype=y.dtype)))
        pyro.sample("y", dist.Normal(mu + 2.0 * d, 0.5), obs=y)


def mixture_exact(y):
    """Posterior mean and sd of mu, P(d_i = 1 | y) and log p(y), by quadrature over mu."""
    grid = torch.linspace(-8.0, 8.0, 32001, dtype=torch.float64)
    y = y.double()
    one, zero = (dist.Normal(grid[:, None] + shift, 0.5).log_prob(y) for shift in (2.0, 0.0))
    joint_d = torch.stack([one + math.log(P_D), zero + math.log(1 - P_D)])  # (2, grid, n)
    log_lik = joint_d.logsumexp(0)
    log_post = dist.Normal(0.0, 1.0).log_prob(grid) + log_lik.sum(-1)
    step = (grid[1] - grid[0]).item()
    log_evidence = (log_post.logsumexp(0) + math.log(step)).item()
    w = (log_post - log_post.logsumexp(0)).exp()
    mean = (w * grid).sum().item()
    sd = (w * (grid - mean) ** 2).sum().sqrt().item()
    d_mean = (w[:, None] * (joint_d[0] - log_lik).exp()).sum(0).numpy()
    return mean, sd, d_mean, log_evidence


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_latent_hidden_from_the_guide_is_summed_out(dtype):
    """d is hidden from AutoNormal (as for TraceEnum_ELBO). q(mu) = N(exact mean, 1.5 · exact sd)
    is not the posterior, so the PSIS means must correct it: with d summed out of p(x, z) and drawn
    from p(d | mu, y) they match the quadrature's mu and P(d_i = 1 | y) within 4 standard errors
    (sd / √ESS), and the IS evidence log p(y) to 0.01. With d drawn from p(d) and p(d) kept in
    the weights, P(d_2 = 1 | y) came out 0.075 for 0.173, and log p(y) 3 nats low."""
    y = torch.tensor(MIXTURE_Y, dtype=dtype)
    mean, sd, d_mean, log_evidence = mixture_exact(y)
    guide = AutoNormal(poutine.block(mixture_model, hide=["d"]))
    guide(y)
    guide.locs.mu = PyroParam(torch.tensor(mean, dtype=dtype))
    guide.scales.mu = PyroParam(torch.tensor(1.5 * sd, dtype=dtype), constraints.softplus_positive)
    report = vi_diagnostics(mixture_model, guide, y, num_samples=4000)
    assert report.verdict == "good"
    se = MC_SE / math.sqrt(report.ess)
    assert abs(report.means["mu"] - mean) < se * sd
    assert (np.abs(report.means["d"] - d_mean) < se * np.sqrt(d_mean * (1 - d_mean)) + 1e-3).all()
    assert report.log_evidence == pytest.approx(log_evidence, abs=0.01)

    idata = to_inference_data(mixture_model, guide, y, num_samples=500)
    d = idata.posterior["d"].values
    assert d.shape == (1, 500, len(y)) and set(np.unique(d)) <= {0.0, 1.0}


def test_latent_hidden_from_the_guide_without_finite_support_is_refused():
    def model(y):
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        mu = pyro.sample("mu", dist.Normal(0.0, tau))
        with pyro.plate("n", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = normal_data(torch.float64)
    guide = AutoNormal(poutine.block(model, hide=["tau"]))
    guide(y)
    for function in (vi_diagnostics, to_inference_data):
        with pytest.raises(ValueError, match="site 'tau' is a latent of the model that the guide"):
            function(model, guide, y, num_samples=100)


def certain_model(y):
    """mu ~ N(M0, S0²), d ~ Bernoulli(1): y_i ~ N(mu + d, SIGMA²) with d = 1 for certain."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(M0, dtype=y.dtype), S0))
    d = pyro.sample("d", dist.Bernoulli(torch.tensor(1.0, dtype=y.dtype)))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(mu + d, SIGMA), obs=y)


@pytest.mark.parametrize("hidden", [False, True], ids=["guide-samples-d", "d-hidden"])
def test_certain_bernoulli_site_is_not_a_point_mass(hidden):
    """All draws of d are 1, as they must be: not a point-mass guide. The guide on mu is the
    exact posterior given d = 1, so every log ratio is log p(y) (closed form)."""
    y = normal_data(torch.float64)
    mean, sd = normal_posterior(y - 1)

    def guide(y):
        pyro.sample("mu", dist.Normal(torch.tensor(mean, dtype=y.dtype), sd))
        if not hidden:
            pyro.sample("d", dist.Bernoulli(torch.tensor(1.0, dtype=y.dtype)))

    report = vi_diagnostics(certain_model, guide, y, num_samples=200)
    np.testing.assert_allclose(report.log_ratios, normal_log_evidence(y - 1), rtol=0, atol=1e-9)
    assert report.verdict == "good" and report.means["d"] == pytest.approx(1.0, abs=1e-12)


def scalar_model(y):
    """Normal-Normal written with ``.item()``: runs one draw at a time only."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(M0, dtype=y.dtype), S0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(torch.tensor(mu.item(), dtype=y.dtype), SIGMA), obs=y)


def test_non_vectorizable_model_falls_back_to_a_loop():
    y, num = normal_data(torch.float64), 200
    guide = exact_custom_guide(y)
    with pytest.warns(UserWarning, match="one at a time"):
        idata = to_inference_data(scalar_model, guide, y, num_samples=num)
    draws = idata.posterior["mu"].values
    assert draws.shape == (1, num) and idata.log_likelihood["y"].shape == (1, num, len(y))
    mean, sd = normal_posterior(y)
    assert abs(draws.mean() - mean) < MC_SE * sd / math.sqrt(num)
    with pytest.warns(UserWarning, match="one at a time"):
        report = vi_diagnostics(scalar_model, guide, y, num_samples=num)
    # exact guide: log p(y, mu) - log q(mu) = log p(y) for every draw
    np.testing.assert_allclose(report.log_ratios, normal_log_evidence(y), rtol=0, atol=1e-9)


# Linear regression on five features sharing one factor: a strongly correlated Gaussian posterior.
NOISE = 0.5


def regression_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[-1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), NOISE), obs=y)


def correlated_regression(dtype, n=30, d=5):
    """Data, exact posterior (mean, covariance, precision), log evidence log N(y; 0, σ²I + XXᵀ)."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(n, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    y = X @ torch.linspace(1.0, -0.5, d, dtype=torch.float64) + NOISE * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    precision = torch.eye(d, dtype=torch.float64) + X.T @ X / NOISE**2
    cov = torch.linalg.inv(precision)
    mean = cov @ X.T @ y / NOISE**2
    log_evidence = (
        dist.MultivariateNormal(
            torch.zeros(n, dtype=torch.float64), NOISE**2 * torch.eye(n) + X @ X.T
        )
        .log_prob(y)
        .item()
    )
    return X.to(dtype), y.to(dtype), mean, cov, precision, log_evidence


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_khat_small_for_exact_full_rank_guide(dtype):
    X, y, mean, cov, _, log_evidence = correlated_regression(dtype)
    eigenvalues = torch.linalg.eigvalsh(cov)
    assert eigenvalues[0] / eigenvalues[-1] < 0.01  # strongly correlated: condition number > 100
    guide = AutoMultivariateNormal(regression_model)
    guide(X, y)
    chol = torch.linalg.cholesky(cov)  # AutoMultivariateNormal's is diag(scale) · scale_tril
    guide.loc = PyroParam(mean.to(dtype))
    guide.scale = PyroParam(chol.diagonal().to(dtype), constraints.softplus_positive)
    guide.scale_tril = PyroParam(
        (chol / chol.diagonal()[:, None]).to(dtype), constraints.unit_lower_cholesky
    )
    num = 2000
    report = vi_diagnostics(regression_model, guide, X, y, num_samples=num)
    assert report.pareto_k < 0.5 and report.verdict == "good"
    assert report.ess > 0.99 * num
    # q = posterior: every log ratio is the log evidence (float32: ~1e-6 relative rounding)
    atol = 1e-8 if dtype == torch.float64 else 2e-3
    np.testing.assert_allclose(report.log_ratios, log_evidence, rtol=0, atol=atol)
    sd = cov.diagonal().sqrt().numpy()
    assert (np.abs(report.means["w"] - mean.numpy()) < MC_SE * sd / math.sqrt(num)).all()
    assert "good" in str(report) and "w:" in str(report)


def test_khat_large_for_underdispersed_mean_field_guide():
    X, y, mean, _, precision, _ = correlated_regression(torch.float64)
    guide = AutoDiagonalNormal(regression_model)
    guide(X, y)
    guide.loc = PyroParam(mean)
    # half the KL(q‖p)-optimal mean-field scale 1/√Λ_ii, itself far narrower than the posterior
    guide.scale = PyroParam(0.5 / precision.diagonal().sqrt(), constraints.softplus_positive)
    report = vi_diagnostics(regression_model, guide, X, y, num_samples=2000)
    # measured over seeds 0-5: k-hat 1.01-1.31, ESS 4-14 of 2000 draws
    assert report.pareto_k > 0.7 and report.verdict == "unreliable"
    assert report.ess < 0.05 * report.num_samples
    assert "unreliable" in str(report) and "withheld" in str(report)
    # the PSIS-weighted means are withheld: weighting does not correct q at this k-hat
    with pytest.raises(ValueError, match="withheld: Pareto k-hat = 1"):
        report.means  # noqa: B018
    assert report.guide_means["w"] == pytest.approx(mean.numpy(), abs=0.05)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_log_ratios_through_a_constrained_autoguide_site(dtype):
    """s ~ LogNormal(MU0, TAU0), x_i ~ LogNormal(log s, SIG): log s has a Gaussian posterior, so
    AutoNormal (a Normal on log s, mapped by exp) can be exact. Then every log p(x, s) − log q(s),
    which needs the guide's and the model's Jacobians, equals the closed-form log p(x)."""
    mu0, tau0, sig = 0.5, 1.0, 0.4
    x = torch.tensor([1.3, 2.9, 0.8, 1.7, 2.2, 1.1], dtype=dtype)

    def model(x):
        s = pyro.sample("s", dist.LogNormal(torch.tensor(mu0, dtype=x.dtype), tau0))
        with pyro.plate("n", len(x)):
            pyro.sample("x", dist.LogNormal(s.log(), sig), obs=x)

    logx = x.double().log()
    precision = 1 / tau0**2 + len(x) / sig**2
    mean = (mu0 / tau0**2 + logx.sum().item() / sig**2) / precision
    guide = AutoNormal(model)
    guide(x)
    guide.locs.s = PyroParam(torch.tensor(mean, dtype=dtype))
    guide.scales.s = PyroParam(
        torch.tensor(precision**-0.5, dtype=dtype), constraints.softplus_positive
    )
    num = 2000
    report = vi_diagnostics(model, guide, x, num_samples=num)
    cov = sig**2 * torch.eye(len(x), dtype=torch.float64) + tau0**2
    exact = (
        dist.MultivariateNormal(torch.full_like(logx, mu0), cov).log_prob(logx) - logx.sum()
    ).item()
    atol = 1e-9 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(report.log_ratios, exact, rtol=0, atol=atol)
    assert report.log_evidence == pytest.approx(exact, abs=atol)
    s_sd = math.sqrt(math.expm1(1 / precision)) * math.exp(mean + 0.5 / precision)
    assert report.means["s"] == pytest.approx(
        math.exp(mean + 0.5 / precision), abs=MC_SE * s_sd / math.sqrt(num)
    )


def logistic_model(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[-1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(X * w).sum(-1)), obs=y)


@pytest.mark.slow
def test_full_rank_vi_matches_nuts_on_breast_cancer():
    """Logistic regression, 569 × (30 standardized features + intercept), prior N(0, 1).

    NUTS: 300 warmup + 300 draws (measured 10-15 s on 2 idle cores, min ESS ~220). Monte Carlo
    error of its means is ~1/√ESS ≈ 0.07 posterior sd, so the largest of 31 deviations is ~0.2 sd
    from NUTS alone. Tolerances: every |mean_VI − mean_NUTS| < 0.35 NUTS sd, on average < 0.1 sd
    (measured: max 0.15, average 0.04); VI sd / NUTS sd in [0.75, 1.3] (measured 0.88-1.14).
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = (data.data - data.data.mean(0)) / data.data.std(0)
    X = torch.tensor(np.hstack([np.ones((len(features), 1)), features]), dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)

    mcmc = MCMC(
        NUTS(logistic_model, jit_compile=True, ignore_jit_warnings=True),
        warmup_steps=300,
        num_samples=300,
        disable_progbar=True,
    )
    mcmc.run(X, y)
    nuts = mcmc.get_samples()["w"]
    nuts_mean, nuts_sd = nuts.mean(0).numpy(), nuts.std(0).numpy()

    guide = AutoMultivariateNormal(logistic_model)
    steps = 1500
    optim = pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(logistic_model, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True))
    fit(svi, X, y, num_steps=steps, progress=False, tol=None)
    idata = to_inference_data(logistic_model, guide, X, y, num_samples=2000)
    vi = idata.posterior["w"].values[0]
    deviation = np.abs(vi.mean(0) - nuts_mean) / nuts_sd
    assert deviation.max() < 0.35 and deviation.mean() < 0.1
    sd_ratio = vi.std(0) / nuts_sd
    assert (sd_ratio > 0.75).all() and (sd_ratio < 1.3).all()
    report = vi_diagnostics(logistic_model, guide, X, y, num_samples=2000)
    psis_deviation = np.abs(report.means["w"] - nuts_mean) / nuts_sd
    assert psis_deviation.max() < 0.35


def test_deterministic_in_a_plate_is_named_after_the_plate():
    """pyro.deterministic's default event_dim makes its value all event: its plate axis is still
    the plate's, so it lines up with its latent siblings (no silent (4, 4) broadcast); an axis
    whose size is not the plate's keeps ArviZ's default name."""

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.deterministic("twice_z", 2 * z)
            pyro.deterministic("spread", torch.stack([z.min(-1)[0], z.max(-1)[0]], -1))
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    y = torch.zeros(4, dtype=torch.float64)
    guide = AutoNormal(model)
    post = to_inference_data(model, guide, y, num_samples=10).posterior
    assert post["twice_z"].dims == post["z"].dims == ("chain", "draw", "data")
    np.testing.assert_allclose((post["twice_z"] - 2 * post["z"]).values, 0.0)
    assert post["spread"].dims == ("chain", "draw", "spread_dim_0")


def masked_normal_model(kind):
    """normal_model whose observations y_i with ~keep_i are masked out, three ways."""

    def model(y, keep):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(M0, dtype=y.dtype), S0))
        with pyro.plate("n", len(y)):
            if kind == "poutine.mask":
                with poutine.mask(mask=keep):
                    pyro.sample("y", dist.Normal(mu, SIGMA), obs=y)
            elif kind == "obs_mask":
                pyro.sample("y", dist.Normal(mu, SIGMA), obs=y, obs_mask=keep)
            else:
                pyro.sample("y", dist.Normal(mu, SIGMA).mask(keep), obs=y)

    return model


@pytest.mark.parametrize("kind", ["poutine.mask", "obs_mask", "Distribution.mask"])
def test_masked_observations_are_left_out_of_the_pointwise_log_likelihood(kind):
    """Masked entries (far outliers here) are not observations: log_likelihood, observed_data and
    posterior_predictive hold the unmasked ones only, labelled by their rows, and PSIS-LOO is the
    closed-form leave-one-out of the unmasked rows (tolerance as in the unmasked test). Counted,
    the two outliers took elpd to about -2e4."""
    y = normal_data(torch.float64)
    keep = torch.arange(len(y)) % 3 != 1
    y[~keep] = 100.0
    mean, sd = normal_posterior(y[keep])
    model = masked_normal_model(kind)

    def guide(y, keep):
        pyro.sample("mu", dist.Normal(torch.tensor(mean, dtype=y.dtype), sd))
        if kind == "obs_mask":  # the masked entries are latents there, imputed
            with pyro.plate("n", len(y)):
                pyro.sample("y_unobserved", dist.Normal(torch.zeros_like(y), 1.0))

    idata = to_inference_data(model, guide, y, keep, num_samples=4000)
    name = "y_observed" if kind == "obs_mask" else "y"
    rows = np.flatnonzero(keep.numpy())
    for group in ("log_likelihood", "posterior_predictive"):
        assert idata[group][name].dims == ("chain", "draw", f"{name}_unmasked")
        np.testing.assert_array_equal(idata[group][name][f"{name}_unmasked"].values, rows)
    np.testing.assert_array_equal(idata.observed_data[name].values, y[keep].numpy())
    mu = torch.as_tensor(idata.posterior["mu"].values[0])
    np.testing.assert_allclose(
        idata.log_likelihood[name].values[0],
        dist.Normal(mu[:, None], SIGMA).log_prob(y[keep]).numpy(),
        rtol=1e-12,
    )
    exact = 0.0
    for i in range(int(keep.sum())):
        m, s = normal_posterior(y[keep], skip=i)
        exact += dist.Normal(m, math.sqrt(SIGMA**2 + s**2)).log_prob(y[keep][i]).item()
    elpd, pareto_k = loo(idata)
    assert elpd == pytest.approx(exact, abs=0.2) and pareto_k.shape == (int(keep.sum()),)


def test_fully_masked_observation_is_left_out_and_a_mask_varying_over_draws_is_refused():
    y = normal_data(torch.float64)

    def guide(y, *args):
        pyro.sample("mu", dist.Normal(torch.tensor(1.0, dtype=y.dtype), 0.5))

    model = masked_normal_model("poutine.mask")
    idata = to_inference_data(
        model, guide, y, torch.zeros(len(y), dtype=torch.bool), num_samples=50
    )
    assert group_names(idata) == {"posterior", "constant_data"}

    def latent_mask(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(M0, dtype=y.dtype), S0))
        with pyro.plate("n", len(y)), poutine.mask(mask=y < mu):
            pyro.sample("y", dist.Normal(mu, SIGMA), obs=y)

    with pytest.raises(ValueError, match="site 'y': which of its entries are masked differs"):
        to_inference_data(latent_mask, guide, y, num_samples=50)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_log_likelihood_sums_out_a_latent_hidden_from_the_guide(dtype):
    """d_i is hidden from the guide: log_likelihood is log p(y_i | mu), d_i summed out, not
    log p(y_i | mu, d_i) at the d_i drawn from p(d_i | mu, y_i)."""
    y = torch.tensor(MIXTURE_Y, dtype=dtype)
    guide = AutoNormal(poutine.block(mixture_model, hide=["d"]))
    idata = to_inference_data(mixture_model, guide, y, num_samples=200)
    mu = torch.as_tensor(idata.posterior["mu"].values[0]).double()[:, None]
    y = y.double()
    expected = torch.logaddexp(
        math.log(P_D) + dist.Normal(mu + 2.0, 0.5).log_prob(y),
        math.log(1 - P_D) + dist.Normal(mu, 0.5).log_prob(y),
    )
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected, rtol=tol, atol=tol)


def shared_latent_model(y):
    """d_i is shared by y_i and w_i: log p(y_i | mu) is not y_i's part of log p(y, w | mu)."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    with pyro.plate("n", len(y)):
        d = pyro.sample("d", dist.Bernoulli(torch.tensor(P_D, dtype=y.dtype)))
        pyro.sample("y", dist.Normal(mu + 2.0 * d, 0.5), obs=y)
        pyro.sample("w", dist.Normal(d, 0.5), obs=y)


@pytest.mark.parametrize(
    "model, match",
    [(certain_model, r"site 'y' depends on 'd'"), (shared_latent_model, r"\(so does 'w'\)")],
    ids=["global", "shared"],
)
def test_pointwise_log_likelihood_of_a_hidden_latent_not_local_to_one_observation_is_refused(
    model, match
):
    """A hidden latent outside the observation's plate (global) or shared with another observation
    makes the y_i dependent given z: no pointwise log-likelihood. vi_diagnostics still runs."""
    y = normal_data(torch.float64)
    guide = AutoNormal(poutine.block(model, hide=["d"]))
    with pytest.raises(ValueError, match=match):
        to_inference_data(model, guide, y, num_samples=20)
    vi_diagnostics(model, guide, y, num_samples=20)


# k ~ Categorical(1/3), x_j ~ N(LOCS[k], 1): the posterior of k in closed form.
LOCS = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
CATEGORICAL_X = torch.tensor([1.5, 2.5, 1.8, 2.2], dtype=torch.float64)


def categorical_model(x):
    k = pyro.sample("k", dist.Categorical(torch.ones(3, dtype=x.dtype) / 3))
    with pyro.plate("obs", len(x)):
        pyro.sample("x", dist.Normal(LOCS[k], 1.0), obs=x)


def test_discrete_guide_has_bounded_weights():
    """A near-exact Categorical guide: the log ratios take 3 values, so the largest are tied and
    no Pareto tail can be fitted (0.x: k-hat = inf, 1.x: NaN, both read "unreliable" though the
    ESS is 99%). Over a finite support the weights are bounded: k-hat = -inf, and the weighted
    mean of k is the posterior's within 4 standard errors."""
    log_post = dist.Normal(LOCS[:, None], 1.0).log_prob(CATEGORICAL_X).sum(-1)
    post = (log_post - log_post.logsumexp(0)).exp()

    def guide(x):
        pyro.sample("k", dist.Categorical(torch.tensor([0.0092, 0.0074, 0.9834], dtype=x.dtype)))

    report = vi_diagnostics(categorical_model, guide, CATEGORICAL_X, num_samples=1000)
    assert report.pareto_k == -np.inf and report.verdict == "good"
    assert report.ess > 0.95 * report.num_samples
    mean = (post * torch.arange(3)).sum().item()
    sd = math.sqrt((post * (torch.arange(3) - mean) ** 2).sum().item())
    assert abs(report.means["k"] - mean) < MC_SE * sd / math.sqrt(report.ess)
    assert "bounded weights" in str(report)


def test_discrete_guide_on_an_infinite_support_with_tied_ratios_is_unreliable():
    """A Poisson guide's ratios tie as well, but a support without bound gives no bound on the
    weights: k-hat NaN, "unreliable", and the message says why."""

    def model(x):
        k = pyro.sample("k", dist.Poisson(torch.tensor(1.0, dtype=x.dtype)))
        with pyro.plate("obs", len(x)):
            pyro.sample("x", dist.Normal(k, 1.0), obs=x)

    def guide(x):
        pyro.sample("k", dist.Poisson(torch.tensor(0.05, dtype=x.dtype)))

    report = vi_diagnostics(model, guide, CATEGORICAL_X, num_samples=1000)
    assert np.isnan(report.pareto_k) and report.verdict == "unreliable"
    assert "support is infinite" in str(report)


def test_subsampled_plate_is_refused():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(M0, dtype=y.dtype), S0))
        with pyro.plate("n", len(y), subsample_size=4) as rows:
            pyro.sample("y", dist.Normal(mu, SIGMA), obs=y[rows])

    y = normal_data(torch.float64)
    guide = exact_custom_guide(y)
    for function in (vi_diagnostics, to_inference_data):
        with pytest.raises(ValueError, match="plate 'n' subsamples 4 of its 12 entries"):
            function(model, guide, y, num_samples=20)


def test_fallback_warning_says_why_the_vectorized_pass_failed():
    """Pyro's packing error: its first line names the site, the next ones say what is wrong."""

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(M0, dtype=y.dtype), S0))
        with pyro.plate("n", len(y)):  # mu[..., None] adds a dim left of the plates when batched
            pyro.sample("y", dist.Normal(mu[..., None], SIGMA), obs=y)

    y = normal_data(torch.float64)
    with pytest.warns(UserWarning, match="one at a time") as record:
        to_inference_data(model, exact_custom_guide(y), y, num_samples=5)
    message = str(record[0].message)
    assert "at site 'y': Invalid tensor shape. Allowed dims:" in message
    assert "Trace Shapes" not in message
