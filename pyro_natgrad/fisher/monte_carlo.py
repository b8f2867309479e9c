"""Monte Carlo Fisher information of any guide distribution.

F(θ) = E_{z∼q_θ}[∇θ log q_θ(z) ∇θ log q_θ(z)ᵀ] (the seed's definition, §1), estimated with S draws
z_s taken without gradient, for distributions with no closed-form Fisher: flows, Student-t,
mixtures. One group of coupled sites is served at once; each site k of ELBO scale c_k contributes
c_k·F_k (as the closed form's multiplicity does), from its own rows of weighted scores
r_ks = √c_k ∇θ log q_k(z_ks), so that F̂ = (1/S) Σ_s Σ_k r_ks r_ksᵀ. A site whose distribution
depends on an earlier site's sample gets its conditional Fisher at the traced value.

The score matrix comes from one batched autodiff pass (reverse mode over the S·K draws, or the
double-backward forward mode over dim θ, whichever is smaller), so there is no Python loop over
draws. Three forms: ``dense`` (RᵀR/S), ``diag`` (mean squared scores) and matrix-free ``mvp``
(Rᵀ(R v)/S as two backward passes through the log-densities, memory O(dim θ + S); Martens 2010,
"Deep learning via Hessian-free optimization"; Schraudolph 2002).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution

from .autodiff import gram_mvp, jacobian
from .linalg import flat, hutchinson_trace

__all__ = ["MonteCarloFisher", "draw"]


def draw(fn: Distribution, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
    """z ∼ fn without gradient, as a fresh tensor.

    Transforms cache x ↔ y by tensor identity (Pyro's flows, e.g. ``AffineAutoregressive``, also
    cache their log-scale): ``fn.log_prob`` of the very tensor ``fn.sample`` returned would reuse
    values computed without gradient, and a flow's score would silently vanish. A copy is
    inverted afresh, through the params.
    """
    with torch.no_grad():
        return fn.sample(sample_shape).clone()


def log_density(name: str, fn: Distribution, z: Tensor) -> Tensor:
    """``fn.log_prob(z)`` at a draw ``z`` that is not ``fn``'s own latest sample; where ``fn``
    cannot be evaluated there (a flow whose transforms have no inverse, such as Pyro's
    ``BlockAutoregressive`` and ``NeuralAutoregressive``: their log-density is known only at the
    sample they last produced), a ValueError naming the site and the transforms."""
    try:
        return fn.log_prob(z)
    except (NotImplementedError, KeyError) as e:
        parts = [type(t).__name__ for t in _flattened(getattr(fn, "transforms", ()))]
        raise ValueError(
            f"guide site {name!r}: the log-density of {type(fn).__name__} "
            f"({', '.join(parts) or 'no transforms'}) cannot be evaluated at a fresh draw "
            f"({type(e).__name__}: {e}), so its score ∇θ log q(z) and Monte Carlo Fisher are "
            "not available: use a flow whose transforms have an inverse (e.g. "
            "affine_autoregressive, spline_coupling), or WassersteinGradient, which needs draws "
            "only") from e


def _flattened(transforms) -> list:
    """The transforms of a chain, compositions opened (``ComposeTransform.parts``)."""
    return [u for t in transforms for u in (_flattened(t.parts) if hasattr(t, "parts") else [t])]


class MonteCarloFisher:
    """Score-outer-product Fisher F̂ = (1/S) Σ_s Σ_k r_ks r_ksᵀ of one group of guide sites.

    :param sites: ``(name, distribution, scale)`` per site, the distribution built from ``leaves``.
    :param leaves: the unconstrained params θ the metric is taken in.
    :param num_samples: draws S per site.
    """

    def __init__(self, sites: Sequence[tuple[str, Distribution, float]],
                 leaves: Sequence[Tensor], num_samples: int):
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not sites:
            raise ValueError("a Monte Carlo Fisher needs at least one guide site")
        self.leaves = list(leaves)
        self.num_samples = num_samples
        rows = []
        self.draws: list[tuple[str, Tensor, Tensor, float]] = []  # (site, z, log q(z), scale)
        for name, fn, scale in sites:
            z = draw(fn, (num_samples,))
            with torch.enable_grad():
                lp = log_density(name, fn, z)
            if not lp.requires_grad:
                raise ValueError(
                    f"guide site {name!r}: log_prob of {type(fn).__name__} is not differentiable "
                    "in the guide's params (it has no grad_fn), so its score ∇θ log q(z) and "
                    "Monte Carlo Fisher are undefined; build its log-density from the params "
                    "with differentiable torch operations")
            flat_lp = lp.reshape(num_samples, -1).sum(-1)
            self.draws.append((name, z, flat_lp.detach(), float(scale)))
            rows.append(float(scale) ** 0.5 * flat_lp)
        self.log_q = torch.stack(rows, dim=1)  # (S, K): weighted log-density per draw and site
        self._scores: Tensor | None = None

    def sampled_kl(self, fns: dict[str, Distribution]) -> float:
        """KL(q ‖ q') ≈ (1/S) Σ_s Σ_k c_k [log q_k(z_ks) − log q'_k(z_ks)] from this metric's own
        draws z ∼ q, with ``fns`` the sites' distributions q' at other params (unbiased; a
        non-finite log-density gives inf)."""
        total = 0.0
        for name, z, lp, scale in self.draws:
            with torch.no_grad():  # a copy: a transform's cache must not answer for q'
                new = log_density(name, fns[name], z.clone()).reshape(self.num_samples,
                                                                      -1).sum(-1)
            total = total + scale * (lp - new)
        kl = float(total.mean())
        return kl if math.isfinite(kl) else math.inf

    def scores(self) -> Tensor:
        """Weighted scores r_ks = √c_k ∇θ log q_k(z_ks), shape (S, K, dim θ)."""
        if self._scores is None:
            s, k = self.log_q.shape
            self._scores = jacobian(self.log_q.reshape(-1), self.leaves).reshape(s, k, -1)
        return self._scores

    def dense(self) -> Tensor:
        r = self.scores().flatten(0, 1)
        return r.T @ r / self.num_samples

    def diag(self) -> Tensor:
        return self.scores().square().sum((0, 1)) / self.num_samples

    def mvp(self, v: Tensor) -> Tensor:
        """F̂ v = Rᵀ(R v)/S without forming the score matrix R."""
        return gram_mvp(self.log_q.reshape(-1), self.leaves, v) / self.num_samples

    def trace(self) -> Tensor:
        """tr F̂ = (1/S) Σ |r_ks|²: exact once the scores are formed, else Hutchinson's estimate
        from Fisher-vector products (memory O(dim θ))."""
        if self._scores is not None:
            return self._scores.square().sum() / self.num_samples
        return hutchinson_trace(self.mvp, flat([x.detach() for x in self.leaves]))
