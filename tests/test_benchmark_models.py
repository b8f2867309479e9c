"""The posteriordb models of ``benchmarks/models``: they load, their Pyro log density equals the
Stan program's (computed independently with numpy/scipy from the raw data), it is finite at the
reference mean, vectorized particles give the same per-particle densities as single draws, and,
for the near-Gaussian regressions, the reference mean is a stationary point of the log density
(a Newton step from it is a small fraction of a reference sd) whose Laplace sds match the
reference sds."""

from __future__ import annotations

import functools
import json

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from scipy import stats

from benchmarks.models import MODELS, POSTERIORS, ROOT, moment_error, read_data, reference

REGRESSIONS = ["sblrc-blr", "arK-arK", "diamonds-diamonds"]


@functools.cache
def _posterior(name):
    return POSTERIORS[name]()


def _scalarize(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.reshape(()) if v.numel() == 1 else v for k, v in values.items()}


def latent_point(name: str, values: dict[str, torch.Tensor], data) -> dict[str, torch.Tensor]:
    """The model's sample-site values for reference-named parameter values (the non-centred
    models sample theta_trans / f_tilde, the reference reports theta / f)."""
    values = _scalarize(values)
    if name == "eight_schools-eight_schools_noncentered":
        theta = values.pop("theta")
        values["theta_trans"] = (theta - values["mu"]) / values["tau"]
    elif name == "gp_pois_regr-gp_pois_regr":
        x = data[0]
        cov = values["alpha"] ** 2 * torch.exp(-(x[:, None] - x) ** 2 / (2 * values["rho"] ** 2))
        chol = torch.linalg.cholesky(cov + 1e-10 * torch.eye(len(x), dtype=x.dtype))
        values["f_tilde"] = torch.linalg.solve_triangular(chol, values.pop("f")[:, None],
                                                          upper=False)[:, 0]
    return values


def log_joint(model, data, values) -> torch.Tensor:
    return poutine.trace(poutine.condition(model, values)).get_trace(*data).log_prob_sum()


def _at_reference_mean(name):
    post = _posterior(name)
    means = {k: m for k, (m, _) in post.reference.items()}
    return post, means, latent_point(name, means, post.data)


@pytest.mark.parametrize("name", list(MODELS))
def test_loads_with_reference_for_every_parameter(name):
    post = POSTERIORS[name]()
    info = json.loads((ROOT / name / "posterior.json").read_text())
    assert {k: v[0].numel() for k, v in post.reference.items()} == info["dimensions"]
    assert all(t.dtype == torch.float64 for t in post.data)
    post32 = POSTERIORS[name](torch.float32)
    assert all(t.dtype == torch.float32 for t in post32.data)
    point32 = {k: v.float() for k, v in _at_reference_mean(name)[2].items()}
    assert torch.isfinite(log_joint(post32.model, post32.data, point32))
    assert all(bool((sd > 0).all()) for _, sd in post.reference.values())
    assert moment_error(post.reference, post.reference) == (0.0, 0.0)


def test_centered_eight_schools_uses_the_noncentered_reference():
    ref_c = reference("eight_schools-eight_schools_centered")
    ref_nc = reference("eight_schools-eight_schools_noncentered")
    assert all(torch.equal(ref_c[k][i], ref_nc[k][i]) for k in ref_nc for i in range(2))


def _stan_log_density(name: str, v: dict[str, np.ndarray]) -> float:
    """The Stan program's target (constants included; ``<lower=0>`` priors normalized over the
    half line), written from the Stan code and the raw data with numpy/scipy."""
    d = read_data(name)
    if name == "sblrc-blr":
        X, y = np.array(d["X"]), np.array(d["y"])
        return (stats.norm.logpdf(v["beta"], 0, 10).sum() + stats.halfnorm.logpdf(v["sigma"], 0, 10)
                + stats.norm.logpdf(y, X @ v["beta"], v["sigma"]).sum())
    if name == "arK-arK":
        y, K = d["y"], d["K"]
        lik = sum(stats.norm.logpdf(y[t], v["alpha"] + sum(v["beta"][k - 1] * y[t - k]
                                                           for k in range(1, K + 1)), v["sigma"])
                  for t in range(K, d["T"]))
        return (stats.norm.logpdf(v["alpha"], 0, 10) + stats.norm.logpdf(v["beta"], 0, 10).sum()
                + stats.halfcauchy.logpdf(v["sigma"], 0, 2.5) + lik)
    if name == "diamonds-diamonds":
        X, Y = np.array(d["X"]), np.array(d["Y"])
        Xc = X[:, 1:] - X[:, 1:].mean(0)
        return (stats.norm.logpdf(v["b"], 0, 1).sum() + stats.t.logpdf(v["Intercept"], 3, 8, 10)
                + stats.t.logpdf(v["sigma"], 3, 0, 10) - stats.t.logsf(0, 3, 0, 10)
                + stats.norm.logpdf(Y, v["Intercept"] + Xc @ v["b"], v["sigma"]).sum())
    y, sigma = np.array(d.get("y", [])), np.array(d.get("sigma", []))
    if name == "eight_schools-eight_schools_centered":
        return (stats.halfcauchy.logpdf(v["tau"], 0, 5) + stats.norm.logpdf(v["mu"], 0, 5)
                + stats.norm.logpdf(v["theta"], v["mu"], v["tau"]).sum()
                + stats.norm.logpdf(y, v["theta"], sigma).sum())
    if name == "eight_schools-eight_schools_noncentered":
        theta = v["theta_trans"] * v["tau"] + v["mu"]
        return (stats.halfcauchy.logpdf(v["tau"], 0, 5) + stats.norm.logpdf(v["mu"], 0, 5)
                + stats.norm.logpdf(v["theta_trans"], 0, 1).sum()
                + stats.norm.logpdf(y, theta, sigma).sum())
    x, k = np.array(d["x"], dtype=float), np.array(d["k"])
    cov = v["alpha"] ** 2 * np.exp(-(x[:, None] - x) ** 2 / (2 * v["rho"] ** 2))
    f = np.linalg.cholesky(cov + 1e-10 * np.eye(len(x))) @ v["f_tilde"]
    return (stats.gamma.logpdf(v["rho"], 25, scale=1 / 4) + stats.halfnorm.logpdf(v["alpha"], 0, 2)
            + stats.norm.logpdf(v["f_tilde"]).sum() + stats.poisson.logpmf(k, np.exp(f)).sum())


@pytest.mark.parametrize("name", list(MODELS))
def test_log_density_matches_the_stan_program(name):
    post, _, point = _at_reference_mean(name)
    ours = log_joint(post.model, post.data, point)
    assert torch.isfinite(ours)
    expected = _stan_log_density(name, {k: v.numpy() for k, v in point.items()})
    assert float(ours) == pytest.approx(expected, rel=1e-9, abs=1e-8)


@pytest.mark.parametrize("name", list(MODELS))
def test_vectorized_particles_match_single_draws(name):
    """Three particles in a plate left of the model's plates (as Trace_ELBO vectorizes them)
    have the densities of the three draws taken one at a time."""
    post, _, point = _at_reference_mean(name)
    g = torch.Generator().manual_seed(0)
    draws = [{k: v * (1 + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype))
              for k, v in point.items()} for _ in range(3)]
    single = torch.stack([log_joint(post.model, post.data, d) for d in draws])
    trace = poutine.trace(poutine.condition(post.model, point)).get_trace(*post.data)
    nesting = max([-f.dim for s in trace.nodes.values() if s["type"] == "sample"
                   for f in s["cond_indep_stack"]], default=0)
    batch_dims = {k: trace.nodes[k]["value"].dim() - trace.nodes[k]["fn"].event_dim
                  for k in point}
    stacked = {k: torch.stack([d[k] for d in draws]).reshape(
        3, *[1] * (nesting - batch_dims[k]), *v.shape) for k, v in point.items()}
    with pyro.plate("particles", 3, dim=-(nesting + 1)):
        trace = poutine.trace(poutine.condition(post.model, stacked)).get_trace(*post.data)
    trace.compute_log_prob()
    vectorized = sum(s["log_prob"].expand(3, *s["log_prob"].shape[1:]).reshape(3, -1).sum(1)
                     for s in trace.nodes.values() if s["type"] == "sample")
    torch.testing.assert_close(vectorized, single, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("name", REGRESSIONS)
def test_reference_mean_is_stationary_with_reference_curvature(name):
    """Near-Gaussian posteriors: −H⁻¹∇log p at the reference mean (the distance to the mode) is
    < 0.1 reference sd for every coefficient; sigma's mode lies below its mean (skew: about
    (D + 1)/√(2N) sd), so it gets 1 sd. The Laplace sds are within 10% of the reference sds."""
    post = _posterior(name)
    sites = list(post.reference)
    sizes = [post.reference[s][0].numel() for s in sites]
    mean = torch.cat([post.reference[s][0] for s in sites])
    sd = torch.cat([post.reference[s][1] for s in sites])

    def logp(v):
        return log_joint(post.model, post.data, _scalarize(dict(zip(sites, v.split(sizes),
                                                                     strict=True))))

    grad = torch.autograd.functional.jacobian(logp, mean)
    hess = torch.autograd.functional.hessian(logp, mean)
    newton = torch.linalg.solve(-hess, grad) / sd
    is_sigma = torch.cat([torch.full((n,), s == "sigma") for s, n in zip(sites, sizes,
                                                                          strict=True)])
    assert float(newton[~is_sigma].abs().max()) < 0.1, newton
    assert float(newton[is_sigma].abs().max()) < 1.0, newton
    laplace_sd = torch.linalg.inv(-hess).diagonal().sqrt()
    assert float((laplace_sd / sd).log().abs().max()) < 0.1
