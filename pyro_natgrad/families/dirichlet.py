"""Dirichlet(α) and its two-component case Beta(a, b) = law of z₁ for (z₁, 1 - z₁) ~ Dir(a, b).

Dirichlet: T(z) = log z, η = α - 1, μ = ψ(α) - ψ(α₀) with α₀ = Σα, A(η) = Σ log Γ(αᵢ) - log Γ(α₀),
Fisher ∇²A = diag ψ'(α) - ψ'(α₀) 11ᵀ (Minka 2000, "Estimating a Dirichlet distribution", §1).
Beta uses the same formulas on (a, b) with T(z) = (log z, log(1 - z)).
μ ↦ η has no closed form (it inverts the digamma) and is solved by damped Newton.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Beta as _Beta
from torch.distributions import Dirichlet as _Dirichlet

from .base import Params
from .legendre import IterativeMeanMap


def _log_partition(alpha: Tensor) -> Tensor:
    return torch.lgamma(alpha).sum(-1) - torch.lgamma(alpha.sum(-1))


def _mean(alpha: Tensor) -> Tensor:
    return torch.digamma(alpha) - torch.digamma(alpha.sum(-1, keepdim=True))


def _fisher(alpha: Tensor) -> Tensor:
    return (torch.diag_embed(torch.polygamma(1, alpha))
            - torch.polygamma(1, alpha.sum(-1))[..., None, None])


def _initial_concentration(mu: Tensor) -> Tensor:
    """α from exp ψ(x) ≈ x - ½: with S = Σ exp μᵢ, α₀ = (K - S) / (2(1 - S)) and
    αᵢ = exp(μᵢ)(α₀ - ½) + ½ (so that Σαᵢ = α₀); S < 1 by Jensen's inequality."""
    p = mu.exp()
    s = p.sum(-1, keepdim=True)
    total = (mu.shape[-1] - s) / (2 * (1 - s))
    return p * (total - 0.5) + 0.5


def _in_domain(alpha: Tensor) -> Tensor:
    return ((alpha > 0) & torch.isfinite(alpha)).all(-1)


def _stack(a: Tensor, b: Tensor) -> Tensor:
    return torch.stack(torch.broadcast_tensors(a, b), -1)


class Dirichlet(IterativeMeanMap):
    name = "Dirichlet"
    dist_class = _Dirichlet
    arg_names = ("concentration",)
    event_dims = (1,)

    def event_rank(self) -> int:
        return 1

    def args_to_natural(self, concentration: Tensor) -> Params:
        return (concentration - 1,)

    def natural_to_args(self, eta: Tensor) -> Params:
        return (eta + 1,)

    def args_to_mean(self, concentration: Tensor) -> Params:
        return (_mean(concentration),)

    def initial_natural(self, mu: Tensor) -> Params:
        return self.args_to_natural(_initial_concentration(mu))

    def log_partition(self, eta: Tensor) -> Tensor:
        return _log_partition(eta + 1)

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        return (z.log(),)

    def in_domain(self, eta: Tensor) -> Tensor:
        return _in_domain(eta + 1)

    def fisher(self, eta: Tensor) -> Tensor:
        return _fisher(eta + 1)


class Beta(IterativeMeanMap):
    name = "Beta"
    dist_class = _Beta
    arg_names = ("concentration1", "concentration0")
    event_dims = (0, 0)

    def args_to_natural(self, concentration1: Tensor, concentration0: Tensor) -> Params:
        return concentration1 - 1, concentration0 - 1

    def natural_to_args(self, eta1: Tensor, eta2: Tensor) -> Params:
        return eta1 + 1, eta2 + 1

    def args_to_mean(self, concentration1: Tensor, concentration0: Tensor) -> Params:
        return _mean(_stack(concentration1, concentration0)).unbind(-1)

    def initial_natural(self, mu1: Tensor, mu2: Tensor) -> Params:
        return self.args_to_natural(*_initial_concentration(_stack(mu1, mu2)).unbind(-1))

    def log_partition(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        return _log_partition(_stack(eta1, eta2) + 1)

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        return z.log(), torch.log1p(-z)

    def in_domain(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        return _in_domain(_stack(eta1, eta2) + 1)

    def fisher(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        return _fisher(_stack(eta1, eta2) + 1)
