"""GPflow's natural-gradient tests for ``pyro.contrib.gp``.

Translated from GPflow's ``tests/gpflow/optimizers/test_natural_gradient.py`` (VGP vs GPR, SVGP vs
SGPR, the small-q_sqrt start of GPflow issue #767) and ``test_natgrad_and_adam.py`` (natural steps
on q, Adam on the rest, one optimizer): with a Gaussian likelihood scored by its exact expected
log-likelihood, fixed hyperparameters and the analytic KL of ``TraceMeanField_ELBO`` (exact
gradients), one natural step of size 1 lands on the optimal q, whose closed form is computed here
independently: the exact GP posterior for ``VariationalGP``, Titsias's (2009) optimal q(u) and
collapsed bound for ``VariationalSparseGP`` (Hensman, Fusi & Lawrence 2013, eq. 7).

Fixed hyperparameters are buffers (:func:`pyro_natgrad.gp.freeze`): a fixed value is not a
param, so SVI never sees it (as GPflow's ``set_trainable(model, False)``).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.contrib.gp as gp
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from pyro_natgrad import NaturalGradient
from pyro_natgrad.gp import ExpectedBernoulli, ExpectedGaussian, freeze

NOISE = 0.1  # GPflow's Setup.likelihood_variance
ATOL = 1e-4  # GPflow's tolerance
# the natural step alone, without the trust region and the step-size policy
NO_SAFEGUARDS = {"trust_region": None, "step_size": None, "stationarity": None}
OPTIONS = {"defaults": {}, "no_safeguards": NO_SAFEGUARDS}


def gpflow_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPflow's Setup: N, M, D = 4, 3, 2 from RandomState(42): X, y, inducing inputs Z."""
    rng = np.random.RandomState(42)
    X, Y, Z = rng.randn(4, 2), rng.randn(4, 1), rng.randn(3, 2)
    return X, Y[:, 0], Z


def sine_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """50 noisy points of sin(x) on [0, 10] (lengthscale 1: Kff's condition number ~1e7 with
    contrib.gp's jitter 1e-6), 10 evenly spaced inducing inputs."""
    rng = np.random.RandomState(0)
    X = np.sort(rng.uniform(0, 10, size=(50, 1)), axis=0)
    return X, np.sin(X[:, 0]) + 0.3 * rng.randn(50), np.linspace(0, 10, 10)[:, None]


DATA = {"gpflow": gpflow_data, "sine50": sine_data}


def rbf(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """k(a, b) = exp(−|a − b|² / 2), the unit squared-exponential kernel, written out."""
    return torch.exp(-0.5 * torch.cdist(A, B) ** 2)


def build(kind: str, data: str, whiten: bool, dtype: torch.dtype, start: str = "default",
          fixed: bool = True) -> gp.models.GPModel:
    """A unit RBF kernel, noise variance 0.1; ``start``: contrib.gp's q = N(0, I) or GPflow's
    #767 start, a random mean and scale_tril = 1e-3·I."""
    pyro.clear_param_store()
    X, y, Z = (torch.tensor(a, dtype=dtype) for a in DATA[data]())
    kernel = gp.kernels.RBF(X.shape[1], variance=torch.tensor(1.0, dtype=dtype),
                            lengthscale=torch.tensor(1.0, dtype=dtype))
    likelihood = ExpectedGaussian(torch.tensor(NOISE, dtype=dtype))
    if kind == "vgp":
        model = gp.models.VariationalGP(X, y, kernel, likelihood, whiten=whiten)
    else:
        model = gp.models.VariationalSparseGP(X, y, kernel, Z, likelihood, whiten=whiten)
    if fixed:
        freeze(kernel, "variance", "lengthscale")
        freeze(likelihood, "variance")
        if kind == "svgp":
            freeze(model, "Xu")
    if start == "small":
        loc = _q_loc(model)
        g = torch.Generator().manual_seed(767)
        with torch.no_grad():
            loc.copy_(torch.randn(loc.shape, generator=g, dtype=dtype))
        setattr(model, "u_scale_tril" if kind == "svgp" else "f_scale_tril",
                1e-3 * torch.eye(loc.shape[-1], dtype=dtype))
    return model


def _q_loc(model: gp.models.GPModel) -> torch.nn.Parameter:
    return model.u_loc if isinstance(model, gp.models.VariationalSparseGP) else model.f_loc


def q_moments(model: gp.models.GPModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the guide's q (of u, or of f for VGP; whitened when whiten)."""
    sparse = isinstance(model, gp.models.VariationalSparseGP)
    tril = (model.u_scale_tril if sparse else model.f_scale_tril).detach()
    return _q_loc(model).detach(), tril @ tril.mT


def optimum(model: gp.models.GPModel) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The optimal q's mean and covariance and the ELBO there, in float64, from the model's data
    and its (fixed, unit) hyperparameters; Kuu or Kff carry contrib.gp's jitter, as in the model.

    VGP: the GP posterior, m = K(K + σ²I)⁻¹y, S = K − K(K + σ²I)⁻¹K, ELBO = log N(y | 0, K + σ²I).
    SVGP: Σ = (Kuu + σ⁻²KufKfu)⁻¹, m = σ⁻²KuuΣKuf y, S = KuuΣKuu, ELBO = log N(y | 0, Qff + σ²I)
    − tr(Kff − Qff)/(2σ²), Qff = Kfu Kuu⁻¹ Kuf. Whitened: q of v = L⁻¹u, L = chol(Kuu)."""
    X, y = model.X.double(), model.y.double()
    n, s2 = len(X), NOISE
    if isinstance(model, gp.models.VariationalSparseGP):
        Z = model.Xu.detach().double()
        Kuu = rbf(Z, Z) + model.jitter * torch.eye(len(Z), dtype=torch.float64)
        Kuf = rbf(Z, X)
        Sigma = torch.linalg.inv(Kuu + Kuf @ Kuf.T / s2)
        mean, cov = Kuu @ Sigma @ Kuf @ y / s2, Kuu @ Sigma @ Kuu
        Qff = Kuf.T @ torch.linalg.solve(Kuu, Kuf)
        elbo = (_log_normal(y, Qff + s2 * torch.eye(n, dtype=torch.float64))
                - float((1.0 - Qff.diagonal()).sum()) / (2 * s2))
        L = torch.linalg.cholesky(Kuu)
    else:
        K = rbf(X, X) + model.jitter * torch.eye(n, dtype=torch.float64)
        A = K + s2 * torch.eye(n, dtype=torch.float64)
        mean, cov = K @ torch.linalg.solve(A, y), K - K @ torch.linalg.solve(A, K)
        elbo = _log_normal(y, A)
        L = torch.linalg.cholesky(K)
    if model.whiten:
        mean = torch.linalg.solve_triangular(L, mean[:, None], upper=False)[:, 0]
        L_inv = torch.linalg.solve_triangular(L, torch.eye(len(L), dtype=torch.float64),
                                              upper=False)
        cov = L_inv @ cov @ L_inv.T
    return mean, cov, elbo


def _log_normal(y: torch.Tensor, cov: torch.Tensor) -> float:
    return float(torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y))


def neg_elbo(model: gp.models.GPModel) -> float:
    """−ELBO, exact (analytic KL, exact expected log-likelihood)."""
    with torch.no_grad():
        return TraceMeanField_ELBO().loss(model.model, model.guide)


def one_step_errors(model: gp.models.GPModel, **options) -> dict[str, float]:
    """max |Δ| of q's mean and covariance and |Δ ELBO| after one ``svi.step`` of
    ``NaturalGradient(guide, lr=1.0, **options)``, against :func:`optimum`."""
    mean, cov, elbo = optimum(model)
    svi = SVI(model.model, model.guide, NaturalGradient(model.guide, lr=1.0, **options),
              TraceMeanField_ELBO())
    assert abs(neg_elbo(model) + elbo) > 1e-2  # GPflow's assert_different: not there already
    svi.step()
    assert {n.split(".")[-1] for n in pyro.get_param_store()} <= {  # only q was a param
        "u_loc", "u_scale_tril", "f_loc", "f_scale_tril"}
    loc, scale = q_moments(model)
    return {"mean": float((loc.double() - mean).abs().max()),
            "cov": float((scale.double() - cov).abs().max()),
            "elbo": abs(neg_elbo(model) + elbo)}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("start", ["default", "small"])
@pytest.mark.parametrize("whiten", [False, True], ids=["plain", "whiten"])
@pytest.mark.parametrize("kind", ["vgp", "svgp"])
@pytest.mark.parametrize("data", DATA)
def test_one_natural_step_is_exact(data, kind, whiten, start, option):
    """``NaturalGradient(guide, lr=1.0)`` (defaults, and the bare natural step): one step from
    contrib.gp's N(0, I) or from GPflow's small q_sqrt lands on the optimal q to 1e-4."""
    model = build(kind, data, whiten, torch.float64, start)
    errors = one_step_errors(model, **OPTIONS[option])
    assert max(errors.values()) < ATOL, errors


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("whiten", [False, True], ids=["plain", "whiten"])
@pytest.mark.parametrize("kind", ["vgp", "svgp"])
def test_one_natural_step_is_exact_float32(kind, whiten, option):
    """float32 on GPflow's data from contrib.gp's start, to 1e-3 (from the 1e-3·I start the
    natural parameter −½Λ = −5e5·I leaves float32 about 0.03 in absolute precision)."""
    model = build(kind, "gpflow", whiten, torch.float32)
    errors = one_step_errors(model, **OPTIONS[option])
    assert max(errors.values()) < 1e-3, errors


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("whiten", [False, True], ids=["plain", "whiten"])
@pytest.mark.parametrize("kind", ["vgp", "svgp"])
def test_natural_steps_and_adam_in_one_optimizer(kind, whiten, option):
    """GPflow's ``JointNaturalGradientAndAdam`` as one ``NaturalGradient``: in one step q lands on
    the optimum for the hyperparameters it was computed at, while the kernel's and likelihood's
    params (and the inducing inputs) take exactly the step of ``torch.optim.Adam`` on the same
    gradient (base_args lr 0.1)."""
    model = build(kind, "gpflow", whiten, torch.float64, fixed=False)
    mean, cov, _ = optimum(model)  # the hyperparameters still have the unit values
    loss = TraceMeanField_ELBO().differentiable_loss(model.model, model.guide)
    others = {n: p for n, p in model.named_parameters() if not n.startswith(("u_", "f_"))}
    assert len(others) == 3 + (kind == "svgp")  # kernel variance and lengthscale, noise, (Xu)
    expected = {n: p.detach().clone().requires_grad_() for n, p in others.items()}
    for e, g in zip(expected.values(), torch.autograd.grad(loss, list(others.values())),
                    strict=True):
        e.grad = g
    torch.optim.Adam(expected.values(), lr=0.1).step()
    optim = NaturalGradient(model.guide, lr=1.0, base_args={"lr": 0.1}, **OPTIONS[option])
    SVI(model.model, model.guide, optim, TraceMeanField_ELBO()).step()
    loc, scale = q_moments(model)
    assert float((loc - mean).abs().max()) < ATOL
    assert float((scale - cov).abs().max()) < ATOL
    after = dict(model.named_parameters())
    for name, e in expected.items():
        torch.testing.assert_close(after[name].detach(), e.detach(), rtol=0, atol=1e-12)


def test_expected_gaussian_is_the_expected_log_likelihood():
    """ExpectedGaussian scores E_q[log N(y | f, σ²)] (checked by Monte Carlo over f ~ q), which
    contrib.gp's Gaussian, log N(y | m, v + σ²), is not (it is larger, by Jensen)."""
    g = torch.Generator().manual_seed(0)
    m, v = torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, dtype=torch.float64,
                                                                        generator=g) + 0.5
    y, s2 = torch.randn(5, generator=g, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    f = m + v.sqrt() * torch.randn(400_000, 5, generator=g, dtype=torch.float64)
    terms = torch.distributions.Normal(f, s2.sqrt()).log_prob(y).sum(-1)
    mc, se = float(terms.mean()), float(terms.std() / math.sqrt(len(terms)))
    ours = _likelihood_score(ExpectedGaussian(s2), m, v, y)
    theirs = _likelihood_score(gp.likelihoods.Gaussian(s2), m, v, y)
    assert abs(ours - mc) < 4 * se, (ours, mc, se)
    closed = float(torch.distributions.Normal(m, s2.sqrt()).log_prob(y).sum()
                   - (v / (2 * s2)).sum())
    assert ours == pytest.approx(closed, abs=1e-12)
    assert theirs - mc > 100 * se  # the predictive density is not the ELBO's term


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expected_bernoulli_quadrature_and_monte_carlo(dtype):
    """ExpectedBernoulli: Gauss–Hermite (20 points) equals E_q[log Bernoulli(y | sigmoid(f))]
    from 400,000 draws of f within 4 standard errors; its Monte Carlo form is unbiased."""
    g = torch.Generator().manual_seed(1)
    m, v = 2 * torch.randn(6, generator=g, dtype=dtype), 3 * torch.rand(6, dtype=dtype, generator=g)
    y = (torch.rand(6, generator=g) < 0.5).to(dtype)
    f = m + v.sqrt() * torch.randn(400_000, 6, generator=g, dtype=dtype)
    terms = torch.distributions.Bernoulli(logits=f).log_prob(y).sum(-1).double()
    mc, se = float(terms.mean()), float(terms.std() / math.sqrt(len(terms)))
    quadrature = _likelihood_score(ExpectedBernoulli(), m, v, y)
    assert abs(quadrature - mc) < 4 * se + 1e-5, (quadrature, mc, se)
    pyro.set_rng_seed(2)
    draws = torch.tensor([_likelihood_score(ExpectedBernoulli(num_samples=8), m, v, y)
                          for _ in range(2000)], dtype=torch.float64)
    assert abs(float(draws.mean()) - quadrature) < 4 * float(draws.std()) / math.sqrt(2000)


def test_expected_bernoulli_rejects_bad_counts_and_reads_integer_labels():
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        ExpectedBernoulli(num_samples=0)
    with pytest.raises(ValueError, match="num_points"):
        ExpectedBernoulli(num_points=2.5)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got True"):
        ExpectedBernoulli(num_samples=True)
    m, v = torch.tensor([0.3, -1.0]), torch.tensor([0.5, 0.2])
    labels = torch.tensor([1, 0])
    assert _likelihood_score(ExpectedBernoulli(), m, v, labels) == pytest.approx(
        _likelihood_score(ExpectedBernoulli(), m, v, labels.float()))


def test_expected_gaussian_takes_a_number_and_rejects_a_variance_that_is_not_positive():
    assert float(ExpectedGaussian(0.05).variance) == pytest.approx(0.05)
    for bad in (torch.tensor(-1.0), 0.0, math.nan):
        with pytest.raises(ValueError, match="ExpectedGaussian: variance must be finite and > 0"):
            ExpectedGaussian(bad)


def test_freeze_names_a_missing_attribute():
    with pytest.raises(ValueError, match="RBF has no tensor attribute 'lengthscales'"):
        freeze(gp.kernels.RBF(1), "lengthscales")


def test_likelihood_names_the_site_on_shape_mismatch():
    with pytest.raises(ValueError, match="likelihood site 'y'.*y of shape \\(4,\\)"):
        _likelihood_score(ExpectedGaussian(), torch.zeros(3), torch.ones(3), torch.zeros(4))


def _likelihood_score(likelihood, m, v, y) -> float:
    """The log-density a likelihood adds to the model trace at (m, v, y)."""
    trace = pyro.poutine.trace(likelihood).get_trace(m, v, y)
    return float(trace.log_prob_sum().detach())
