"""Monte Carlo Fisher information of any guide distribution.

F(θ) = E_{z∼q_θ}[∇θ log q_θ(z) ∇θ log q_θ(z)ᵀ] (the seed's definition, §1), estimated with S draws
z_s taken without gradient. The per-draw scores come from one batched backward pass
(``is_grads_batched``), so there is no Python loop over draws. Three forms: ``dense`` (SᵀS/S),
``diag`` (mean squared scores) and matrix-free ``mvp`` (Sᵀ(S v)/S computed as two backward passes
through the log-density, memory O(dim θ + S); Martens 2010, Schraudolph 2002).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution

from .linalg import gram_mvp, jacobian


class MonteCarloFisher:
    """Score-outer-product Fisher of the joint guide density of one group of sites."""

    def __init__(self, sites: Sequence[tuple[Distribution, float]], leaves: Sequence[Tensor],
                 num_samples: int):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.leaves = list(leaves)
        self.num_samples = num_samples
        log_q = 0
        for fn, scale in sites:
            with torch.no_grad():
                z = fn.sample((num_samples,))
            lp = fn.log_prob(z)
            if not lp.requires_grad:
                raise ValueError(f"the log-density of {type(fn).__name__} does not depend on the "
                                 "params differentiably; it has no Monte Carlo Fisher")
            log_q = log_q + scale * lp.reshape(num_samples, -1).sum(-1)
        self.log_q = log_q
        self._scores: Tensor | None = None

    def scores(self) -> Tensor:
        """The S × dim θ matrix of per-draw scores ∇θ log q(z_s)."""
        if self._scores is None:
            self._scores = jacobian(self.log_q, self.leaves)
        return self._scores

    def dense(self) -> Tensor:
        s = self.scores()
        return s.T @ s / self.num_samples

    def diag(self) -> Tensor:
        return self.scores().square().mean(0)

    def mvp(self, v: Tensor) -> Tensor:
        """F v = Sᵀ(S v)/S without forming the score matrix S."""
        return gram_mvp(self.log_q, self.leaves, v) / self.num_samples
