"""gp_pois_regr-gp_pois_regr: latent Gaussian process (squared-exponential kernel) with a Poisson
likelihood, 11 points, non-centred.

Stan: ``rho ~ gamma(25, 4)`` (rate 4), ``alpha ~ normal(0, 2)`` with ``<lower=0>`` (here
``HalfNormal(2)``, equal up to the constant log 2), ``f_tilde ~ normal(0, 1)``, ``f = L f_tilde``
with L the Cholesky factor of ``alpha² exp(−(x − x')² / (2 rho²)) + 1e-10 I``, ``k ~
poisson_log(f)``. The jitter is Stan's 1e-10 in float64; float32 cannot factor that matrix for
rho ≳ 8, so it gets 1e-4. No plate: f is one event, so a particle dimension stays leftmost.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from ._reference import read_data

NAME = "gp_pois_regr-gp_pois_regr"


def load(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (11,), k (11,) counts as floats)."""
    data = read_data(NAME)
    return torch.tensor(data["x"], dtype=dtype), torch.tensor(data["k"], dtype=dtype)


def model(x: torch.Tensor, k: torch.Tensor) -> None:
    rho = pyro.sample("rho", dist.Gamma(x.new_tensor(25.0), 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(x.new_tensor(2.0)))
    f_tilde = pyro.sample("f_tilde", dist.Normal(x.new_zeros(len(x)), 1.0).to_event(1))
    jitter = 1e-10 if x.dtype == torch.float64 else 1e-4
    sq_dist = (x[:, None] - x) ** 2
    cov = (alpha[..., None, None] ** 2 * torch.exp(-sq_dist / (2 * rho[..., None, None] ** 2))
           + jitter * torch.eye(len(x), dtype=x.dtype))
    f = pyro.deterministic("f", (torch.linalg.cholesky(cov) * f_tilde[..., None, :]).sum(-1),
                           event_dim=1)
    pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=k)
