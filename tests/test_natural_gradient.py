"""NaturalGradient through plain pyro.infer.SVI: exactness, invariance, safety, state."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_natgrad import NaturalGradient, StepRefusedWarning, WassersteinGradient, record_args
from pyro_natgrad.optim import FisherSolve, KLAim, KLTrustRegion, Mirror, Retraction

from .conjugate import (
    CONJUGATE_CASES,
    CONJUGATE_SCALARS,
    linear_regression,
    normal_means,
    regression_loss,
    regression_model,
)

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("case", CONJUGATE_CASES, ids=lambda c: c.__name__)
def test_one_step_lands_on_exact_conjugate_posterior(case):
    c = case(torch.float64)
    guide = record_args(c.guide)
    opt = NaturalGradient(guide, lr=1.0)
    svi = SVI(c.model, guide, opt, c.loss)
    guide(*c.data)
    svi.step(*c.data)
    assert opt.last_step and all(v["method"] == "natural" for v in opt.last_step.values())
    for name, value in c.exact.items():
        torch.testing.assert_close(pyro.param(name).detach(), value, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CONJUGATE_CASES, ids=lambda c: c.__name__)
def test_the_steps_after_an_exact_one_stay_on_the_posterior(case):
    """At the defaults, with exact gradients: the steps after the exact one move q by rounding
    alone (the heavy ball's momentum on a Normal mean carried it 11–14 posterior sds past the
    optimum at step 2, its restart test deciding on a gradient that is zero to rounding), and
    are not judged, so the step size holds (half were rejected at random, halving it)."""
    c = case(torch.float64)
    guide = record_args(c.guide)
    opt = NaturalGradient(guide, lr=1.0)
    svi = SVI(c.model, guide, opt, c.loss)
    guide(*c.data)
    for _ in range(6):
        svi.step(*c.data)
        for name, value in c.exact.items():
            torch.testing.assert_close(pyro.param(name).detach(), value, rtol=1e-6, atol=1e-8)
    assert opt.step_size.rate == 1.0


@pytest.mark.parametrize("particles", [None, 20_000], ids=["exact", "mc"])
def test_momentum_does_not_carry_a_conjugate_mean_past_its_posterior(particles):
    """At the defaults (lr 0.5, the heavy ball on factorized means): five Normal means, each
    step of the natural gradient is Newton's at rate ½, so step 1 stops 0.7 posterior sd short.
    The heavy ball's shift at step 2 carried the mean 12 posterior sds past the posterior
    (exact gradients and 20,000 particles alike), and step 3 undid it; held to where the
    secant model's loss along the last move is back at its start, q's mean is never farther
    from the posterior than after step 1, and no step is undone."""
    c = normal_means(torch.float64)
    guide = record_args(c.guide)
    opt = NaturalGradient(guide)
    loss = c.loss if particles is None else Trace_ELBO(num_particles=particles,
                                                       vectorize_particles=True)
    svi = SVI(c.model, guide, opt, loss)
    pyro.set_rng_seed(0)
    guide(*c.data)
    sd = c.exact["scale"]
    offs = []
    for step in range(8):
        svi.step(*c.data)
        assert opt.last_step["mu"]["method"] == "natural", (step, opt.last_step)
        offs.append(float(((pyro.param("loc").detach() - c.exact["loc"]) / sd).abs().max()))
    assert max(offs[1:]) <= offs[0] * (1 + 1e-6) + (0 if particles is None else 0.1), offs
    assert offs[-1] < (0.02 if particles is None else 0.1), offs


def _guide_mean(c):
    trace = pyro.poutine.trace(c.guide).get_trace(*c.data)
    (site,) = [n for n in trace.nodes.values() if n["type"] == "sample"]
    return site["fn"].mean.detach(), site["fn"].stddev.detach()


@pytest.mark.parametrize("case", CONJUGATE_SCALARS, ids=lambda c: c.__name__)
def test_monte_carlo_gradients_converge_to_conjugate_posterior(case):
    c = case(torch.float64)
    guide = record_args(c.guide)
    svi = SVI(c.model, guide, NaturalGradient(guide, lr=0.5),
              Trace_ELBO(num_particles=64, vectorize_particles=True))
    for _ in range(100):
        svi.step(*c.data)
    fitted_mean, _ = _guide_mean(c)
    for name, value in c.exact.items():
        pyro.get_param_store()[name] = value
    exact_mean, exact_sd = _guide_mean(c)
    # Within 0.25 posterior sd: the stationary Monte Carlo error of 64-particle steps is ~0.1 sd.
    assert ((fitted_mean - exact_mean).abs() / exact_sd).max() < 0.25


def _mvn_guide(d, dtype):
    def guide(X, y):
        loc = pyro.param("loc", torch.zeros(d, dtype=dtype))
        tril = pyro.param("tril", torch.eye(d, dtype=dtype), constraints.lower_cholesky)
        pyro.sample("w", dist.MultivariateNormal(loc, scale_tril=tril))
    return record_args(guide)


def _mvn_moments():
    tril = pyro.param("tril")
    return pyro.param("loc"), tril @ tril.T


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_step_exact_gaussian_regression_full_covariance(dtype):
    X, y, mean, cov = linear_regression(dtype)
    guide = _mvn_guide(X.shape[1], dtype)
    opt = NaturalGradient(guide, lr=1.0)
    svi = SVI(regression_model(), guide, opt, regression_loss(_mvn_moments))
    guide(X, y)
    svi.step(X, y)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    fitted_mean, fitted_cov = _mvn_moments()
    torch.testing.assert_close(fitted_mean.detach(), mean, **tol)
    torch.testing.assert_close(fitted_cov.detach(), cov, **tol)


@pytest.mark.parametrize("form", ["covariance_matrix", "precision_matrix"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_step_exact_with_a_covariance_or_precision_param(form, dtype):
    """``MultivariateNormal(loc, covariance_matrix=C)`` (or ``precision_matrix=P``) with C a
    ``positive_definite`` param started at I: the reader takes scale_tril as chol(C) (or torch's
    factor of P⁻¹), identified by value and derivative (at C = I the value alone is that of a
    scale_tril param: chol(I) = I, and the step was written into C as if C were the factor: a
    non-symmetric "covariance", the fit 6.6 posterior sds off after 30 steps at 256 particles,
    a LinAlgError at 16), and the step lands on the exact posterior at lr 1."""
    X, y, mean, cov = linear_regression(dtype)
    d = X.shape[1]

    def guide(X, y):
        loc = pyro.param("loc", torch.zeros(d, dtype=dtype))
        matrix = pyro.param("matrix", torch.eye(d, dtype=dtype), constraints.positive_definite)
        pyro.sample("w", dist.MultivariateNormal(loc, **{form: matrix}))
    guide = record_args(guide)

    def moments():
        matrix = pyro.param("matrix")
        return pyro.param("loc"), matrix if form == "covariance_matrix" else torch.linalg.inv(
            matrix)

    opt = NaturalGradient(guide, lr=1.0)
    svi = SVI(regression_model(), guide, opt, regression_loss(moments))
    guide(X, y)
    svi.step(X, y)
    (site,) = [s for g in opt._groups for s in g.sites]
    assert type(site.parameterization).__name__ == "CholeskyOf"
    assert site.parameterization.precision == (form == "precision_matrix")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    fitted_mean, fitted_cov = moments()
    torch.testing.assert_close(fitted_mean.detach(), mean, **tol)
    torch.testing.assert_close(fitted_cov.detach(), cov, **tol)


def test_auto_multivariate_normal_one_step_exact():
    X, y, mean, cov = linear_regression(torch.float64)
    guide = AutoMultivariateNormal(regression_model())
    guide(X, y)
    name = guide._pyro_get_fullname

    def moments():
        tril = pyro.param(name("scale"))[..., None] * pyro.param(name("scale_tril"))
        return pyro.param(name("loc")), tril @ tril.T

    opt = NaturalGradient(guide, lr=1.0)
    SVI(regression_model(), guide, opt, regression_loss(moments)).step(X, y)
    m, c = moments()
    torch.testing.assert_close(m.detach(), mean)
    torch.testing.assert_close(c.detach(), cov)


def test_mean_field_reaches_mean_field_optimum():
    """For a Gaussian target N(m, Λ⁻¹) the mean-field optimum has the exact mean and variances
    1/Λ_ii (Bishop 2006, §10.1.2)."""
    X, y, mean, cov = linear_regression(torch.float64)
    d = X.shape[1]

    def guide(X, y):
        loc = pyro.param("loc", torch.zeros(d, dtype=X.dtype))
        scale = pyro.param("scale", torch.ones(d, dtype=X.dtype), constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))

    guide = record_args(guide)
    guide(X, y)
    opt = NaturalGradient(guide, lr=1.0)
    svi = SVI(regression_model(), guide, opt,
              regression_loss(lambda: (pyro.param("loc"), torch.diag(pyro.param("scale") ** 2))))
    for _ in range(200):
        svi.step(X, y)
    # exact gradients at the optimum: steps of rounding size are not judged (their gradients
    # differ by rounding alone: half were rejected, and the step size fell to its floor), and
    # the diagnosis says nothing of them (it said "steps keep being rejected")
    assert opt.step_size.rate >= 0.1 and opt.diagnose() == []
    precision = torch.linalg.inv(cov)
    torch.testing.assert_close(pyro.param("loc").detach(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pyro.param("scale").detach(), precision.diagonal().rsqrt(),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
                                         AutoLowRankMultivariateNormal])
def test_autoguides_fit_gaussian_regression_with_trace_elbo(guide_class):
    X, y, mean, cov = linear_regression(torch.float64)
    model = regression_model()
    guide = guide_class(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO(num_particles=32,
                                                               vectorize_particles=True))
    for _ in range(100):
        svi.step(X, y)
    with torch.no_grad():
        draws = torch.stack([guide(X, y)["w"] for _ in range(2000)])
    sd = cov.diagonal().sqrt()
    # Means within 0.2 posterior sd (Monte Carlo error of 2000 draws is ~0.03 sd).
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.2


def _scalar_normal_guide(constraint):
    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0, dtype=x.dtype))
        scale = pyro.param("scale", torch.tensor(1.0, dtype=x.dtype), constraint)
        pyro.sample("z", dist.Normal(loc, scale))
    return record_args(guide)


def _normal_model(x):
    z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    with pyro.plate("n", len(x)):
        pyro.sample("x", dist.Normal(z, 0.3), obs=x)


def _path(constraint, steps=8):
    pyro.clear_param_store()
    pyro.set_rng_seed(42)
    x = torch.linspace(1.0, 3.0, 15, dtype=torch.float64)
    guide = _scalar_normal_guide(constraint)
    svi = SVI(_normal_model, guide,
              NaturalGradient(guide, lr=0.3, step_size=None, stationarity=None),
              Trace_ELBO(num_particles=8, vectorize_particles=True))
    path = []
    for _ in range(steps):
        svi.step(x)
        path.append((float(pyro.param("loc").detach()), float(pyro.param("scale").detach())))
    return torch.tensor(path)


def test_path_of_q_does_not_depend_on_parameterization():
    """Theorem 3.1 of the seed: exp- and softplus-parameterized scales follow the same q path."""
    exp_path = _path(constraints.positive)
    softplus_path = _path(constraints.softplus_positive)
    torch.testing.assert_close(exp_path, softplus_path, rtol=1e-9, atol=1e-12)
    assert (exp_path[1:] != exp_path[:-1]).all()  # the path moves


def test_parameter_space_option_uses_closed_form_fisher():
    x = torch.linspace(1.0, 3.0, 15, dtype=torch.float64)
    guide = _scalar_normal_guide(constraints.positive)
    opt = NaturalGradient(guide, lr=0.5, mirror=None)
    svi = SVI(_normal_model, guide, opt, Trace_ELBO(num_particles=16, vectorize_particles=True))
    for _ in range(100):
        svi.step(x)
    assert opt.last_step["z"]["method"] == "closed_form"
    post_prec = 1 + len(x) / 0.09
    loc, scale = float(pyro.param("loc").detach()), float(pyro.param("scale").detach())
    assert abs(loc - float(x.sum() / 0.09 / post_prec)) < 0.05
    assert abs(scale - post_prec**-0.5) < 0.2 * post_prec**-0.5


@pytest.mark.parametrize("autoguide, aim", [(AutoMultivariateNormal, False),
                                             (AutoMultivariateNormal, True),
                                             (AutoDiagonalNormal, False),
                                             (AutoLowRankMultivariateNormal, False)])
def test_state_round_trip_resumes_exactly(tmp_path, autoguide, aim):
    """Everything the next step reads survives ``save``/``load``: the step size, the KL radius,
    for the factorized guide the momentum's previous mean, a ``KLAim``'s calibration, and for the
    low-rank guide the ``VarianceAdaptation``'s last direction and average cosines."""
    X, y, _, _ = linear_regression(torch.float64)
    model = regression_model()
    guide = autoguide(model)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    opt = NaturalGradient(guide, aim=KLAim() if aim else None)
    svi = SVI(model, guide, opt, elbo)
    for _ in range(4):  # then a step with momentum follows (not an undone one)
        svi.step(X, y)
    if autoguide is AutoLowRankMultivariateNormal:
        assert opt.get_state()["pieces"]["variance_adaptation"]["averages"]
    opt.save(tmp_path / "opt.pt")
    store = pyro.get_param_store()
    # restored in place: an AutoGuide's plain nn.Parameter (its loc) is not re-read from the store
    params = {k: v.detach().clone() for k, v in store.named_parameters()}
    rng = torch.get_rng_state()
    first = [svi.step(X, y) for _ in range(6)]
    with torch.no_grad():
        for k, v in store.named_parameters():
            v.copy_(params[k])
    torch.set_rng_state(rng)
    resumed = NaturalGradient(guide, aim=KLAim() if aim else None)
    resumed.load(tmp_path / "opt.pt")
    second = [SVI(model, guide, resumed, elbo).step(X, y) for _ in range(6)]
    assert first == second


def test_non_finite_gradient_is_refused_and_params_kept():
    guide = _scalar_normal_guide(constraints.positive)
    x = torch.ones(3, dtype=torch.float64)
    guide(x)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    def nan_loss(model, guide, x):
        return pyro.param("loc") * torch.tensor(float("nan")) + pyro.param("scale")

    opt = NaturalGradient(guide)
    with pytest.warns(StepRefusedWarning, match=r"non-finite gradient.*loc.*site\(s\) z"):
        SVI(_normal_model, guide, opt, nan_loss).step(x)
    for k, v in pyro.get_param_store().items():
        torch.testing.assert_close(v.detach(), before[k])
    opt_raise = NaturalGradient(guide, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="loc"):
        SVI(_normal_model, guide, opt_raise, nan_loss).step(x)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": -1.0}, "lr"),
    ({"fisher": "bogus"}, "fisher"), ({"num_samples": 0}, "num_samples"), ({"lr": True}, "lr"),
    ({"momentum": 1.5}, "momentum"), ({"momentum": -0.1}, "momentum"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NaturalGradient(_scalar_normal_guide(constraints.positive), **kwargs)


@pytest.mark.parametrize("lr", [np.float32(0.5), np.float64(0.5), np.int64(1),
                                torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64)],
                         ids=repr)
def test_lr_may_be_any_real_number_type(lr):
    """A NumPy scalar or a one-element tensor is a number (they were refused as "not a finite
    number > 0"); the lr kept is a Python float."""
    opt = NaturalGradient(_scalar_normal_guide(constraints.positive), lr=lr)
    assert type(opt.lr) is float and opt.lr == float(lr)
    with pytest.raises(ValueError, match="lr"):
        NaturalGradient(_scalar_normal_guide(constraints.positive), lr=torch.tensor([0.5, 0.5]))


def test_exact_fisher_on_non_exponential_site_names_it():
    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.StudentT(4.0, loc, 1.0))

    guide = record_args(guide)
    opt = NaturalGradient(guide, fisher="exact")
    with pytest.raises(ValueError, match="'z'"):
        SVI(_normal_model, guide, opt, Trace_ELBO()).step(torch.ones(3))


def test_plain_guide_without_recorded_args_gets_a_clear_error():
    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    with pytest.raises(TypeError, match="record_args"):
        NaturalGradient(guide)


def test_model_params_get_the_base_optimizer():
    def model(x):
        shift = pyro.param("shift", torch.tensor(0.0, dtype=x.dtype))
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("n", len(x)):
            pyro.sample("x", dist.Normal(z + shift, 0.3), obs=x)

    guide = AutoNormal(model)
    opt = NaturalGradient(guide, base_args={"lr": 0.05})
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=8, vectorize_particles=True))
    x = torch.full((20,), 2.0, dtype=torch.float64)
    for _ in range(50):
        svi.step(x)
    assert float(pyro.param("shift").detach()) != 0.0
    assert list(opt.last_step) == ["z_unconstrained"]
    rows = {line.split()[0]: line for line in opt.summary().splitlines()[1:]}
    assert "natural" in rows["AutoNormal.locs.z"] and "Normal" in rows["AutoNormal.locs.z"]
    assert "base: Adam({'lr': 0.05})" in rows["shift"]  # every param is listed
    assert opt.base_params() == ["shift"]


def test_elements_that_leave_the_domain_are_retracted_the_rest_step_plainly():  # Retraction
    """Element 0's plain step would give precision 1 − 20 < 0; Lin, Schmidt & Khan's retraction
    gives λ' = λ + g + ½g²/λ = 1 − 20 + 200 = 181 instead, and element 1 takes the plain step
    (λ: 1 → 3, m: 0 → 2/3), computed here by hand from η ← η − ∂L/∂μ."""
    def guide(x):
        loc = pyro.param("loc", torch.zeros(2, dtype=x.dtype))
        scale = pyro.param("scale", torch.ones(2, dtype=x.dtype), constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def loss(model, guide, x):  # in mean coordinates: −10 μ₂[0] + μ₂[1] − 2 μ₁[1]
        loc, scale = pyro.param("loc"), pyro.param("scale")
        second = loc**2 + scale**2
        return -10 * second[0] + second[1] - 2 * loc[1]

    x = torch.ones(3, dtype=torch.float64)
    guide = record_args(guide)
    guide(x)
    opt = NaturalGradient(guide, lr=1.0, mirror=Mirror(domain=Retraction()), trust_region=None)
    SVI(_normal_model, guide, opt, loss).step(x)
    expected_scale = torch.tensor([181.0, 3.0], dtype=torch.float64).rsqrt()
    torch.testing.assert_close(pyro.param("scale").detach(), expected_scale)
    torch.testing.assert_close(pyro.param("loc").detach(),
                               torch.tensor([0.0, 2 / 3], dtype=torch.float64))
    assert "retraction at 1 of 2" in opt.last_step["z"]["note"]


def _indefinite_quadratic(a: torch.Tensor):
    """A 2-D MVN guide q = N(m, LLᵀ) and the loss E_q[½ zᵀAz] − H[q] = ½mᵀAm + ½tr(AΣ) − H[q]
    in closed form: ∂L/∂m = Am, ∂L/∂Σ = ½(A − Σ⁻¹), so the natural step's precision is
    Λ' = (1 − ρ)Λ + ρA, indefinite for ρ = 1 when A is."""
    f64 = torch.float64

    def guide():
        pyro.sample("z", dist.MultivariateNormal(
            pyro.param("loc", torch.tensor([1.0, -2.0], dtype=f64)),
            scale_tril=pyro.param("tril", torch.eye(2, dtype=f64), constraints.lower_cholesky)))

    def loss(model, guide_):
        m, tril = pyro.param("loc"), pyro.param("tril")
        q = dist.MultivariateNormal(m, scale_tril=tril)
        return 0.5 * m @ a @ m + 0.5 * torch.trace(a @ tril @ tril.T) - q.entropy()

    return record_args(guide), loss


def test_gaussian_step_leaving_the_domain_shortens_only_the_precision():
    """Λ' = (1 − ρ_Λ)Λ + ρ_Λ A with Λ = I, A = diag(1, −3) is positive definite only for
    ρ_Λ < 1/4, so the halvings 1/2, 1/4 fail and ρ_Λ = 1/8, Λ' = diag(1, ½); the default floor
    lifts the direction that fell below 0.6 of Λ to it, Λ' = diag(1, 0.6), while the mean keeps
    the full step m' = m − ρ Λ'⁻¹ ∂L/∂m with ρ = 1 (the natural step in (m, Λ) with two rates)."""
    a = torch.diag(torch.tensor([1.0, -3.0], dtype=torch.float64))
    guide, loss = _indefinite_quadratic(a)
    guide()
    m0 = pyro.param("loc").detach().clone()
    opt = NaturalGradient(guide, lr=1.0, trust_region=None)  # the repair alone
    SVI(lambda: None, guide, opt, loss).step()
    precision = torch.cholesky_inverse(pyro.param("tril").detach())
    rho = 1 / 8
    expected = ((1 - rho) * torch.eye(2, dtype=a.dtype) + rho * a).clamp_min(0.6).diag().diag()
    torch.testing.assert_close(precision, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pyro.param("loc").detach(),
                               m0 - torch.linalg.solve(expected, a @ m0), rtol=1e-10, atol=1e-12)
    assert "precision step shortened to 0.125" in opt.last_step["z"]["note"]


def test_mean_field_precision_is_shortened_per_coordinate():
    """A mean-field Normal is one distribution per coordinate: with the loss
    Σᵢ ½aᵢ(mᵢ² + σᵢ²) − H(q) and a = (2, −3), coordinate 0 takes the full natural step
    (Λ₀' = a₀ = 2) and only coordinate 1 is shortened (ρ_Λ = 1/8 as above, Λ₁' = 1/2); both means
    take the full step mᵢ' = mᵢ − aᵢmᵢ/Λᵢ'."""
    f64 = torch.float64
    a = torch.tensor([2.0, -3.0], dtype=f64)

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor([1.0, -2.0], dtype=f64)),
                                     pyro.param("scale", torch.ones(2, dtype=f64),
                                                constraints.positive)).to_event(1))

    def loss(model, guide_):
        m, s = pyro.param("loc"), pyro.param("scale")
        return (0.5 * a * (m**2 + s**2)).sum() - s.log().sum()

    guide()
    m0 = pyro.param("loc").detach().clone()
    opt = NaturalGradient(guide, lr=1.0, trust_region=None)  # the repair alone
    SVI(lambda: None, guide, opt, loss).step()
    precision = pyro.param("scale").detach() ** -2
    expected = torch.tensor([2.0, 7 / 8 - 3 / 8], dtype=f64)
    torch.testing.assert_close(precision, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pyro.param("loc").detach(), m0 - a * m0 / expected,
                               rtol=1e-10, atol=1e-12)
    assert "at 1 of 2 elements" in opt.last_step["z"]["note"]


def test_natural_step_is_exact_for_a_mean_far_from_zero():
    """∂L/∂μ is computed from ∂L/∂(m, σ) in closed form, so σ is never rebuilt as
    (μ₂ − μ₁²)^½, which cancels when m² ≫ σ² (here m = 1e6, σ = 1e-3: μ₂ − μ₁² loses every digit
    of σ² in float64). One step with lr = 1 from q = N(m₀, σ₀²) lands on p = N(1e6 + 1, 1e-6)
    for the loss KL(q ‖ p)."""
    f64 = torch.float64

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(1e6, dtype=f64)),
                                     pyro.param("scale", torch.tensor(2e-3, dtype=f64),
                                                constraints.positive)))
    guide = record_args(guide)
    target = dist.Normal(torch.tensor(1e6 + 1, dtype=f64), torch.tensor(1e-3, dtype=f64))

    def loss(model, guide_):
        q = dist.Normal(pyro.param("loc"), pyro.param("scale"))
        return torch.distributions.kl_divergence(q, target)

    guide()
    SVI(lambda: None, guide, NaturalGradient(guide, lr=1.0),
        loss).step()
    torch.testing.assert_close(pyro.param("loc").detach(), target.loc, rtol=1e-12, atol=1e-6)
    torch.testing.assert_close(pyro.param("scale").detach(), target.scale, rtol=1e-6, atol=0)


def test_momentum_speeds_up_a_factorized_guide_on_a_correlated_target():
    """A mean-field guide q = N(m, diag s²) on p = N(μ, Σ) with AR(1) correlation 0.95 (d = 10),
    exact −ELBO = KL(q ‖ p) in closed form. The optimum is m = μ, s² = 1/Λᵢᵢ (Λ = Σ⁻¹). The
    natural step is a Jacobi step for m, m' = m − ρ diag(Λ)⁻¹Λ(m − μ), slow by the condition
    number of diag(Λ)⁻¹Λ; the default momentum (0.9 on factorized sites, with gradient restarts)
    cuts the gap after 100 steps from 5.7e-3 to 3e-6 nats (measured)."""
    f64, d = torch.float64, 10
    idx = torch.arange(d, dtype=f64)
    cov = 0.95 ** (idx[:, None] - idx[None, :]).abs()
    prec, mu = torch.linalg.inv(cov), torch.linspace(-2.0, 2.0, d, dtype=f64)
    optimum = 0.5 * float(torch.logdet(cov) + prec.diagonal().log().sum())

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(d, dtype=f64)),
                                     pyro.param("scale", torch.ones(d, dtype=f64),
                                                constraints.positive)).to_event(1))
    guide = record_args(guide)

    def kl(model, guide_):
        m, s = pyro.param("loc"), pyro.param("scale")
        r = m - mu
        return 0.5 * ((prec.diagonal() * s**2).sum() + r @ prec @ r - d + torch.logdet(cov)
                      - 2 * s.log().sum())

    gaps = {}
    for momentum in (0.0, "auto"):  # the fitted scales checked below: the default run's
        pyro.clear_param_store()
        guide()
        svi = SVI(lambda: None, guide, NaturalGradient(guide, momentum=momentum), kl)
        gaps[momentum] = [svi.step() - optimum for _ in range(100)][-1]
    assert gaps["auto"] < 1e-4 < 1e-3 < gaps[0.0]
    torch.testing.assert_close(pyro.param("scale").detach() ** -2, prec.diagonal(), rtol=0.05,
                               atol=0.0)


def test_default_trust_region_takes_full_steps_until_one_is_rejected():
    """Defaults: a natural step that stays in the domain is unbounded until the step-size policy
    rejects one; that sets the group's radius to half the rejected step's KL, and every later
    step's KL stays within the radius in force. Loss E_q[z⁴] − H[q] in closed form, from far
    away: the first, full step moves q by 143 nats (a ½√n radius would have cut it to 0.7)."""
    f64 = torch.float64

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(3.0, dtype=f64)),
                                     pyro.param("scale", torch.tensor(1.0, dtype=f64),
                                                constraints.positive)))
    guide = record_args(guide)

    def loss(model, guide_):
        m, s = pyro.param("loc"), pyro.param("scale")
        return m**4 + 6 * m**2 * s**2 + 3 * s**4 - torch.log(s)

    guide()
    opt = NaturalGradient(guide, lr=1.0, momentum=0.0)
    svi = SVI(lambda: None, guide, opt, loss)
    key, losses, rejected_at = ("loc", "scale"), [], None
    for i in range(14):
        trusted = key not in opt.trust_region.distrusted  # before the step
        radius = opt.trust_region.radius.get(key, float("inf"))
        losses.append(svi.step())
        step = opt.last_step["z"]
        if step["method"] == "undone":
            rejected_at = i
            continue
        assert step["method"] == "natural" and step["note"] == ""  # clean: no domain repair
        if trusted:
            assert step["lr"] == 1.0  # the full natural step
        else:
            assert step["kl"] <= radius * (1 + 1e-9)
    assert opt.last_step is not None and losses[1] < 0.1 * losses[0]
    assert rejected_at is not None and opt.trust_region.radius[key] < 1e-2
    assert losses[-1] <= min(losses) + 1e-9  # settled at the minimum


@pytest.mark.filterwarnings("ignore::pyro_natgrad.StepRefusedWarning")  # at the boundary
@pytest.mark.parametrize("make_optim", [
    lambda g: NaturalGradient(g, lr=1.0, mirror=None),
    lambda g: WassersteinGradient(g, lr=1.0, metric="pushforward"),
], ids=["natural-parameter", "wasserstein-pushforward"])
def test_a_linear_step_the_guide_cannot_build_is_shortened(make_optim):
    """A linear step in the guide's own params can pass every elementwise check and still give
    params the guide cannot build (e.g. an AutoLowRankMultivariateNormal whose capacitance
    I + WᵀD⁻¹W fails its float32 Cholesky). The optimizer re-builds the guide before it accepts
    such a step and shortens it otherwise, so SVI never sees the failure. Here the guide refuses
    scale > 2 while the target N(0, 10²) pulls the scale up."""
    f64 = torch.float64

    def guide():
        scale = pyro.param("scale", torch.tensor(1.0, dtype=f64), constraints.positive)
        if scale > 2:
            raise ValueError("scale above 2: this guide cannot be built")
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0, dtype=f64)), scale))
    guide = record_args(guide)
    target = dist.Normal(torch.tensor(0.0, dtype=f64), torch.tensor(10.0, dtype=f64))

    def loss(model, guide_):
        q = dist.Normal(pyro.param("loc"), pyro.param("scale"))
        return torch.distributions.kl_divergence(q, target)

    guide()
    opt = make_optim(guide)
    svi = SVI(lambda: None, guide, opt, loss)
    for _ in range(20):
        svi.step()
    assert 1.5 < float(pyro.param("scale")) <= 2.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_rotations_removes_exactly_the_rotation_directions(dtype):
    """For a batch of factors w (3 × 7 × 3): the result is orthogonal to every wA with A
    antisymmetric, a second projection changes nothing, and a pure rotation direction goes."""
    from pyro_natgrad.fisher.linalg import without_rotations

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 7, 3, generator=gen, dtype=dtype)
    g = torch.randn(3, 7, 3, generator=gen, dtype=dtype)
    out = without_rotations(w, g)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for i in range(3):
        for j in range(i + 1, 3):
            a = torch.zeros(3, 3, dtype=dtype)
            a[i, j], a[j, i] = 1.0, -1.0
            assert float((out * (w @ a)).sum((-2, -1)).abs().max()) < tol * float(g.norm())
    torch.testing.assert_close(without_rotations(w, out), out, rtol=tol, atol=tol)
    a = torch.randn(3, 3, generator=gen, dtype=dtype)
    rotation = w @ (a - a.T)
    assert float(without_rotations(w, rotation).norm()) < tol * float(rotation.norm())


def _regression_8d(noise: float):
    """A model with one 8-dimensional latent w ~ N(0, I) and 50 noiseless-target rows."""
    f64 = torch.float64
    X = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=f64)
    y = X @ torch.linspace(-1, 1, 8, dtype=f64)

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(8, dtype=f64), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(X @ w, noise).to_event(1), obs=y)

    return model


def test_a_fixed_bound_holds_for_an_aimed_full_covariance_step():
    """``KLTrustRegion.fixed(max_kl)`` with a ``KLAim`` (the first candidate aimed at the bound
    by a calibrated model, which may land beyond it): every natural step's KL ≤ 0.5 on an 8-d
    regression with AutoMultivariateNormal from Pyro's initial scale, and most steps are held
    to it."""
    model = _regression_8d(noise=0.1)
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(model)
    opt = NaturalGradient(guide, trust_region=KLTrustRegion.fixed(0.5), aim=KLAim())
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=8))
    kls = []
    for _ in range(15):
        svi.step()
        record = opt.last_step.get("_AutoMultivariateNormal_latent", {})
        if record.get("method") == "natural":
            kls.append(record["kl"])
    assert len(kls) >= 10 and max(kls) <= 0.5 * (1 + 1e-9), kls
    assert sum(kl > 0.4 for kl in kls) >= len(kls) // 2, kls


def test_low_rank_step_does_not_rotate_the_factor():
    """Rotations W ↦ WQ leave a low-rank Gaussian unchanged, so the exact ELBO gradient has no
    component along WA (A antisymmetric); the Monte Carlo one does, and the damped solve would
    step along it as 1/λ. The optimizer removes it: every step of the factor param is free of
    rotation directions (the Fisher's null space there), to rounding. Here by conjugate gradients,
    the solver of large groups (the dense solve drops the null space anyway)."""
    from pyro_natgrad.fisher.linalg import without_rotations

    model = _regression_8d(noise=0.5)
    guide = AutoLowRankMultivariateNormal(model, rank=3)
    elbo = Trace_ELBO(num_particles=4)
    elbo.loss(model, guide)  # builds the guide
    opt = NaturalGradient(guide, solve=FisherSolve(form="cg"))
    svi, taken = SVI(model, guide, opt, elbo), 0
    for _ in range(8):
        before = guide.cov_factor.detach().clone()
        svi.step()
        if opt.last_step["_AutoLowRankMultivariateNormal_latent"]["method"] != "closed_form":
            continue  # an undone step
        delta = guide.cov_factor.detach() - before
        rotation = delta - without_rotations(before, delta)
        assert float(rotation.norm()) < 1e-6 * float(delta.norm())
        taken += 1
    assert taken >= 5


def test_low_rank_step_is_bounded_by_its_exact_kl_both_ways():
    """AutoLowRankMultivariateNormal steps in its own parameters with the closed-form Fisher,
    whose quadratic model ½ρ²dᵀFd misses the ΔWΔWᵀ term of a factor W near Pyro's small initial
    value. The step taken is measured on the re-built guide: both KL(q ‖ q') and KL(q' ‖ q) stay
    within ``max_kl``, and the recorded KL is the larger one."""
    model = _regression_8d(noise=0.1)
    pyro.set_rng_seed(0)
    guide = AutoLowRankMultivariateNormal(model, rank=2)
    opt = NaturalGradient(guide, lr=1.0, trust_region=KLTrustRegion.fixed(2.0), step_size=None,
                          stationarity=None)
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=8))
    for _ in range(5):
        svi.step()  # the first call builds the guide; later ones step
        q = guide.get_posterior()
        q = dist.LowRankMultivariateNormal(q.loc.detach().clone(), q.cov_factor.detach().clone(),
                                           q.cov_diag.detach().clone())
        svi.step()
        new = guide.get_posterior()
        both = max(float(torch.distributions.kl_divergence(q, new).detach()),
                   float(torch.distributions.kl_divergence(new, q).detach()))
        record = opt.last_step["_AutoLowRankMultivariateNormal_latent"]
        assert record["method"] == "closed_form"
        assert both <= 2.0 * (1 + 1e-6) and abs(record["kl"] - both) <= 1e-6 * max(1, both)


@pytest.mark.parametrize("seed", [0, 1])
def test_subsampled_local_latents_fit_at_the_defaults(seed):
    """z_i ~ N(μ, 1), x_i ~ N(z_i, 1), i < 200, in a plate of batches of 50, AutoNormal, the
    defaults: the locals' step is read on the batch the gradient came from (it was read on a
    fresh draw, and the locals hardly moved: 100 steps left the z means 2.4 posterior sds off
    and μ 23), and their signal fraction on the coordinates both steps moved. Exact mean-field
    optimum: E z_i = (E μ + x_i)/2, sd z_i = 1/√2, E μ the posterior mean."""
    n = 200
    gen = torch.Generator().manual_seed(seed)
    x = (2.0 + torch.randn(n, generator=gen, dtype=torch.float64)
         + torch.randn(n, generator=gen, dtype=torch.float64))

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
        with pyro.plate("N", n, subsample_size=50) as i:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(model)
    svi = SVI(model, guide, NaturalGradient(guide),
              Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(100):
        svi.step(x)
    mu_mean = (x.sum() / 2) / (1 / 100 + n / 2)
    mu_sd = (1 / 100 + n) ** -0.5
    z_mean = (mu_mean + x) / 2
    assert abs(float(pyro.param("AutoNormal.locs.mu")) - mu_mean) < 6 * mu_sd
    z_error = (pyro.param("AutoNormal.locs.z").detach() - z_mean).square().mean().sqrt()
    assert z_error < 0.6 * 2 ** -0.5
    assert (pyro.param("AutoNormal.scales.z").detach().median() - 2 ** -0.5).abs() < 0.05
    pyro.clear_param_store()


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_step_lands_each_subsampled_local_on_its_exact_posterior(dtype):
    """z_i ~ N(0, 1), x_i ~ N(z_i, 1), i < 40, in a plate of batches of 10, AutoNormal, the exact
    (closed-form) ELBO of the batch: the locals are read as a mirror step on the batch's entries
    of their params (``Gathered``), so one step at lr = 1 puts each local of the batch on its
    exact posterior N(x_i/2, ½) and leaves the other locals as they were."""
    n, batch = 40, 10
    x = torch.linspace(-2.0, 3.0, n, dtype=dtype)

    def model(x):
        with pyro.plate("N", n, subsample_size=batch) as i:
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=dtype), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])

    def exact_loss(model, guide, x):
        trace = pyro.poutine.trace(guide).get_trace(x)
        i = trace.nodes["N"]["value"]
        q = trace.nodes["z_unconstrained"]["fn"]
        m, s = q.loc, q.scale
        elbo = -0.5 * ((x[i] - m) ** 2 + s**2) - 0.5 * (m**2 + s**2) + s.log()
        return -(n / batch) * elbo.sum()

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    guide(x)
    opt = NaturalGradient(guide, lr=1.0)
    svi = SVI(model, guide, opt, exact_loss)
    before = pyro.param("AutoNormal.locs.z").detach().clone()
    svi.step(x)
    assert opt.last_step["z_unconstrained"]["method"] == "natural"
    locs = pyro.param("AutoNormal.locs.z").detach()
    scales = pyro.param("AutoNormal.scales.z").detach()
    moved = (locs != before).nonzero().flatten()
    assert len(moved) == batch
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(locs[moved], x[moved] / 2, **tol)
    torch.testing.assert_close(scales[moved], torch.full((batch,), 0.5, dtype=dtype).sqrt(),
                               **tol)
    pyro.clear_param_store()
