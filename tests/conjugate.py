"""Conjugate models with exact posteriors and closed-form ELBOs, shared by the optimizer tests.

Each case gives a model, a guide whose distribution arguments are params (so the natural step is
available), a closed-form negative ELBO usable as SVI's loss (exact gradients), and the exact
posterior's constructor arguments. −ELBO = KL(q ‖ prior) − E_q[log p(x | z)], with the expectation
in closed form through the guide's mean parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import kl_divergence


@dataclass
class Conjugate:
    name: str
    model: Callable
    guide: Callable
    loss: Callable
    exact: dict[str, torch.Tensor]  # guide param name -> exact posterior value
    data: tuple


def _loss(make_q: Callable, prior: Callable, expected_loglik: Callable) -> Callable:
    def loss(model, guide, *args, **kwargs):
        q = make_q()
        return kl_divergence(q, prior()).sum() - expected_loglik(q, *args)
    return loss


def beta_bernoulli(dtype=torch.float64) -> Conjugate:
    x = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=dtype)
    a0, b0 = torch.tensor(2.0, dtype=dtype), torch.tensor(3.0, dtype=dtype)

    def model(x):
        p = pyro.sample("p", dist.Beta(a0, b0))
        with pyro.plate("n", len(x)):
            pyro.sample("x", dist.Bernoulli(p), obs=x)

    def make_q():
        return dist.Beta(pyro.param("c1", torch.tensor(1.0, dtype=dtype), constraints.positive),
                         pyro.param("c0", torch.tensor(1.0, dtype=dtype), constraints.positive))

    def guide(*args):
        pyro.sample("p", make_q())

    def loglik(q, x):
        total = q.concentration1 + q.concentration0
        e_log_p = torch.digamma(q.concentration1) - torch.digamma(total)
        e_log_1mp = torch.digamma(q.concentration0) - torch.digamma(total)
        return (x * e_log_p + (1 - x) * e_log_1mp).sum()

    exact = {"c1": a0 + x.sum(), "c0": b0 + (1 - x).sum()}
    return Conjugate("beta_bernoulli", model, guide, _loss(make_q, lambda: dist.Beta(a0, b0),
                                                           loglik), exact, (x,))


def gamma_poisson(dtype=torch.float64) -> Conjugate:
    x = torch.tensor([3, 5, 2, 4, 6, 3, 4, 1], dtype=dtype)
    a0, b0 = torch.tensor(2.0, dtype=dtype), torch.tensor(0.5, dtype=dtype)

    def model(x):
        rate = pyro.sample("rate", dist.Gamma(a0, b0))
        with pyro.plate("n", len(x)):
            pyro.sample("x", dist.Poisson(rate), obs=x)

    def make_q():
        return dist.Gamma(pyro.param("alpha", torch.tensor(1.0, dtype=dtype), constraints.positive),
                          pyro.param("beta", torch.tensor(1.0, dtype=dtype), constraints.positive))

    def guide(*args):
        pyro.sample("rate", make_q())

    def loglik(q, x):
        e_log_rate = torch.digamma(q.concentration) - torch.log(q.rate)
        return (x * e_log_rate - q.mean - torch.lgamma(x + 1)).sum()

    exact = {"alpha": a0 + x.sum(), "beta": b0 + len(x)}
    return Conjugate("gamma_poisson", model, guide, _loss(make_q, lambda: dist.Gamma(a0, b0),
                                                          loglik), exact, (x,))


def dirichlet_categorical(dtype=torch.float64) -> Conjugate:
    x = torch.tensor([0, 2, 2, 1, 0, 2, 2, 3, 2, 1])
    alpha0 = torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=dtype)
    counts = torch.bincount(x, minlength=4).to(dtype)

    def model(x):
        probs = pyro.sample("probs", dist.Dirichlet(alpha0))
        with pyro.plate("n", len(x)):
            pyro.sample("x", dist.Categorical(probs), obs=x)

    def make_q():
        return dist.Dirichlet(pyro.param("conc", torch.ones(4, dtype=dtype), constraints.positive))

    def guide(*args):
        pyro.sample("probs", make_q())

    def loglik(q, x):
        c = q.concentration
        return (counts * (torch.digamma(c) - torch.digamma(c.sum(-1, keepdim=True)))).sum()

    exact = {"conc": alpha0 + counts}
    return Conjugate("dirichlet_categorical", model, guide,
                     _loss(make_q, lambda: dist.Dirichlet(alpha0), loglik), exact, (x,))


def normal_means(dtype=torch.float64) -> Conjugate:
    """Five means with Normal(0, 10²) priors, 20 observations each of known sd 1; a mean-field
    Normal guide (the heavy ball's momentum acts on its mean)."""
    g = torch.Generator().manual_seed(0)
    x = 3.0 + torch.randn(20, 5, generator=g, dtype=dtype)
    prior_scale = 10.0

    def model(x):
        with pyro.plate("j", x.shape[-1]):
            mu = pyro.sample("mu", dist.Normal(torch.zeros((), dtype=dtype), prior_scale))
            with pyro.plate("n", x.shape[0], dim=-2):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def make_q():
        return dist.Normal(pyro.param("loc", torch.zeros(5, dtype=dtype)),
                           pyro.param("scale", torch.ones(5, dtype=dtype), constraints.positive))

    def guide(*args):
        with pyro.plate("j", 5):
            pyro.sample("mu", make_q())

    def loglik(q, x):
        return (-0.5 * ((x - q.loc) ** 2 + q.scale ** 2) - 0.5 * math.log(2 * math.pi)).sum()

    variance = 1 / (1 / prior_scale ** 2 + x.shape[0])
    exact = {"loc": variance * x.sum(0), "scale": torch.full((5,), variance ** 0.5, dtype=dtype)}
    return Conjugate("normal_means", model, guide,
                     _loss(make_q, lambda: dist.Normal(torch.zeros(5, dtype=dtype), prior_scale),
                           loglik), exact, (x,))


def linear_regression(dtype=torch.float64, n: int = 40, d: int = 3, noise: float = 0.5,
                      seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Data and the exact posterior (mean, covariance) of w ~ N(0, I), y ~ N(Xw, noise²)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype) * torch.linspace(0.5, 3.0, d, dtype=dtype)
    y = X @ torch.linspace(-1.0, 1.0, d, dtype=dtype) + noise * torch.randn(n, generator=g,
                                                                          dtype=dtype)
    precision = torch.eye(d, dtype=dtype) + X.T @ X / noise**2
    cov = torch.linalg.inv(precision)
    return X, y, cov @ X.T @ y / noise**2, cov


def regression_model(noise: float = 0.5) -> Callable:
    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[-1], dtype=X.dtype), 1.0).to_event(1))
        with pyro.plate("n", X.shape[0]):
            pyro.sample("y", dist.Normal((X * w).sum(-1), noise), obs=y)
    return model


def regression_loss(moments: Callable, noise: float = 0.5) -> Callable:
    """−ELBO of the linear regression from the guide's (mean, covariance):
    KL(q ‖ N(0, I)) − E_q[log p(y | w)], with E_q‖y − Xw‖² = ‖y − Xm‖² + tr(X Σ Xᵀ)."""
    def loss(model, guide, X, y):
        m, cov = moments()
        q = dist.MultivariateNormal(m, cov)
        prior = dist.MultivariateNormal(torch.zeros_like(m), torch.eye(len(m), dtype=m.dtype))
        resid = ((y - X @ m) ** 2).sum() + torch.trace(X @ cov @ X.T)
        loglik = -0.5 * len(y) * torch.log(torch.tensor(2 * torch.pi * noise**2,
                                                        dtype=m.dtype)) - 0.5 * resid / noise**2
        return kl_divergence(q, prior) - loglik
    return loss


CONJUGATE_SCALARS = (beta_bernoulli, gamma_poisson, dirichlet_categorical)
CONJUGATE_CASES = (*CONJUGATE_SCALARS, normal_means)
