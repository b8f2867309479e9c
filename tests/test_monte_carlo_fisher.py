"""The Monte Carlo Fisher F̂ = (1/S) Σ_s r_s r_sᵀ, r_s = ∇θ log q(z_s), against the closed form and
inside NaturalGradient: its statistics (entrywise z-test, a χ² test across entries, error ∝ 1/√S),
its forms, fisher="auto" per site, fits of non-exponential-family guides through plain SVI against
the best Adam, bad input, rank deficiency and the averaged Fisher's state."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoIAFNormal
from scipy.stats import chi2

import pyro_natgrad.optim.fisher_solve as natural_module
from pyro_natgrad import NaturalGradient, StepRefusedWarning, record_args
from pyro_natgrad.families import family_of
from pyro_natgrad.fisher import MonteCarloFisher, PulledBackFisher
from pyro_natgrad.optim import FisherAverage, FisherSolve

F64 = torch.float64


# ----- guides with a known Fisher ---------------------------------------------------------------
def _normal_exp():
    """N(μ, σ²), σ = e^u, leaves (μ, u): F = diag(1/σ², 2)."""
    loc = torch.tensor(0.7, dtype=F64, requires_grad=True)
    u = torch.tensor(0.3, dtype=F64, requires_grad=True)
    sigma = u.detach().exp()
    return [loc, u], dist.Normal(loc, u.exp()), torch.diag(torch.stack(
        [sigma ** -2, torch.tensor(2.0, dtype=F64)]))


def _normal_softplus():
    """N(μ, σ²), σ = softplus(u), leaves (μ, u): in (μ, σ) F = diag(1/σ², 2/σ²), and
    dσ/du = sigmoid(u), so F = diag(1/σ², 2 sigmoid(u)²/σ²)."""
    loc = torch.tensor(-0.4, dtype=F64, requires_grad=True)
    u = torch.tensor(-0.5, dtype=F64, requires_grad=True)
    sigma = torch.nn.functional.softplus(u.detach())
    return [loc, u], dist.Normal(loc, torch.nn.functional.softplus(u)), torch.diag(torch.stack(
        [sigma ** -2, 2 * torch.sigmoid(u.detach()) ** 2 / sigma ** 2]))


def _gamma():
    """Gamma(α, β) (rate β), leaves (log α, log β): in (α, β) F = [[ψ′(α), −1/β], [−1/β, α/β²]];
    through diag(α, β), F = [[α²ψ′(α), −α], [−α, α]] (also checked against PulledBackFisher)."""
    leaves = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (0.8, -0.2)]
    fn = dist.Gamma(leaves[0].exp(), leaves[1].exp())
    a = leaves[0].detach().exp()
    exact = torch.stack([torch.stack([a ** 2 * torch.polygamma(1, a), -a]), torch.stack([-a, a])])
    pulled = PulledBackFisher([(family_of(fn), family_of(fn).args(fn), 1.0)], leaves).dense()
    torch.testing.assert_close(pulled.detach(), exact, rtol=1e-10, atol=1e-12)
    return leaves, fn, exact


def _mvn():
    """N(m, LLᵀ) in 2-D, leaves (m, L) with L's upper entry unused: the closed form from the
    family, pulled back; its (m, m) block is Σ⁻¹."""
    loc = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    tril = torch.tensor([[1.2, 0.0], [0.4, 0.6]], dtype=F64, requires_grad=True)
    fn = dist.MultivariateNormal(loc, scale_tril=tril.tril())
    exact = PulledBackFisher([(family_of(fn), family_of(fn).args(fn), 1.0)],
                             [loc, tril]).dense().detach()
    torch.testing.assert_close(exact[:2, :2], torch.linalg.inv(fn.covariance_matrix.detach()))
    return [loc, tril], fn, exact


CASES = {"normal_exp": _normal_exp, "normal_softplus": _normal_softplus, "gamma": _gamma,
         "mvn": _mvn}


def _products(fisher: MonteCarloFisher) -> torch.Tensor:
    """The S iid terms r_s r_sᵀ whose mean is F̂, shape (S, d, d)."""
    r = fisher.scores().flatten(0, 1).detach()
    return r[:, :, None] * r[:, None, :]


@pytest.mark.parametrize("case", CASES)
def test_entries_pass_a_z_test_and_a_chi_square_test_against_the_closed_form(case):
    """S = 20 000 draws. (1) Entrywise: |F̂_ij − F_ij| ≤ 5 SE_ij, SE_ij the sample standard error
    of the S terms r_i r_j (false failure ≈ 6e-7 per entry under the CLT). (2) Jointly: the unique
    entries with nonzero variance give T² = S dᵀ Ĉ⁻¹ d ~ χ²_k (Ĉ the sample covariance of the
    terms), required below χ²_k's 1 − 1e-4 quantile. Entries of zero variance (the MVN's unused
    upper entry of L) are exactly 0 = F. Measured max |z| 1.2–2.7; T² 2.3–10.6 for k = 3
    (threshold 21.1), 15.2 for the MVN's k = 15 (threshold 44.3)."""
    leaves, fn, exact = CASES[case]()
    fisher = MonteCarloFisher([("z", fn, 1.0)], leaves, 20_000)
    terms = _products(fisher)
    s = terms.shape[0]
    estimate, se = terms.mean(0), terms.std(0) / s ** 0.5
    torch.testing.assert_close(estimate, fisher.dense().detach())
    zero = se == 0
    assert (estimate[zero] == 0).all() and (exact[zero] == 0).all()
    z = (estimate - exact).abs()[~zero] / se[~zero]
    assert z.max() <= 5, z

    iu = torch.triu_indices(*exact.shape)
    keep = ~zero[iu[0], iu[1]]
    flat_terms = terms[:, iu[0], iu[1]][:, keep]
    d = (flat_terms.mean(0) - exact[iu[0], iu[1]][keep])
    cov = torch.cov(flat_terms.T).reshape(d.numel(), d.numel())
    t2 = float(s * d @ torch.linalg.solve(cov, d))
    k = d.numel()
    assert t2 <= chi2.ppf(1 - 1e-4, k), (t2, k)


@pytest.mark.parametrize("case", CASES)
def test_error_shrinks_like_one_over_root_samples_with_the_known_variance(case):
    """E‖F̂_S − F‖²_F = Σ_ij Var(r_i r_j)/S exactly (a mean of S iid terms). Over 32 seeds at
    S = 256 and 4096: the RMS error ratio is ≈ √(256/4096) = 0.25 (asserted in [0.15, 0.4]), and
    S·MSE matches Σ Var, estimated from 20 000 separate draws, within a factor in [0.5, 1.8] (a
    mean of 32 correlated χ²₁-like terms: below 0.5 or above 1.8 has probability < 1e-3 even with
    one dominant entry). Measured: ratio 0.247 (gamma) to 0.262; S·MSE/ΣVar 0.91 to 1.16."""
    leaves, fn, exact = CASES[case]()
    torch.manual_seed(100)
    total_var = float(_products(MonteCarloFisher([("z", fn, 1.0)], leaves, 20_000)).var(0).sum())
    rms = {}
    for samples in (256, 4096):
        sq = []
        for seed in range(32):
            torch.manual_seed(seed)
            fisher = MonteCarloFisher([("z", fn, 1.0)], leaves, samples)
            sq.append(float((fisher.dense().detach() - exact).square().sum()))
        mse = sum(sq) / len(sq)
        assert 0.5 <= samples * mse / total_var <= 1.8, (samples, samples * mse / total_var)
        rms[samples] = mse ** 0.5
    assert 0.15 <= rms[4096] / rms[256] <= 0.4, rms


# ----- the three forms ----------------------------------------------------------------------------
def _two_site_fisher(dtype, scale_b: float = 3.0, samples: int = 100) -> MonteCarloFisher:
    """A group of two coupled non-exponential-family sites (they share ``loc``), the second with
    ELBO scale ``scale_b``; 5 + 5 + 1 params."""
    loc = torch.linspace(-1, 1, 5, dtype=dtype).requires_grad_()
    u = torch.full((5,), -0.2, dtype=dtype, requires_grad=True)
    w = torch.tensor([0.4], dtype=dtype, requires_grad=True)
    a = dist.StudentT(4.0, loc, u.exp()).to_event(1)
    b = dist.TransformedDistribution(dist.Normal(loc, 1.0), [
        dist.transforms.AffineTransform(w, w.exp()), dist.transforms.SigmoidTransform()
    ]).to_event(1)
    return MonteCarloFisher([("a", a, 1.0), ("b", b, scale_b)], [loc, u, w], samples)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mvp_diag_and_trace_agree_with_the_dense_matrix(dtype):
    """From the same draws: mvp(v) = F̂v, diag() = diag F̂, trace() = tr F̂ (exact once the scores
    exist), F̂ symmetric PSD. Before the scores exist trace() is Hutchinson's estimate with 8
    Rademacher probes, whose variance is known: Var = 2(‖F̂‖²_F − Σ F̂_ii²)/8; it must lie within
    5 of its standard deviations of tr F̂ (measured: 1.2 sd off in float32, 0.5 in float64)."""
    fisher = _two_site_fisher(dtype)
    hutchinson = float(fisher.trace())
    dense = fisher.dense().detach()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for v in torch.randn(3, dense.shape[0], dtype=dtype):
        torch.testing.assert_close(fisher.mvp(v).detach(), dense @ v, **tol)
    torch.testing.assert_close(fisher.diag().detach(), dense.diagonal(), **tol)
    torch.testing.assert_close(fisher.trace().detach(), dense.trace(), **tol)
    torch.testing.assert_close(dense, dense.T)
    assert torch.linalg.eigvalsh(dense.double()).min() >= -1e-5 * float(dense.trace())
    sd = (2 * (dense.square().sum() - dense.diagonal().square().sum()) / 8).sqrt()
    assert abs(hutchinson - float(dense.trace())) <= 5 * float(sd), (hutchinson, dense.trace(), sd)


def test_site_scale_multiplies_its_fisher():
    """A site of ELBO scale c contributes c·F̂ (its score rows are √c·∇log q): on the same draws
    (same seed) the scale-3 group's F̂ minus the scale-1 group's is exactly 2·F̂_b, and F̂ is the sum
    of its sites' score Gram matrices."""
    torch.manual_seed(5)
    one = _two_site_fisher(F64, scale_b=1.0)
    torch.manual_seed(5)
    three = _two_site_fisher(F64, scale_b=3.0)
    r_b = one.scores()[:, 1].detach()
    f_b = r_b.T @ r_b / one.num_samples
    torch.testing.assert_close(three.dense() - one.dense(), 2 * f_b)
    r = three.scores().detach()
    by_site = sum(r[:, k].T @ r[:, k] for k in range(2)) / three.num_samples
    torch.testing.assert_close(three.dense().detach(), by_site)


# ----- fisher="auto" per site, and its summary ----------------------------------------------------
def _two_latent_model():
    pyro.sample("a", dist.Normal(1.0, 2.0))
    pyro.sample("b", dist.Normal(-1.0, 0.5))


def _normal_and_student_t_guide():
    pyro.sample("a", dist.Normal(pyro.param("a_loc", torch.tensor(0.0)),
                                 pyro.param("a_scale", torch.tensor(1.0), constraints.positive)))
    pyro.sample("b", dist.StudentT(4.0, pyro.param("b_loc", torch.tensor(0.0)),
                                   pyro.param("b_scale", torch.tensor(1.0), constraints.positive)))


def _summary_rows(opt) -> dict[str, tuple[str, str]]:
    """site -> (distribution, method), parsed from summary()'s table (a row per param)."""
    lines = opt.summary().splitlines()
    assert lines[0].split() == ["param", "site", "distribution", "method"]
    return {line.split()[1]: tuple(line.split()[2:4]) for line in lines[1:]}


@pytest.mark.parametrize("kwargs, expected", [
    ({}, {"a": "natural", "b": "monte_carlo"}),
    ({"mirror": None}, {"a": "closed_form", "b": "monte_carlo"}),
    ({"fisher": "monte_carlo"}, {"a": "monte_carlo", "b": "monte_carlo"}),
])
def test_auto_picks_the_closed_form_or_monte_carlo_per_site_and_says_so(kwargs, expected):
    """One SVI step, then summary() names each site, its distribution and its method, and
    last_step agrees: the Normal site uses the closed form (natural step, or the pulled-back
    Fisher in parameter space), the Student-t site the Monte Carlo Fisher."""
    guide = record_args(_normal_and_student_t_guide)
    opt = NaturalGradient(guide, **kwargs)
    SVI(_two_latent_model, guide, opt, Trace_ELBO(num_particles=8, vectorize_particles=True)).step()
    rows = _summary_rows(opt)
    assert rows == {"a": ("Normal", expected["a"]), "b": ("StudentT", expected["b"])}
    assert {k: v["method"] for k, v in opt.last_step.items()} == expected


def test_exact_fisher_refuses_a_student_t_site_by_name():
    guide = record_args(_normal_and_student_t_guide)
    svi = SVI(_two_latent_model, guide, NaturalGradient(guide, fisher="exact"), Trace_ELBO())
    with pytest.raises(ValueError, match=r"fisher='exact'.*\['b'\]"):
        svi.step()


def test_flow_guide_uses_monte_carlo():
    """AutoIAFNormal's one latent site is a TransformedDistribution over network weights."""
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = AutoIAFNormal(model, hidden_dim=[6])
    opt = NaturalGradient(guide)
    SVI(model, guide, opt, Trace_ELBO(num_particles=4, vectorize_particles=True)).step()
    assert _summary_rows(opt) == {
        "_AutoIAFNormal_latent": ("TransformedDistribution", "monte_carlo")}
    step = opt.last_step["_AutoIAFNormal_latent"]
    assert step["method"] == "monte_carlo" and math.isfinite(step["kl"])


@pytest.mark.parametrize("transform", ["block_autoregressive", "neural_autoregressive"])
def test_a_flow_without_an_inverse_is_named_and_fits_under_wasserstein_gradient(transform):
    """Pyro's block and neural autoregressive flows have a log-density only at their own latest
    sample (a KeyError from BNAF's cache, a bare NotImplementedError from NAF): the natural
    gradient's Monte Carlo Fisher cannot have its score, and says so naming the site and the
    transform; WassersteinGradient, which reads draws only, steps the same guide."""
    from functools import partial

    from pyro.distributions import transforms
    from pyro.infer.autoguide import AutoNormalizingFlow

    from pyro_natgrad import WassersteinGradient

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    make = getattr(transforms, transform)
    name = "BlockAutoregressive" if transform.startswith("block") else "NeuralAutoregressive"
    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(model, partial(transforms.iterated, 1, make))
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    with pytest.raises(ValueError, match=rf"site '_AutoNormalizingFlow_latent'.*\({name}\).*"
                                         "fresh draw.*inverse"):
        SVI(model, guide, NaturalGradient(guide), elbo).step()
    opt = WassersteinGradient(guide)
    losses = [SVI(model, guide, opt, elbo).step() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses) and opt.last_step


# ----- fits through plain SVI, against the best Adam --------------------------------------------
def _neg_elbo(model, guide, data) -> tuple[float, float]:
    """−ELBO from 8 × 500 particles, and its standard error."""
    elbo = Trace_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        values = torch.tensor([elbo.loss(model, guide, *data) for _ in range(8)], dtype=F64)
    return float(values.mean()), float(values.std() / 8 ** 0.5)


def _fit(model, make_guide, make_optim, data, steps: int, particles: int = 16, seed: int = 0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide()
    optim = make_optim(guide)
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=particles, vectorize_particles=True,
                                              max_plate_nesting=1))
    for _ in range(steps):
        svi.step(*data)
    return guide, optim, _neg_elbo(model, guide, data)


def _breast_cancer(features: int = 4, rows: int = 100):
    """The first ``rows`` patients of scikit-learn's breast cancer data, ``features`` standardized
    features, in float64."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = torch.tensor(data.data[:rows, :features], dtype=F64)
    return (X - X.mean(0)) / X.std(0), torch.tensor(data.target[:rows], dtype=F64)


def _logistic_model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1] + 1), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(logits=(X * w[..., 1:]).sum(-1) + w[..., 0]), obs=y)


def test_flow_guide_fits_breast_cancer_logistic_regression_as_well_as_the_best_adam():
    """Bayesian logistic regression (4 standardized features + intercept, 100 patients of
    scikit-learn's breast cancer data), AutoIAFNormal (one MADE layer of 8 hidden units, 138
    weights: 276 Fisher draws by default, dense form), 16 particles; −ELBO from 4000 particles
    (SE ≈ 0.02). Asserted (seed 0): NaturalGradient() after 100 steps is at least as good as the
    best Adam lr ∈ {0.01, 0.03, 0.1} after the same 100 steps, and ≥ 0.3 nats ahead of lr=0.01.

    Measured −ELBO at 100 steps, seeds 0–4: NG 32.27 / 32.28 / 32.20 / 32.21 / 32.19; best Adam
    32.70 / 32.47 / 32.66 / 32.76 / 32.48. (Before the sampled-KL check and the 2n-draw default,
    with a 64-draw diagonal Fisher: NG 32.82 / 32.53 / 33.82 / 32.56 / 32.54, behind the best
    Adam on 4 of 5 seeds.)"""
    data = _breast_cancer()
    steps = 100
    make_guide = lambda: AutoIAFNormal(_logistic_model, hidden_dim=[8])  # noqa: E731
    _, opt, (ng, _) = _fit(_logistic_model, make_guide, NaturalGradient, data, steps)
    assert _summary_rows(opt)["_AutoIAFNormal_latent"][1] == "monte_carlo"
    adam = {lr: _fit(_logistic_model, make_guide, lambda g, lr=lr: pyro.optim.Adam({"lr": lr}),
                     data, steps)[2][0] for lr in (0.01, 0.03, 0.1)}
    assert ng <= min(adam.values()), (ng, adam)
    assert ng <= adam[0.01] - 0.3, (ng, adam)


def _robust_regression():
    """y = Xw + 0.5·t₂ noise (heavy-tailed), 60 points, 4 weights (its own generator)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 4, generator=g, dtype=F64)
    chi2_2 = torch.randn(60, 2, generator=g, dtype=F64).square().sum(-1)
    noise = torch.randn(60, generator=g, dtype=F64) / (chi2_2 / 2).sqrt()  # t₂ draws
    y = X @ torch.tensor([1.5, -1.0, 0.5, 0.0], dtype=F64) + 0.5 * noise
    return X, y


def _robust_model(X, y):
    w = pyro.sample("w", dist.Normal(X.new_zeros(4), 2.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.StudentT(2.0, (X * w).sum(-1), 0.5), obs=y)


def _student_t_guide(X, y):
    """A Student-t guide whose degrees of freedom are learned too."""
    df = pyro.param("df", X.new_tensor(10.0), constraints.positive)
    pyro.sample("w", dist.StudentT(df, pyro.param("loc", X.new_zeros(4)),
                                   pyro.param("scale", X.new_ones(4), constraints.positive)
                                   ).to_event(1))


def test_student_t_guide_with_learned_df_fits_in_a_quarter_of_adams_steps():
    """Robust regression (Student-t likelihood, 60 points, 4 weights), a Student-t guide with
    learned df (not an exponential family: Monte Carlo Fisher over loc, scale, df), 16 particles,
    seed 0; −ELBO from 4000 particles (SE ≈ 0.01–0.02). NaturalGradient() at 20 steps must be at
    least as good as the best Adam lr ∈ {0.03, 0.1, 0.3} at 80 steps, within 0.1 nats.

    Measured −ELBO (seed 0 / seed 1), NG at 10/20/40/80 steps, Adam at 20/40/80/160 steps:
      NaturalGradient():  73.63/73.58/73.55/73.55  |  73.84/73.65/73.68/73.57
      Adam lr=0.01:       195.4/175.6/139.1/89.22  |  194.6/177.2/138.8/89.78
      Adam lr=0.03:       158.1/108.5/78.41/73.92  |  158.9/108.8/78.12/74.02
      Adam lr=0.1:        84.42/75.74/73.63/73.85  |  84.06/75.45/73.58/73.81
      Adam lr=0.3:        79.54/74.93/73.76/73.80  |  80.44/74.93/73.86/73.66
    NG at 20 steps vs the best Adam at 80: −0.05 (seed 0), +0.07 (seed 1) nats; at 160: NG
    ahead on both. Runtime ≈ 0.8 s."""
    data = _robust_regression()
    guide = record_args(_student_t_guide)
    _, opt, (ng, ng_se) = _fit(_robust_model, lambda: guide, NaturalGradient, data, 20)
    assert opt.last_step["w"]["method"] == "monte_carlo"
    assert set(opt._groups[0].param_names) == {"df", "loc", "scale"}
    adam = {lr: _fit(_robust_model, lambda: guide, lambda g, lr=lr: pyro.optim.Adam({"lr": lr}),
                     data, 80)[2] for lr in (0.03, 0.1, 0.3)}
    best, best_se = min(adam.values())
    assert ng <= best + 0.1, (ng, ng_se, best_se, adam)


# ----- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: FisherSolve(num_samples=0), "num_samples"),
    (lambda: FisherSolve(num_samples=-4), "num_samples"),
    (lambda: FisherSolve(num_samples=2.5), "num_samples"),
    (lambda: FisherSolve(damping=-1e-3), "damping"),
    (lambda: FisherSolve(damping=float("nan")), "damping"),
    (lambda: FisherSolve(relative_damping=-0.1), "relative_damping"),
    (lambda: FisherSolve(cg_iters=0), "cg_iters"), (lambda: FisherSolve(dense_max=-1), "dense_max"),
    (lambda: FisherSolve(cg_rtol=-1e-3), "cg_rtol"),
    (lambda: FisherSolve(cg_rtol=float("nan")), "cg_rtol"),
    (lambda: FisherAverage(-0.5), "FisherAverage decay"),
    (lambda: FisherAverage(1.0), "FisherAverage decay"),
    (lambda: FisherSolve(form="inverse"), "form"),
    (lambda: NaturalGradient(record_args(_normal_and_student_t_guide), fisher="mc"), "fisher"),
    (lambda: NaturalGradient(record_args(_normal_and_student_t_guide), num_samples=0),
     "num_samples"),
])
def test_bad_options_raise_value_errors_naming_them(make, match):
    with pytest.raises(ValueError, match=f"^{match} "):
        make()


def test_bad_monte_carlo_fisher_input_is_named():
    loc = torch.tensor(0.0, requires_grad=True)
    for samples in (0, -1, 3.0):
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            MonteCarloFisher([("z", dist.Normal(loc, 1.0), 1.0)], [loc], samples)
    with pytest.raises(ValueError, match="at least one guide site"):
        MonteCarloFisher([], [loc], 8)


class _DetachedStudentT(dist.StudentT):
    """A custom distribution whose log-density drops the graph (e.g. computed outside torch)."""

    def log_prob(self, value):
        return super().log_prob(value).detach()


def test_non_differentiable_log_prob_is_named_on_the_svi_step():
    """The Monte Carlo Fisher needs ∇θ log q; a log_prob without a graph is an error naming the
    site (its samples still depend on the params, so the site is not silently dropped)."""
    def guide():
        pyro.sample("a", dist.Normal(pyro.param("a_loc", torch.tensor(0.0)), 1.0))
        pyro.sample("b", _DetachedStudentT(4.0, pyro.param("b_loc", torch.tensor(0.0)),
                                           pyro.param("b_scale", torch.tensor(1.0),
                                                      constraints.positive)))
    guide = record_args(guide)
    for fisher in ("auto", "monte_carlo"):
        svi = SVI(_two_latent_model, guide, NaturalGradient(guide, fisher=fisher), Trace_ELBO())
        with pytest.raises(ValueError, match=r"guide site 'b'.*not differentiable"):
            svi.step()


class _LocDetachedNormal(dist.Normal):
    """A log-density that drops the graph through ``loc`` only (``scale`` still has one)."""

    def log_prob(self, value):
        return dist.Normal(self.loc.detach(), self.scale).log_prob(value)


def test_log_prob_not_differentiable_in_one_param_is_named():
    """A log-density that ignores 'loc' although the samples move with it: the score would miss
    'loc' (and the param would silently go to the base optimizer); the reader names it."""
    def model():
        pyro.sample("z", dist.Normal(3.0, 1.0))

    def guide():
        pyro.sample("z", _LocDetachedNormal(pyro.param("loc", torch.tensor(0.0)),
                                            pyro.param("scale", torch.tensor(1.0),
                                                       constraints.positive)))
    guide = record_args(guide)
    svi = SVI(model, guide, NaturalGradient(guide, fisher="monte_carlo"), Trace_ELBO())
    with pytest.raises(ValueError, match=r"guide site 'z'.*loc"):
        svi.step()


@pytest.mark.parametrize("make_guide", ["no_params", "auto_delta"])
def test_guide_without_continuous_distribution_params_is_a_clear_error(make_guide):
    """A guide whose sites depend on no param, or only point masses (AutoDelta): nothing to
    precondition, and the error says so and points to a plain Pyro optimizer."""
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    if make_guide == "no_params":
        guide = record_args(lambda: pyro.sample("z", dist.Normal(0.0, 1.0)))
    else:
        guide = AutoDelta(model)
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with pytest.raises(ValueError, match="no latent sample site whose distribution depends on a "
                                         "continuous param.*pyro.optim.Adam"):
        svi.step()


def test_an_auto_structured_guide_is_named_as_implicit_alone_or_in_a_guide_list():
    """AutoStructured's latent sites are point masses at values built from N(0, 1) auxiliary
    draws: alone it is refused as implicit (it was called a guide of point masses); as part of
    an AutoGuideList beside AutoNormal, the warning says its params go to the base optimizer."""
    from pyro.infer.autoguide import AutoGuideList, AutoNormal, AutoStructured

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    guide = AutoStructured(model, conditionals="normal")
    with pytest.raises(ValueError, match=r"\['a', 'b'\] are point masses.*\['a_aux', 'b_aux'\]"
                                         ".*AutoStructured.*implicit"):
        SVI(model, guide, NaturalGradient(guide), Trace_ELBO()).step()
    pyro.clear_param_store()
    guide = AutoGuideList(model)
    guide.append(AutoStructured(pyro.poutine.block(model, expose=["a"]), conditionals="mvn"))
    guide.append(AutoNormal(pyro.poutine.block(model, expose=["b"])))
    svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO())
    with pytest.warns(UserWarning, match=r"\['a'\] are point masses.*stepped by the base"):
        svi.step()
    svi.step()  # warned once


@pytest.mark.parametrize("parameterization", ["probs", "logits"])
def test_categorical_guide_with_a_continuous_param_is_stepped(parameterization):
    """A discrete site whose probabilities are a continuous param is an exponential family (the
    library registers Categorical), so NaturalGradient should step it."""
    def model():
        pyro.sample("c", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])))

    def guide():
        if parameterization == "probs":
            p = pyro.param("p", torch.ones(3) / 3, constraints.simplex)
            pyro.sample("c", dist.Categorical(probs=p))
        else:
            pyro.sample("c", dist.Categorical(logits=pyro.param("p", torch.zeros(3))))
    guide = record_args(guide)
    opt = NaturalGradient(guide)
    SVI(model, guide, opt, Trace_ELBO(num_particles=8)).step()
    assert opt.last_step["c"]["method"] in ("natural", "closed_form")


# ----- rank deficiency ----------------------------------------------------------------------------
def _wide_student_t():
    """50 Student-t coordinates (100 params) far from N(0, I)."""
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(50), 1.0).to_event(1))

    def guide():
        pyro.sample("z", dist.StudentT(4.0, pyro.param("loc", torch.full((50,), 2.0)),
                                       pyro.param("scale", torch.full((50,), 0.1),
                                                  constraints.positive)).to_event(1))
    return model, record_args(guide)


def _record_solves(monkeypatch) -> list[dict]:
    calls = []
    solve = natural_module.solve_metric

    def recording(metric, g, form, damping, cg_iters, rtol):
        direction = solve(metric, g, form, damping, cg_iters, rtol)
        calls.append({"form": form, "damping": damping, "norm": float(direction.norm())})
        return direction

    monkeypatch.setattr(natural_module, "solve_metric", recording)
    return calls


@pytest.mark.parametrize("num_samples, form", [(16, "diag"), (128, "dense")])
def test_default_form_is_the_diagonal_when_draws_are_fewer_than_params(monkeypatch, num_samples,
                                                                       form):
    """100 params: 16 draws span at most 16 directions, so the default solve is diagonal; 128
    draws give the dense solve. Thirty steps stay finite, keep the scales positive and lower the
    loss (the −ELBO from 2,000 draws at the end, not the last step's 8-draw estimate)."""
    calls = _record_solves(monkeypatch)
    model, guide = _wide_student_t()
    opt = NaturalGradient(guide, fisher="monte_carlo", num_samples=num_samples)
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=8, vectorize_particles=True))
    losses = [svi.step() for _ in range(30)]
    assert {c["form"] for c in calls} == {form}
    final = Trace_ELBO(num_particles=2000, vectorize_particles=True).loss(model, guide)
    assert all(math.isfinite(x) for x in losses) and final < losses[0] - 100, (losses[0], final)
    assert (pyro.param("scale") > 0).all() and torch.isfinite(pyro.param("loc")).all()


def test_rank_deficient_cg_step_is_bounded_by_relative_damping(monkeypatch):
    """form="cg" with 16 draws for 100 params: the default relative damping (1e-2·tr F̂/100) keeps
    the first direction's norm within 100× the diagonal solve's, and every step's KL (from the
    damped quadratic model) finite and within the trust region (≤ ½·100 = 50), params in their
    support. With relative_damping=0 (λ = 1e-6 alone) the direction along unseen directions is
    ~10⁵× longer: the damping is what bounds it. Measured first-direction norms: diag 5.2, cg
    default 40, cg without relative damping 1.4e7 (whose fit then goes non-finite). The KL cap
    asserted is the code's ½·n = 50 for first-order steps (measured max KL: diag 28, cg 50, the
    trust region's bound)."""
    calls = _record_solves(monkeypatch)
    model, guide = _wide_student_t()
    norms = {}
    for name, kwargs in [("diag", {}), ("cg", {"form": "cg"}),
                         ("cg0", {"form": "cg", "relative_damping": 0.0})]:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        calls.clear()
        opt = NaturalGradient(guide, fisher="monte_carlo", solve=FisherSolve(num_samples=16,
                                                                             **kwargs))
        svi = SVI(model, guide, opt, Trace_ELBO(num_particles=8, vectorize_particles=True))
        losses, steps = [], []
        with warnings.catch_warnings():  # cg0's undamped first step is refused: no valid length
            warnings.simplefilter("ignore" if name == "cg0" else "error", StepRefusedWarning)
            for _ in range(1 if name == "cg0" else 20):
                losses.append(svi.step())
                steps.append(opt.last_step["z"])
        norms[name] = calls[0]["norm"]
        if name == "cg0":
            continue
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
        taken = [s for s in steps if s["method"] == "monte_carlo"]  # others: undone (rejected)
        assert len(taken) >= 10 and {s["method"] for s in steps} <= {"monte_carlo", "undone"}
        assert all(math.isfinite(s["kl"]) and 0 <= s["kl"] <= 50.0 for s in taken), steps
        assert (pyro.param("scale") > 0).all() and torch.isfinite(pyro.param("loc")).all()
    assert norms["cg"] <= 100 * norms["diag"], norms
    assert norms["cg0"] >= 100 * norms["cg"], norms


# ----- the running average's state --------------------------------------------------------------
def _student_t_3d():
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def guide():
        pyro.sample("z", dist.StudentT(4.0, pyro.param("loc", torch.ones(3)),
                                       pyro.param("scale", torch.ones(3), constraints.positive)
                                       ).to_event(1))
    return model, record_args(guide)


def _averaged(decay: float) -> FisherSolve:
    return FisherSolve(num_samples=64, average=FisherAverage(decay) if decay else None)


def _resume(decay: float, fresh: bool) -> tuple[dict, dict, NaturalGradient]:
    """Three steps, a checkpoint (optimizer state, params), a fourth step at seed 7; then back to
    the checkpoint in a fresh (or the same) optimizer and the fourth step again at seed 7.
    Returns both fourth-step params, and the resumed optimizer."""
    model, guide = _student_t_3d()
    make = lambda: NaturalGradient(guide, solve=_averaged(decay))  # noqa: E731
    opt = make()
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=4))
    for _ in range(3):
        svi.step()
    state = opt.get_state()
    saved = {n: u.detach().clone() for n, u in pyro.get_param_store().named_parameters()}
    pyro.set_rng_seed(7)
    svi.step()
    first = {n: pyro.param(n).detach().clone() for n in ("loc", "scale")}
    with torch.no_grad():  # back to the params of step 3 (unconstrained, in place)
        for n, u in pyro.get_param_store().named_parameters():
            u.copy_(saved[n])
    resumed = make() if fresh else opt
    resumed.set_state(state)
    pyro.set_rng_seed(7)
    SVI(model, guide, resumed, Trace_ELBO(num_particles=4)).step()
    return first, {n: pyro.param(n).detach().clone() for n in first}, resumed


def test_averaged_fisher_survives_a_state_round_trip_exactly():
    """fisher_decay=0.9 keeps G ← 0.9·G + 0.1·F̂ per group (dense here: 64 draws ≥ 6 params).
    get_state/set_state into a fresh optimizer restores the average bit for bit, as its own copy;
    restoring the state into the same optimizer replays the next step bit for bit (so everything
    the step reads is in the state)."""
    model, guide = _student_t_3d()
    opt = NaturalGradient(guide, solve=_averaged(0.9))
    svi = SVI(model, guide, opt, Trace_ELBO(num_particles=4))
    for _ in range(3):
        svi.step()
    state = opt.get_state()
    (key, average), = state["pieces"]["fisher_average"]["matrices"].items()
    assert set(key) == {"loc", "scale"} and average.shape == (6, 6)
    assert torch.isfinite(average).all()
    svi.step()
    assert not torch.equal(opt.get_state()["pieces"]["fisher_average"]["matrices"][key],
                           average)

    resumed = NaturalGradient(guide, solve=_averaged(0.9))
    resumed.set_state(state)
    saved = average.clone()
    average.add_(1.0)  # the resumed optimizer must hold its own copy
    assert torch.equal(resumed.get_state()["pieces"]["fisher_average"]["matrices"][key], saved)

    pyro.clear_param_store()
    first, again, _ = _resume(0.9, fresh=False)
    for n, value in first.items():
        assert torch.equal(again[n], value), n


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_fresh_optimizer_resumed_from_state_takes_the_identical_step(decay):
    first, again, _ = _resume(decay, fresh=True)
    for n, value in first.items():
        assert torch.equal(again[n], value), n


# ----- the benchmark's robust regression (benchmarks/problems.py) --------------------------------
def _benchmark_robust_regression():
    from benchmarks.problems import robust_regression, studentt_guide

    model, data = robust_regression()
    return model, data, studentt_guide


def test_benchmark_student_t_guide_fits_in_fewer_steps_than_the_best_adam():
    """The benchmark's robust regression with its Student-t guide (df 5 fixed; the Monte Carlo
    Fisher), 16 particles: NaturalGradient's defaults after 25 steps are within 0.5 nats of the
    best of Adam lr ∈ {0.01, 0.03, 0.1} after 100 steps (measured: NG 111.69; Adam 229.91 /
    117.72 / 111.65)."""
    model, data, guide = _benchmark_robust_regression()
    _, opt, (ng, _) = _fit(model, lambda: record_args(guide), NaturalGradient, data, 25)
    assert _summary_rows(opt)["w"][1] == "monte_carlo"
    adam = {lr: _fit(model, lambda: record_args(guide),
                     lambda g, lr=lr: pyro.optim.Adam({"lr": lr}), data, 100)[2][0]
            for lr in (0.01, 0.03, 0.1)}
    assert ng <= min(adam.values()) + 0.5, (ng, adam)


def test_benchmark_flow_guide_ends_as_low_as_the_best_adam():
    """The same regression with AutoIAFNormal (8 hidden units; its Fisher lives on the MADE
    weights, so only the Monte Carlo estimate exists), seeds 0–3: the median −ELBO after 150
    steps of NaturalGradient's defaults is within 0.5 nats of the best median of Adam
    lr ∈ {0.01, 0.03, 0.1} (measured: NG 132.1 / 111.47 / 111.48 / 111.47 — seed 0 crawls in a
    region where the damped Fisher step is small; Adam lr 0.1 111.5–111.6). The benchmark
    measures the steps (22 vs 68 for the best Adam in its protocol)."""
    model, data, _ = _benchmark_robust_regression()

    def make_guide():
        return AutoIAFNormal(model, hidden_dim=[8])

    def median(make_optim):
        return float(np.median([_fit(model, make_guide, make_optim, data, 150, seed=seed)[2][0]
                                for seed in range(4)]))

    ng = median(NaturalGradient)
    adam = {lr: median(lambda g, lr=lr: pyro.optim.Adam({"lr": lr})) for lr in (0.01, 0.03, 0.1)}
    assert ng <= min(adam.values()) + 0.5, (ng, adam)
