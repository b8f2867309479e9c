"""eight_schools: the hierarchical model of Rubin (1981), centred and non-centred.

Stan: ``mu ~ normal(0, 5)``, ``tau ~ cauchy(0, 5)`` with ``<lower=0>`` (here ``HalfCauchy(5)``,
equal up to the constant log 2), ``y ~ normal(theta, sigma)``; centred: ``theta ~ normal(mu,
tau)``; non-centred: ``theta_trans ~ normal(0, 1)``, ``theta = mu + tau * theta_trans`` (recorded
as a deterministic site, so both are compared with the reference on ``theta``, ``mu``, ``tau``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ._reference import read_data

NONCENTERED = "eight_schools-eight_schools_noncentered"
CENTERED = "eight_schools-eight_schools_centered"


def load(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (8,), sigma (8,)); both posteriors share posteriordb's ``eight_schools`` data."""
    data = read_data(NONCENTERED)
    return torch.tensor(data["y"], dtype=dtype), torch.tensor(data["sigma"], dtype=dtype)


def noncentered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("schools", len(y)):
        theta_trans = pyro.sample("theta_trans", dist.Normal(y.new_tensor(0.0), 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def centered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
