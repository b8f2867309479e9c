"""A stochastic-volatility model with synthetic data, shared by the fit-reliability tests: its
likelihood fails (a volatility scale underflows) at params a runaway step reaches."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from pyro_natgrad import StepRefusedWarning

SITES = ("mu", "phi", "sigma", "eps")


def stochastic_volatility(T: int = 100, seed: int = 123):
    """y_t ~ N(0, exp(h_t / 2)), h an AR(1) log-volatility (mu, phi in (-1, 1), sigma > 0),
    written non-centred and vectorized (h - mu = A z, A_tk = phi^(t-k), z the scaled shocks), and
    T synthetic observations from mu = -1, phi = 0.95, sigma = 0.25."""
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
        sigma = pyro.sample("sigma", dist.HalfCauchy(5.0))
        eps = pyro.sample("eps", dist.Normal(0.0, 1.0).expand([len(y)]).to_event(1))
        lag = torch.arange(len(y))[:, None] - torch.arange(len(y))
        powers = torch.where(lag >= 0, phi[..., None, None] ** lag.clamp(min=0), 0.0)
        later = torch.arange(len(y)) > 0  # h_0 from the stationary distribution
        shocks = sigma[..., None] * eps * torch.where(later, 1.0,
                                                      torch.rsqrt(1 - phi[..., None] ** 2))
        h = mu[..., None] + (powers @ shocks[..., None]).squeeze(-1)
        pyro.sample("y", dist.Normal(0.0, torch.exp(h / 2)).to_event(1), obs=y)

    g = torch.Generator().manual_seed(seed)
    h = torch.empty(T)
    h[0] = -1.0 + 0.25 / math.sqrt(1 - 0.95**2) * torch.randn(1, generator=g)
    for t in range(1, T):
        h[t] = -1.0 + 0.95 * (h[t - 1] + 1.0) + 0.25 * torch.randn(1, generator=g)
    return model, torch.randn(T, generator=g) * torch.exp(h / 2)


def largest_steps(svi, y: torch.Tensor, steps: int, skip: int = 0) -> dict[str, float]:
    """Runs ``steps`` plain ``svi.step(y)`` calls of an AutoNormal fit of the model (a refused
    step is kept; the model raising, or a non-finite loss, fails the caller) and returns, per
    site, the largest max(KL(q ‖ q'), KL(q' ‖ q)) of one step in float64, over the steps after
    the first ``skip``."""
    def q(name: str) -> dist.Normal:
        return dist.Normal(pyro.param(f"AutoNormal.locs.{name}").detach().double(),
                           pyro.param(f"AutoNormal.scales.{name}").detach().double())

    worst = dict.fromkeys(SITES, 0.0)
    for step in range(steps):
        before = {n: q(n) for n in SITES}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StepRefusedWarning)
            loss = svi.step(y)  # raises if the model fails at the params
        assert math.isfinite(loss), (step, loss)
        if step < skip:
            continue
        for n, q0 in before.items():
            q1 = q(n)
            kl = max(float(kl_divergence(q0, q1).sum()), float(kl_divergence(q1, q0).sum()))
            worst[n] = max(worst[n], kl)
    return worst
