"""Gamma(α, β) and its one-parameter special case Exponential(λ) = Gamma(1, λ).

Gamma: T(z) = (log z, z), η = (α - 1, -β), μ = (ψ(α) - log β, α/β),
A(η) = log Γ(α) - α log β; Exponential: T(z) = z, η = -λ, μ = 1/λ, A(η) = -log(-η)
(Wainwright & Jordan 2008, §3.2). The Gamma's μ ↦ η, i.e. log α - ψ(α) = log μ₂ - μ₁ and
β = α/μ₂, has no closed form: it is solved by damped Newton (``legendre.py``) started from the
approximation of Minka 2002, "Estimating a Gamma distribution".
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Exponential as _Exponential
from torch.distributions import Gamma as _Gamma

from .base import ExponentialFamily, Params, symmetric_2x2
from .legendre import IterativeMeanMap


class Gamma(IterativeMeanMap):
    name = "Gamma"
    dist_class = _Gamma
    arg_names = ("concentration", "rate")
    event_dims = (0, 0)

    def args_to_natural(self, concentration: Tensor, rate: Tensor) -> Params:
        return concentration - 1, -rate

    def natural_to_args(self, eta1: Tensor, eta2: Tensor) -> Params:
        return eta1 + 1, -eta2

    def args_to_mean(self, concentration: Tensor, rate: Tensor) -> Params:
        return torch.digamma(concentration) - rate.log(), concentration / rate

    def initial_natural(self, mu1: Tensor, mu2: Tensor) -> Params:
        """α ≈ (3 - s + √((s - 3)² + 24s)) / (12s), s = log μ₂ - μ₁ (Minka 2002), β = α/μ₂."""
        s = mu2.log() - mu1
        alpha = (3 - s + ((s - 3).square() + 24 * s).sqrt()) / (12 * s)
        return self.args_to_natural(alpha, alpha / mu2)

    def log_partition(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        alpha, beta = self.natural_to_args(eta1, eta2)
        return torch.lgamma(alpha) - alpha * beta.log()

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        return z.log(), z

    def in_domain(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        """α = η₁ + 1 > 0 and β = -η₂ > 0."""
        return (eta1 > -1) & (eta2 < 0) & torch.isfinite(eta1) & torch.isfinite(eta2)

    def fisher(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        """∇²A = [[ψ'(α), 1/β], [1/β, α/β²]]."""
        alpha, beta = self.natural_to_args(eta1, eta2)
        return symmetric_2x2(torch.polygamma(1, alpha), 1 / beta, alpha / beta.square())


class Exponential(ExponentialFamily):
    name = "Exponential"
    dist_class = _Exponential
    arg_names = ("rate",)
    event_dims = (0,)

    def args_to_natural(self, rate: Tensor) -> Params:
        return (-rate,)

    def natural_to_args(self, eta: Tensor) -> Params:
        return (-eta,)

    def args_to_mean(self, rate: Tensor) -> Params:
        return (1 / rate,)

    def mean_to_args(self, mu: Tensor) -> Params:
        return (1 / mu,)

    def log_partition(self, eta: Tensor) -> Tensor:
        return -torch.log(-eta)

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        return (z,)

    def in_domain(self, eta: Tensor) -> Tensor:
        return (eta < 0) & torch.isfinite(eta)

    def fisher(self, eta: Tensor) -> Tensor:
        """∇²A = 1/η² = 1/λ² = Var z."""
        return eta.square().reciprocal()[..., None, None]
