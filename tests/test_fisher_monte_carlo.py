"""The Monte Carlo Fisher F̂ = (1/S) Σ_s r_s r_sᵀ, r_s = ∇θ log q(z_s): statistics against the
closed form, its three forms, and NaturalGradient on guides outside the exponential families."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO

from pyro_natgrad import NaturalGradient, record_args
from pyro_natgrad.families import family_of
from pyro_natgrad.fisher import MonteCarloFisher, PulledBackFisher

F64 = torch.float64


def _normal(log_scale: float = 0.3):
    """Leaves (μ, u) of N(μ, e^{2u}); the closed-form Fisher in (μ, u) is diag(e^{−2u}, 2)."""
    loc = torch.tensor(0.7, dtype=F64, requires_grad=True)
    u = torch.tensor(log_scale, dtype=F64, requires_grad=True)
    exact = torch.diag(torch.stack([torch.exp(-2 * u.detach()), torch.tensor(2.0, dtype=F64)]))
    return [loc, u], dist.Normal(loc, u.exp()), exact


def _gamma():
    """Leaves (log α, log β) of Gamma(α, β); closed form from the family, pulled back."""
    leaves = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.8, -0.2)]
    fn = dist.Gamma(leaves[0].exp(), leaves[1].exp())
    exact = PulledBackFisher([(family_of(fn), family_of(fn).args(fn), 1.0)], leaves).dense()
    return leaves, fn, exact.detach()


def _mvn():
    """Leaves (m, L) of N(m, LLᵀ) in 2-D (L's 4 entries, its upper one unused)."""
    loc = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    tril = torch.tensor([[1.2, 0.0], [0.4, 0.6]], dtype=F64, requires_grad=True)
    fn = dist.MultivariateNormal(loc, scale_tril=tril.tril())
    exact = PulledBackFisher([(family_of(fn), family_of(fn).args(fn), 1.0)], [loc, tril]).dense()
    return [loc, tril], fn, exact.detach()


CASES = {"normal": _normal, "gamma": _gamma, "mvn": _mvn}


@pytest.mark.parametrize("case", CASES)
def test_entries_are_within_five_standard_errors_of_the_closed_form(case):
    """Each entry of F̂ is a mean of S iid products r_i r_j; with its sample standard error
    SE_ij from the same draws, |F̂_ij − F_ij| ≤ 5 SE_ij (z-test: false failure < 1e-5 per entry
    under normality; seeded). Entries whose variance is zero (the MVN's unused upper entry) are
    exactly zero."""
    leaves, fn, exact = CASES[case]()
    fisher = MonteCarloFisher([("z", fn, 1.0)], leaves, 20_000)
    r = fisher.scores().flatten(0, 1).detach()
    products = r[:, :, None] * r[:, None, :]
    estimate, se = products.mean(0), products.std(0) / r.shape[0] ** 0.5
    torch.testing.assert_close(estimate, fisher.dense().detach())
    assert ((estimate - exact).abs() <= 5 * se + 1e-12).all(), (estimate - exact) / se


@pytest.mark.parametrize("case", CASES)
def test_error_shrinks_like_one_over_root_samples(case):
    """Frobenius error ‖F̂ − F‖ averaged over 10 seeds: 16× the draws gives ≈ ¼ the error
    (measured ratios 0.21–0.26; max |z| over entries 1.2–2.7); asserted within [0.15, 0.4]."""
    leaves, fn, exact = CASES[case]()
    errors = {}
    for samples in (250, 4000):
        total = 0.0
        for seed in range(10):
            torch.manual_seed(seed)
            fisher = MonteCarloFisher([("z", fn, 1.0)], leaves, samples)
            total += float((fisher.dense().detach() - exact).norm())
        errors[samples] = total / 10
    assert 0.15 <= errors[4000] / errors[250] <= 0.4, errors


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_three_forms_and_the_trace_agree(dtype):
    """mvp(v) = F̂v, diag() = diag F̂, trace() = tr F̂ from the same draws; the matrix-free trace
    (Hutchinson, 8 probes) is within 30% (its relative sd here ≈ 10%)."""
    loc = torch.randn(5, dtype=dtype, requires_grad=True)
    u = torch.zeros(5, dtype=dtype, requires_grad=True)
    fn = dist.StudentT(4.0, loc, u.exp()).to_event(1)
    fisher = MonteCarloFisher([("z", fn, 1.0)], [loc, u], 200)
    v = torch.randn(10, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    matrix_free_trace = float(fisher.trace())  # before the scores exist: Hutchinson
    dense = fisher.dense().detach()
    torch.testing.assert_close(fisher.mvp(v).detach(), dense @ v, **tol)
    torch.testing.assert_close(fisher.diag().detach(), dense.diagonal(), **tol)
    torch.testing.assert_close(fisher.trace().detach(), dense.trace(), **tol)
    assert abs(matrix_free_trace / float(dense.trace()) - 1) < 0.3


def _robust_regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 3, generator=g, dtype=F64)
    chi2 = torch.randn(100, 3, generator=g, dtype=F64).square().sum(-1)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.5 * torch.randn(
        100, generator=g, dtype=F64) / (chi2 / 3).sqrt()

    def model(X, y):
        w = pyro.sample("w", dist.Normal(X.new_zeros(3), 1.0).to_event(1))
        with pyro.plate("data", 100):
            pyro.sample("y", dist.StudentT(3.0, (X * w).sum(-1), 0.5), obs=y)

    def guide(X, y):
        pyro.sample("w", dist.StudentT(5.0, pyro.param("loc", X.new_zeros(3)),
                                       pyro.param("scale", X.new_ones(3), constraints.positive)
                                       ).to_event(1))
    return model, record_args(guide), (X, y)


def _neg_elbo(model, guide, data) -> float:
    with torch.no_grad():
        elbo = Trace_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=1)
        return sum(elbo.loss(
            model, guide, *data) for _ in range(4)) / 4


def test_student_t_guide_fits_in_fewer_steps_than_the_best_adam():
    """Robust regression, a Student-t guide (not an exponential family: the Monte Carlo Fisher),
    16 particles. NaturalGradient's defaults after 25 steps reach a −ELBO at least as good as the
    best of Adam lr ∈ {0.01, 0.03, 0.1} after 100 steps, within 0.5 nats (measured: NG 114.81 at
    10–25 steps; Adam 0.1: 114.92 at 100, 128.8 at 25)."""
    model, guide, data = _robust_regression()
    results = {}
    for name, make, steps in [("ng", lambda g: NaturalGradient(g), 25)] + [
            (f"adam{lr}", lambda g, lr=lr: pyro.optim.Adam({"lr": lr}), 100)
            for lr in (0.01, 0.03, 0.1)]:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = SVI(model, guide, make(guide), Trace_ELBO(num_particles=16, vectorize_particles=True))
        for _ in range(steps):
            svi.step(*data)
        results[name] = _neg_elbo(model, guide, data)
        if name == "ng":
            assert "monte_carlo" in svi.optim.summary()
    best_adam = min(v for k, v in results.items() if k != "ng")
    assert results["ng"] <= best_adam + 0.5, results


def test_summary_names_closed_form_and_monte_carlo_sites():
    """fisher="auto" is decided per site: an exponential-family site steps in natural parameters,
    a Student-t site with the Monte Carlo Fisher, and summary() says which."""
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(pyro.param("a_loc", torch.tensor(0.0)),
                                     pyro.param("a_scale", torch.tensor(1.0),
                                                constraints.positive)))
        pyro.sample("b", dist.StudentT(4.0, pyro.param("b_loc", torch.tensor(0.0)),
                                       pyro.param("b_scale", torch.tensor(1.0),
                                                  constraints.positive)))
    guide = record_args(guide)
    opt = NaturalGradient(guide)
    SVI(model, guide, opt, Trace_ELBO(num_particles=8, vectorize_particles=True)).step()
    rows = {line.split()[0]: line.split()[2] for line in opt.summary().splitlines()[1:]}
    assert rows == {"a": "natural", "b": "monte_carlo"}


def test_rank_deficient_estimate_uses_its_diagonal_and_stays_finite():
    """A group with more params (2 × 50) than draws (16): F̂ has rank ≤ 16, so the default form is
    the diagonal; with form="cg" the relative damping keeps the step bounded (the KL of the step,
    from the damped quadratic model, stays within the trust region and the scales stay > 0)."""
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(50), 1.0).to_event(1))

    def guide():
        pyro.sample("z", dist.StudentT(4.0, pyro.param("loc", torch.full((50,), 2.0)),
                                       pyro.param("scale", torch.full((50,), 0.1),
                                                  constraints.positive)).to_event(1))
    guide = record_args(guide)
    for form in (None, "cg"):
        pyro.clear_param_store()
        opt = NaturalGradient(guide, fisher="monte_carlo", num_samples=16, form=form)
        svi = SVI(model, guide, opt, Trace_ELBO(num_particles=8, vectorize_particles=True))
        losses = [svi.step() for _ in range(30)]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert (pyro.param("scale") > 0).all() and torch.isfinite(pyro.param("loc")).all()
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_samples": 0}, "num_samples"), ({"damping": -1.0}, "damping"),
    ({"relative_damping": -0.1}, "relative_damping"), ({"fisher_decay": 1.0}, "fisher_decay")])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NaturalGradient(lambda: None, **kwargs)


def test_bad_fisher_inputs_are_named():
    loc = torch.tensor(0.0, requires_grad=True)
    with pytest.raises(ValueError, match="num_samples"):
        MonteCarloFisher([("z", dist.Normal(loc, 1.0), 1.0)], [loc], 0)
    with pytest.raises(ValueError, match="at least one guide site"):
        MonteCarloFisher([], [loc], 8)


class _DetachedNormal(dist.Normal):
    """A custom distribution whose log-density drops the graph (e.g. computed in numpy)."""

    def log_prob(self, value):
        return super().log_prob(value).detach()


def test_site_with_a_non_differentiable_log_prob_is_named():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", _DetachedNormal(pyro.param("loc", torch.tensor(0.0)), 1.0))
    guide = record_args(guide)
    svi = SVI(model, guide, NaturalGradient(guide, fisher="monte_carlo"), Trace_ELBO())
    with pytest.raises(ValueError, match="guide site 'z'.*not differentiable"):
        svi.step()


def test_guide_without_continuous_params_is_named():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))
    guide = record_args(guide)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with pytest.raises(ValueError, match="no latent sample site whose distribution depends"):
        svi.step()


def test_averaged_fisher_survives_a_state_round_trip():
    """fisher_decay keeps a running average of F̂ across steps; get_state/set_state restore it
    exactly, so the resumed optimizer takes the same next step."""
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide():
        pyro.sample("z", dist.StudentT(4.0, pyro.param("loc", torch.ones(3)),
                                       pyro.param("scale", torch.ones(3), constraints.positive)
                                       ).to_event(1))
    guide = record_args(guide)
    opt = NaturalGradient(guide, fisher_decay=0.9, num_samples=32)
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=4))
    for _ in range(3):
        svi.step()
    state = opt.get_state()
    averages = state["geometry"]["fisher_averages"]
    assert averages and all(torch.isfinite(v).all() for v in averages.values())
    resumed = NaturalGradient(guide, fisher_decay=0.9, num_samples=32)
    resumed.set_state(state)
    for key, value in resumed.get_state()["geometry"]["fisher_averages"].items():
        assert torch.equal(value, averages[key])


def test_flow_guide_ends_as_low_as_the_best_adam():
    """The same robust regression with AutoIAFNormal (one MADE layer, 8 hidden units, ~90 weights;
    its Fisher lives on the weights, so only the Monte Carlo estimate exists). After 150 steps at
    16 particles NaturalGradient's defaults are within 0.5 nats of the best of Adam
    lr ∈ {0.01, 0.03, 0.1} after the same 150 steps. Measured (seeds 0 / 1): NG 111.49 / 111.77,
    best Adam 111.70 / 111.75; NG at 100 steps 111.57 / 112.95 — in fewer steps than Adam on seed 0
    only, so "fewer steps" is not claimed for flows (see notebook 06 and the benchmark).
    Fragile: before the optimizer ordered the params by name (SVI hands it a set), one CI run with
    another hash-dependent order ended at −ELBO 219 — the natural step on flow weights amplifies
    round-off; runs are reproducible now, not robust."""
    from pyro.infer.autoguide import AutoIAFNormal

    model, _, data = _robust_regression()
    results = {}
    for name, make in [("ng", lambda g: NaturalGradient(g))] + [
            (f"adam{lr}", lambda g, lr=lr: pyro.optim.Adam({"lr": lr}))
            for lr in (0.01, 0.03, 0.1)]:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoIAFNormal(model, hidden_dim=[8])
        svi = SVI(model, guide, make(guide), Trace_ELBO(num_particles=16, vectorize_particles=True,
                                                          max_plate_nesting=1))
        for _ in range(150):
            svi.step(*data)
        results[name] = _neg_elbo(model, guide, data)
    assert results["ng"] <= min(v for k, v in results.items() if k != "ng") + 0.5, results
