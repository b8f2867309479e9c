"""arK-arK: AR(5) time series, 200 observations.

Stan: ``alpha, beta ~ normal(0, 10)``, ``sigma ~ cauchy(0, 2.5)`` with ``<lower=0>`` (here
``HalfCauchy(2.5)``, equal up to the constant log 2), ``y[t] ~ normal(alpha + Σ_k beta[k]
y[t−k], sigma)`` for t > K. The loader returns the lag matrix, so the model is a regression.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ._reference import read_data

NAME = "arK-arK"


def load(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(lags (T − K, K) with lags[:, k−1] = y[t−k], target y[t] (T − K,)), t = K+1 … T."""
    data = read_data(NAME)
    y, K = torch.tensor(data["y"], dtype=dtype), data["K"]
    lags = torch.stack([y[K - k:len(y) - k] for k in range(1, K + 1)], -1)
    return lags, y[K:]


def model(lags: torch.Tensor, target: torch.Tensor) -> None:
    alpha = pyro.sample("alpha", dist.Normal(lags.new_tensor(0.0), 10.0))
    beta = pyro.sample("beta", dist.Normal(lags.new_zeros(lags.shape[1]), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(lags.new_tensor(2.5)))
    with pyro.plate("time", lags.shape[0]):
        pyro.sample("y", dist.Normal(alpha + (lags * beta).sum(-1), sigma), obs=target)
