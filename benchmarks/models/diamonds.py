"""diamonds-diamonds (brms): linear regression, 5000 × 24 centred covariates (polynomial
contrasts, condition number ≈ 2.6e5).

Stan (all constants included): ``b ~ normal(0, 1)``, ``Intercept ~ student_t(3, 8, 10)``,
``sigma ~ student_t(3, 0, 10)`` truncated to ``sigma > 0`` (``− student_t_lccdf(0 | 3, 0, 10)``):
exactly the folded Student-t here, ``Y ~ normal(Intercept + Xc b, sigma)``; Xc = X without its
intercept column, centred (Stan's transformed data).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ._reference import read_data

NAME = "diamonds-diamonds"


def load(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(Xc (5000, 24), Y (5000,))."""
    data = read_data(NAME)
    X, Y = torch.tensor(data["X"], dtype=dtype), torch.tensor(data["Y"], dtype=dtype)
    return X[:, 1:] - X[:, 1:].mean(0), Y


def model(Xc: torch.Tensor, Y: torch.Tensor) -> None:
    b = pyro.sample("b", dist.Normal(Xc.new_zeros(Xc.shape[1]), 1.0).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(3.0, Xc.new_tensor(8.0), 10.0))
    sigma = pyro.sample("sigma", dist.FoldedDistribution(
        dist.StudentT(3.0, Xc.new_tensor(0.0), 10.0)))
    with pyro.plate("data", Xc.shape[0]):
        pyro.sample("Y", dist.Normal(intercept + (Xc * b).sum(-1), sigma), obs=Y)
