"""Poisson(λ): T(z) = z, h(z) = 1/z!, η = log λ, μ = λ, A(η) = e^η, Fisher e^η = λ
(Wainwright & Jordan 2008, §3.2)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Poisson as _Poisson

from .base import ExponentialFamily, Params


class Poisson(ExponentialFamily):
    name = "Poisson"
    dist_class = _Poisson
    arg_names = ("rate",)
    event_dims = (0,)

    def args_to_natural(self, rate: Tensor) -> Params:
        return (rate.log(),)

    def natural_to_args(self, eta: Tensor) -> Params:
        return (eta.exp(),)

    def args_to_mean(self, rate: Tensor) -> Params:
        return (rate,)

    def mean_to_args(self, mu: Tensor) -> Params:
        return (mu,)

    def log_partition(self, eta: Tensor) -> Tensor:
        return eta.exp()

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        return (z,)

    def in_domain(self, eta: Tensor) -> Tensor:
        return torch.isfinite(eta)

    def fisher(self, eta: Tensor) -> Tensor:
        """Var z = λ = e^η."""
        return eta.exp()[..., None, None]
