"""Wasserstein-2 directions of a group of guide sites.

* :class:`Bures`: a Normal or MultivariateNormal site written through an invertible
  parameterization takes the closed-form Bures–Wasserstein step m' = m − h∇ₘL,
  Σ' = (I − hM)Σ(I − hM), M = 2 sym ∇_ΣL (:func:`~pyro_natgrad.wasserstein.bures_step`; for a
  Normal, the Euclidean step in (m, σ)), h = ρ / (copies × ELBO scale) of the site; ∂L/∂Σ from
  ∂L/∂L by the Cholesky reverse rule, and the new Cholesky factor written back through the
  parameterization.
* :class:`MetricSolve`: any other group steps linearly in its params with a W₂ metric pulled
  back to them, the exact Bures metric of Gaussians
  (:class:`~pyro_natgrad.wasserstein.BuresMetric`) or the pushforward metric E[JᵀJ] of a
  reparameterized site's sampling map (:class:`~pyro_natgrad.wasserstein.PushforwardMetric`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.distributions import kl_divergence

from ..fisher.linalg import flat, solve_metric
from ..guides import Group, Site, args_gradient
from ..wasserstein import BuresMetric, PushforwardMetric, bures_step, cholesky_to_cov_gradient
from .proposal import Candidate, Proposal, linear_proposal

__all__ = ["Bures", "MetricSolve"]

_FORMS = ("dense", "diag", "cg")


@dataclass
class Bures:
    """The closed-form Bures–Wasserstein step of one Gaussian site."""

    def propose(self, site: Site, leaves: dict[str, Tensor],
                grads: dict[str, Tensor]) -> Proposal:
        family, param = site.family, site.parameterization
        dense = family.name == "MultivariateNormal"  # arguments (m, L), else (m, σ)
        with torch.no_grad():
            args = param.args({n: leaves[n].detach() for n in param.param_names})
            current = family.distribution(*args)
        d_loc, d_second = args_gradient(param, args, [grads[n] for n in param.param_names])
        if dense:
            d_second = cholesky_to_cov_gradient(args[1], d_second)
        scale = 1.0 / site.multiplicity

        def candidate(rate: float) -> Candidate | None:
            h = rate * scale
            with torch.no_grad():
                if dense:
                    new_args = bures_step(*args, d_loc, d_second, h)
                    positive = new_args[1].diagonal(dim1=-2, dim2=-1)
                else:
                    new_args = (args[0] - h * d_loc, args[1] - h * d_second)
                    positive = new_args[1]
                if not bool(positive.gt(0).all()):  # Σ' singular, or σ' ≤ 0 (or NaN)
                    return None
                values = param.unconstrained(new_args)
                kl = float(kl_divergence(current, family.distribution(*new_args)).sum())
            return Candidate(values, rate, kl * site.multiplicity)

        return Proposal("bures", candidate, exact=True)


@dataclass
class MetricSolve:
    """A linear step θ − ρ(G + λI)⁻¹∇θL with a W₂ metric G of the group's sites.

    :param metric: ``"bures"`` (Gaussian sites) or ``"pushforward"`` (any reparameterized site,
        estimated with ``num_samples`` draws).
    :param form: ``"dense"``, ``"diag"`` or ``"cg"``; default dense up to ``dense_max`` params.
    :param damping: λ.
    """

    form: Literal["dense", "diag", "cg"] | None = None
    damping: float = 1e-6
    num_samples: int = 64
    dense_max: int = 2000
    cg_iters: int = 50

    def __post_init__(self) -> None:
        if self.form is not None and self.form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS} or None, got {self.form!r}")
        if not (isinstance(self.damping, int | float) and self.damping >= 0):
            raise ValueError(f"damping must be a number >= 0, got {self.damping!r}")
        for name in ("num_samples", "dense_max", "cg_iters"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def propose(self, key: tuple[str, ...], group: Group, leaves: dict[str, Tensor],
                grads: dict[str, Tensor], metric: Literal["bures", "pushforward"]) -> Proposal:
        theta = [leaves[n] for n in key]
        g = flat([grads[n] for n in key])
        if metric == "bures":
            built = BuresMetric([(*_loc_cov(s), s.multiplicity) for s in group.sites], theta)
        else:
            built = PushforwardMetric([(s.fn, s.scale) for s in group.sites], theta,
                                      self.num_samples)
        form = self.form or ("dense" if g.numel() <= self.dense_max else "cg")
        direction = solve_metric(built, g, form, self.damping, self.cg_iters)
        return linear_proposal(f"{metric}_metric" if metric == "bures" else metric, key, theta,
                               direction, float(direction @ built.mvp(direction)))


def _loc_cov(site: Site) -> tuple[Tensor, Tensor]:
    """(m, Σ) of a Gaussian site's base distribution, a Normal's as 1 × 1 covariances, on the live
    graph from the params."""
    base = site.base
    if site.family.name == "Normal":
        return base.loc[..., None], base.variance[..., None, None]
    return base.loc, base.covariance_matrix
