"""The closed-form exponential-family Fisher, pulled back to the guide's own parameters.

For q_θ in an exponential family with natural parameters η(θ) and mean parameters μ(θ),
F(θ) = (∂η/∂θ)ᵀ F(η) (∂η/∂θ) = (∂η/∂θ)ᵀ (∂μ/∂θ), because F(η) = ∂μ/∂η
(Amari 1998, "Natural gradient works efficiently in learning", §3; Amari & Nagaoka 2000, §2.3).
A Fisher-vector product therefore needs only the two maps η(θ) and μ(θ) and reverse-mode
autodiff: no Jacobian is formed and the family's Fisher is never inverted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..families import ExponentialFamily
from .linalg import jacobian, jvp, vjp


class PulledBackFisher:
    """F(θ) = Σ_sites m_s (∂η_s/∂θ)ᵀ (∂μ_s/∂θ) over the sites of one group (m_s: multiplicity)."""

    def __init__(self, sites: Sequence[tuple[ExponentialFamily, tuple[Tensor, ...], float]],
                 leaves: Sequence[Tensor]):
        self.leaves = list(leaves)
        self._terms = []
        for family, args, multiplicity in sites:
            eta = family.flatten(family.args_to_natural(*args))[0].reshape(-1)
            mu = family.flatten(family.args_to_mean(*args))[0].reshape(-1)
            self._terms.append((eta, mu, multiplicity))

    def mvp(self, v: Tensor) -> Tensor:
        """F(θ)·v: ∂μ/∂θ·v by the double-backward trick, then (∂η/∂θ)ᵀ by one backward pass."""
        total = torch.zeros_like(v)
        for eta, mu, multiplicity in self._terms:
            total = total + multiplicity * vjp(eta, self.leaves, jvp(mu, self.leaves, v))
        return total

    def diag(self) -> Tensor:
        return self.dense().diagonal()

    def dense(self) -> Tensor:
        """The matrix F(θ), from the two Jacobians (small groups only)."""
        total = 0
        for eta, mu, multiplicity in self._terms:
            total = total + multiplicity * jacobian(eta, self.leaves).T @ jacobian(mu, self.leaves)
        return 0.5 * (total + total.T)
