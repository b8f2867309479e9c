"""Categorical(p) over K states and Bernoulli(p), in minimal natural parameters.

Categorical: η ∈ ℝ^{K-1} with ηᵢ = log(pᵢ/p_K), T(z) = one-hot of z on the first K-1 states,
μ = (p₁, …, p_{K-1}), A(η) = log(1 + Σ exp ηᵢ), Fisher diag(μ) - μμᵀ (Amari & Nagaoka 2000, §2.2).
State K is the reference: dropping it makes the parameterization minimal, so the Fisher is
non-singular (the K-state one-hot statistic sums to one and would make it singular).
Bernoulli: η = logit p, T(z) = z, μ = p, A(η) = log(1 + e^η), Fisher p(1 - p).
Both read the distribution's ``probs`` (torch computes it from ``logits`` when built from them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli as _Bernoulli
from torch.distributions import Categorical as _Categorical

from .base import ExponentialFamily, Params


def _with_reference(eta: Tensor) -> Tensor:
    """(η₁, …, η_{K-1}, 0): the natural parameters with the reference state's zero appended."""
    return F.pad(eta, (0, 1))


class Categorical(ExponentialFamily):
    name = "Categorical"
    dist_class = _Categorical
    arg_names = ("probs",)
    event_dims = (1,)

    def args_to_natural(self, probs: Tensor) -> Params:
        log_p = probs.log()
        return (log_p[..., :-1] - log_p[..., -1:],)

    def natural_to_args(self, eta: Tensor) -> Params:
        return (torch.softmax(_with_reference(eta), -1),)

    def args_to_mean(self, probs: Tensor) -> Params:
        return (probs[..., :-1],)

    def mean_to_args(self, mu: Tensor) -> Params:
        return (torch.cat([mu, 1 - mu.sum(-1, keepdim=True)], -1),)

    def log_partition(self, eta: Tensor) -> Tensor:
        return torch.logsumexp(_with_reference(eta), -1)

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        """One-hot of the first K-1 states; K = η's size + 1 (η is required here)."""
        if not eta:
            raise ValueError("Categorical.sufficient_statistics needs the natural parameter to "
                             "know the number of categories")
        return (F.one_hot(z.long(), eta[0].shape[-1] + 1)[..., :-1].to(eta[0].dtype),)

    def in_domain(self, eta: Tensor) -> Tensor:
        return torch.isfinite(eta).all(-1)

    def fisher(self, eta: Tensor) -> Tensor:
        """Cov[T] = diag(μ) - μμᵀ with μ = (p₁, …, p_{K-1})."""
        mu = self.natural_to_mean(eta)[0]
        return torch.diag_embed(mu) - mu.unsqueeze(-1) * mu.unsqueeze(-2)


class Bernoulli(ExponentialFamily):
    name = "Bernoulli"
    dist_class = _Bernoulli
    arg_names = ("probs",)
    event_dims = (0,)

    def args_to_natural(self, probs: Tensor) -> Params:
        return (torch.logit(probs),)

    def natural_to_args(self, eta: Tensor) -> Params:
        return (torch.sigmoid(eta),)

    def args_to_mean(self, probs: Tensor) -> Params:
        return (probs,)

    def mean_to_args(self, mu: Tensor) -> Params:
        return (mu,)

    def log_partition(self, eta: Tensor) -> Tensor:
        return F.softplus(eta)

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        return (z,)

    def in_domain(self, eta: Tensor) -> Tensor:
        return torch.isfinite(eta)

    def fisher(self, eta: Tensor) -> Tensor:
        """Var z = p(1 - p) = σ(η)σ(-η)."""
        return (torch.sigmoid(eta) * torch.sigmoid(-eta))[..., None, None]
