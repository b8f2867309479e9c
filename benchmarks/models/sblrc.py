"""sblrc-blr: Bayesian linear regression, 100 × 5, unscaled correlated inputs, no intercept.

Stan: ``beta ~ normal(0, 10)``, ``sigma ~ normal(0, 10)`` with ``<lower=0>`` (a truncated normal:
here ``HalfNormal(10)``, equal up to the constant log 2), ``y ~ normal(X * beta, sigma)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ._reference import read_data

NAME = "sblrc-blr"


def load(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(X (100, 5), y (100,))."""
    data = read_data(NAME)
    return torch.tensor(data["X"], dtype=dtype), torch.tensor(data["y"], dtype=dtype)


def model(X: torch.Tensor, y: torch.Tensor) -> None:
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[1]), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(X.new_tensor(10.0)))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * beta).sum(-1), sigma), obs=y)
