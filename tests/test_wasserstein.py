"""WassersteinGradient: the Bures–Wasserstein step checked by hand, convergence to the exact
posterior (full covariance) and the mean-field optimum (diagonal), the seed's narrow-vs-far
situation, positive definiteness under wild steps, Gaussian VI as a Bures–Wasserstein flow, and
the optimizer contract (state, refusals, options)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal
from torch.distributions import kl_divergence

from pyro_natgrad import NaturalGradient, StepRefusedWarning, WassersteinGradient, record_args
from pyro_natgrad.wasserstein import bures_step, gaussian_vi_flow

from .conjugate import linear_regression, regression_loss, regression_model

DTYPES = (torch.float32, torch.float64)
NOISE = 1.0  # a better-conditioned regression than the natural-gradient tests use: the W₂ step
# is not affine invariant, its convergence rate is the condition number of the posterior precision


def _data(dtype=torch.float64):
    return linear_regression(dtype, n=10, noise=NOISE)


def _model():
    return regression_model(NOISE)


def _loss(moments):
    return regression_loss(moments, NOISE)


def _mvn_guide(d, dtype):
    def guide(X, y):
        loc = pyro.param("loc", torch.zeros(d, dtype=dtype))
        tril = pyro.param("tril", torch.eye(d, dtype=dtype), constraints.lower_cholesky)
        pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=tril))
    return record_args(guide)


def _diag_guide(d, dtype):
    def guide(X, y):
        loc = pyro.param("loc", torch.zeros(d, dtype=dtype))
        scale = pyro.param("scale", torch.ones(d, dtype=dtype), constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))
    return record_args(guide)


def _mvn_moments():
    tril = pyro.param("tril")
    return pyro.param("loc"), tril @ tril.T


def _diag_moments():
    return pyro.param("loc"), torch.diag(pyro.param("scale") ** 2)


def test_one_step_is_the_bures_wasserstein_update_computed_by_hand():
    """m' = m − h∇ₘL, Σ' = (I − hM)Σ(I − hM), M = 2∇_ΣL, with ∇ taken here by autograd of the
    closed-form loss in (m, Σ) directly, independently of the optimizer's pullback."""
    X, y, _, _ = _data()
    guide = _mvn_guide(3, torch.float64)
    guide(X, y)
    with torch.no_grad():
        pyro.param("loc").unconstrained().copy_(torch.tensor([0.3, -0.2, 0.1]))
    loss = _loss(_mvn_moments)
    m0, cov0 = (t.detach().clone().requires_grad_() for t in _mvn_moments())
    gm, gcov = torch.autograd.grad(_loss_at(m0, cov0, X, y), (m0, cov0))
    h = 1e-3
    eye = torch.eye(3, dtype=torch.float64)
    a = eye - h * (gcov + gcov.T)
    expected_m, expected_cov = m0 - h * gm, a @ cov0 @ a.T
    opt = WassersteinGradient(guide, lr=h, adaptive=False)
    SVI(_model(), guide, opt, loss).step(X, y)
    m1, cov1 = _mvn_moments()
    torch.testing.assert_close(m1.detach(), expected_m.detach())
    torch.testing.assert_close(cov1.detach(), expected_cov.detach())
    assert opt.last_step["w"]["method"] == "bures"


def _loss_at(m, cov, X, y):
    """The closed-form regression loss at given (m, Σ) (the moments callable replaced)."""
    return _loss(lambda: (m, cov))(None, None, X, y)


def test_bures_step_matches_the_euclidean_step_in_mean_and_scale_in_one_dimension():
    """For N(m, σ²) the W₂ metric is Euclidean in (m, σ): σ' = σ − h ∂L/∂σ to first order."""
    m, s, gm, gs, h = 0.4, 1.3, 0.7, -0.9, 1e-3
    cov = torch.tensor([[s * s]], dtype=torch.float64)
    grad_cov = torch.tensor([[gs / (2 * s)]], dtype=torch.float64)  # ∂L/∂σ² = ∂L/∂σ / 2σ
    new_m, new_cov = bures_step(torch.tensor([m], dtype=torch.float64), cov,
                                torch.tensor([gm], dtype=torch.float64), grad_cov, h)
    assert float(new_m) == pytest.approx(m - h * gm)
    assert float(new_cov.sqrt()) == pytest.approx(s - h * gs, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_covariance_converges_to_exact_posterior(dtype):
    X, y, mean, cov = _data(dtype)
    guide = _mvn_guide(3, dtype)
    guide(X, y)
    opt = WassersteinGradient(guide, lr=1e-2)
    svi = SVI(_model(), guide, opt, _loss(_mvn_moments))
    for _ in range(500):
        svi.step(X, y)
    m, c = _mvn_moments()
    tol = {torch.float32: 1e-3, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(m.detach(), mean, rtol=tol, atol=tol)
    torch.testing.assert_close(c.detach(), cov, rtol=tol, atol=tol)


def test_diagonal_guide_converges_to_mean_field_optimum():
    """Mean-field optimum of N(m, Λ⁻¹): mean m, variances 1/diag(Λ)."""
    X, y, mean, cov = _data()
    guide = _diag_guide(3, torch.float64)
    guide(X, y)
    svi = SVI(_model(), guide, WassersteinGradient(guide, lr=1e-2),
              _loss(_diag_moments))
    for _ in range(500):
        svi.step(X, y)
    torch.testing.assert_close(pyro.param("loc").detach(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pyro.param("scale").detach() ** 2,
                               1 / torch.linalg.inv(cov).diagonal(), rtol=1e-6, atol=1e-6)


def test_autoguides_fit_with_trace_elbo():
    X, y, mean, cov = _data()
    sd = cov.diagonal().sqrt()
    for make in (AutoMultivariateNormal, AutoDiagonalNormal):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make(_model())
        opt = WassersteinGradient(guide, lr=1e-2)
        svi = SVI(_model(), guide, opt,
                  Trace_ELBO(num_particles=32, vectorize_particles=True))
        for _ in range(400):
            svi.step(X, y)
        assert opt.last_step["_AutoMultivariateNormal_latent" if make is AutoMultivariateNormal
                             else "_AutoDiagonalNormal_latent"]["method"] in ("bures", "undone")
        error = ((guide.loc.detach() - mean) / sd).abs().max()
        assert error < 0.5, f"{make.__name__}: max |Δmean|/sd = {float(error):.3f}"


def _narrow_far(optim_factory, steps):
    """q = N(0, 0.1²) fitted to p = N(5, 0.5²) by the exact KL(q ‖ p); returns q's mean path."""
    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0, dtype=torch.float64)),
                                     pyro.param("scale", torch.tensor(0.1, dtype=torch.float64),
                                                constraints.positive)))
    guide = record_args(guide)

    def loss(model, guide_):
        q = dist.Normal(pyro.param("loc"), pyro.param("scale"))
        return kl_divergence(q, dist.Normal(torch.tensor(5.0, dtype=torch.float64), 0.5))

    guide()
    opt = optim_factory(guide)
    svi = SVI(lambda: None, guide, opt, loss)
    path = []
    for _ in range(steps):
        svi.step()
        path.append(float(pyro.param("loc")))
    return path


def test_wasserstein_moves_a_narrow_far_guide_where_the_fisher_step_stalls():
    """The Fisher metric scales the mean's step by q's variance σ² = 0.01, so from N(0, 0.1²) the
    natural step toward N(5, 0.5²) crawls; the W₂ step moves the mean by h∇ₘL whatever σ is.
    Same nominal step size 0.1, no adaptation, exact gradients."""
    natural = _narrow_far(lambda g: NaturalGradient(g, lr=0.1, adaptive=False), 20)
    wasserstein = _narrow_far(lambda g: WassersteinGradient(g, lr=0.1, adaptive=False), 20)
    # W₂ on the mean: m ← m − 0.1 (m − 5)/0.25, a contraction by 0.6 per step toward 5
    assert abs(wasserstein[-1] - 5) < 1e-3
    assert all(b >= a for a, b in zip(wasserstein, wasserstein[1:], strict=False))
    assert natural[0] < 0.05 and natural[-1] < 3.0  # the Fisher step is still far after 20


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lr=st.floats(1e-3, 10.0), noise=st.floats(0.0, 1e3))
def test_positive_definite_under_large_steps_and_noisy_gradients(seed, lr, noise):
    pyro.clear_param_store()
    X, y, _, _ = _data()
    guide = _mvn_guide(3, torch.float64)
    guide(X, y)
    g = torch.Generator().manual_seed(seed)

    def noisy_loss(model, guide_, X, y):
        m, c = _mvn_moments()
        return _loss(_mvn_moments)(model, guide_, X, y) + noise * (
            torch.randn(3, generator=g, dtype=torch.float64) @ m
            + (torch.randn(3, 3, generator=g, dtype=torch.float64) * c).sum())

    svi = SVI(_model(), guide, WassersteinGradient(guide, lr=lr), noisy_loss)
    for _ in range(5):
        svi.step(X, y)
    tril = pyro.param("tril").detach()
    assert torch.isfinite(tril).all()
    assert bool((tril.diagonal() > 0).all())
    assert torch.linalg.cholesky_ex(tril @ tril.T).info == 0


@pytest.mark.parametrize("hessian", ["exact", "stein"])
def test_gaussian_vi_flow_finds_a_gaussian_target(hessian):
    """For p = N(a, B) the flow's fixed point is q = p (Lambert et al. 2022)."""
    a = torch.tensor([1.0, -2.0], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    target = dist.MultivariateNormal(a, b)
    g = torch.Generator().manual_seed(0)
    loc, cov = gaussian_vi_flow(target.log_prob, torch.zeros(2, dtype=torch.float64),
                                torch.eye(2, dtype=torch.float64), h=0.1, num_steps=300,
                                num_samples=256, hessian=hessian, generator=g)
    torch.testing.assert_close(loc, a, atol=0.05, rtol=0)
    torch.testing.assert_close(cov, b, atol=0.1, rtol=0)


def test_pushforward_metric_for_a_student_t_guide():
    """Non-Gaussian sites use the pushforward metric E[JᵀJ] and still fit."""
    x = torch.tensor([4.8, 5.1, 5.3, 4.9, 5.0], dtype=torch.float64)

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 10.0))
        with pyro.plate("n", len(x)):
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0, dtype=x.dtype))
        scale = pyro.param("scale", torch.tensor(1.0, dtype=x.dtype), constraints.positive)
        pyro.sample("z", dist.StudentT(torch.tensor(30.0, dtype=x.dtype), loc, scale))

    guide = record_args(guide)
    pyro.set_rng_seed(0)
    opt = WassersteinGradient(guide, lr=0.02)
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=32, vectorize_particles=True))
    for _ in range(300):
        svi.step(x)
    assert opt.last_step["z"]["method"] in ("pushforward", "undone")
    assert "pushforward" in opt.summary()
    assert abs(float(pyro.param("loc")) - float(x.mean())) < 0.1


def test_state_round_trip_and_refusal(tmp_path):
    X, y, _, _ = _data()
    guide = _mvn_guide(3, torch.float64)
    guide(X, y)
    opt = WassersteinGradient(guide, lr=1e-3)
    svi = SVI(_model(), guide, opt, _loss(_mvn_moments))
    for _ in range(5):
        svi.step(X, y)
    opt.save(tmp_path / "w.pt")
    resumed = WassersteinGradient(guide, lr=1e-3)
    resumed.load(tmp_path / "w.pt")
    assert resumed.schedule == opt.schedule and resumed.num_steps == opt.num_steps
    for kind in ("theta", "grad"):
        for name, value in opt._pending[kind].items():
            assert torch.equal(resumed._pending[kind][name], value)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    def nan_loss(model, guide_, X, y):
        return pyro.param("loc").sum() * torch.tensor(float("nan"))

    with pytest.warns(StepRefusedWarning, match="non-finite gradient"):
        SVI(_model(), guide, WassersteinGradient(guide), nan_loss).step(X, y)
    for k, v in pyro.get_param_store().items():
        torch.testing.assert_close(v.detach(), before[k])


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"metric": "fisher"}, {"form": "qr"},
                                    {"damping": -1.0}, {"num_samples": 0}])
def test_bad_options_are_rejected(kwargs):
    guide = _mvn_guide(3, torch.float64)
    with pytest.raises(ValueError):
        WassersteinGradient(guide, **kwargs)
