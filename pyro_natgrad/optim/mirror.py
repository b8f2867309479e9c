"""The natural-parameter (mirror-descent) direction of one exponential-family site.

η ← η − ρ ∂L/∂μ (Khan & Lin 2017, "Conjugate-computation variational inference"; Hensman et al.
2013): the natural gradient in η is the ordinary gradient in the mean parameters μ, obtained from
the gradient SVI already computed by one vector-Jacobian product through μ ↦ args ↦ params
(GPflow's ``NaturalGradient``). With exact gradients and ρ = 1 a conjugate model lands on its exact
posterior in one step, and the path of q does not depend on how the guide parameterizes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.distributions import kl_divergence

from ..families import ExponentialFamily
from ..families.base import Params
from ..families.gaussian_step import (
    GaussianDirection,
    GaussianStep,
    gaussian_direction,
    natural_step,
)
from ..guides import Gathered, Site
from ..pullback import args_gradient
from .proposal import Candidate, Deferred, Proposal
from .transforms import GaussianRepair, HeavyBall, PrecisionShortening, Retraction, Velocity

__all__ = ["Mirror", "exact_kl", "float64", "kl64"]

# a group's step at (rate, the momentum): (new args, formed when called; KL(q ‖ q'); note), or
# None when it cannot stay in the family's domain
Step = Callable[[float, Velocity | None], "tuple[Callable[[], Params], float, str] | None"]


@dataclass
class Mirror:
    """The mirror step of a site whose family is written through an invertible parameterization.
    A full-covariance ``MultivariateNormal(loc, scale_tril)`` takes the same step in its Cholesky
    factor (:mod:`~pyro_natgrad.families.gaussian_step`: one Cholesky per rate instead of the
    η-maps' several factorizations and an O(d³) float64 KL).

    :param domain: how a step that leaves the natural-parameter domain is repaired before the
        optimizer shortens it: ``"auto"`` (a
        :class:`~pyro_natgrad.optim.transforms.PrecisionShortening`),
        :class:`~pyro_natgrad.optim.transforms.Retraction`, or None (the whole step is halved).
    """

    domain: PrecisionShortening | Retraction | Literal["auto"] | None = "auto"

    def __post_init__(self) -> None:
        if self.domain == "auto":
            self.domain = PrecisionShortening()
        if self.domain is not None and not isinstance(self.domain,
                                                      PrecisionShortening | Retraction):
            raise TypeError(f"Mirror domain must be 'auto', a PrecisionShortening, a Retraction "
                            f"or None, got {self.domain!r}")

    def propose(self, key: tuple[str, ...], site: Site, leaves: dict[str, Tensor],
                grads: dict[str, Tensor], momentum: HeavyBall | None) -> Proposal:
        family, param = site.family, site.parameterization
        with torch.no_grad():
            args = param.args({n: leaves[n].detach() for n in param.param_names})
        d_args = args_gradient(param, args, [grads[n] for n in param.param_names])
        d_loc = d_args[0] if family.location_split else None
        # a subsample's entries differ between steps: no momentum for them
        local = isinstance(param, Gathered)
        velocity = (momentum.velocity(key, family, args[0], d_loc)
                    if momentum and not local else None)
        anchor = ((args[0].detach().clone(), d_loc.detach().clone())
                  if d_loc is not None and not local else None)
        dense = (family.name == "MultivariateNormal"
                 and args[0].shape[:-1] == args[1].shape[:-2])  # no covariance shared by locs
        model_kl = None
        if dense:
            direction = gaussian_direction(*args, *d_args)
            step = self._gaussian(key, direction, d_args[0], 1.0 / site.multiplicity,
                                  momentum)

            def model_kl(rate: float) -> float:
                return site.multiplicity * float(
                    direction.model_kl(rate / site.multiplicity).sum())
        else:
            step = self._natural(family, args, d_args, 1.0 / site.multiplicity, momentum)

        def candidate(rate: float) -> Candidate | None:
            with torch.no_grad():
                stepped = step(rate, velocity)
            if stepped is None:
                return None
            new_args, kl, note = stepped

            def values() -> dict[str, Tensor]:
                with torch.no_grad():
                    return param.unconstrained(new_args())

            return Candidate(Deferred(values), rate, kl * site.multiplicity, note,
                             anchor=anchor, repaired=bool(note))

        return Proposal("natural", candidate, exact=True, model_kl=model_kl)

    def _natural(self, family: ExponentialFamily, args: Params, d_args: Params,
                 scale: float, momentum: HeavyBall | None) -> Step:
        """Any family, in natural parameters: η' = η − ρ·scale·∂L/∂μ, the domain repaired, the
        mean translated by the momentum's shift (capped by ``momentum``); KL(q ‖ q') by
        :func:`exact_kl`."""
        with torch.no_grad():
            eta = family.args_to_natural(*args)
            dmu = family.mean_gradient(args, d_args)
        d_loc = d_args[0] if family.location_split else None
        current = family.distribution(*(a.detach() for a in args))

        def step(rate: float, velocity: Velocity | None
                 ) -> tuple[Callable[[], Params], float, str] | None:
            delta = tuple(-rate * scale * d for d in dmu)
            new_eta = tuple(e + d for e, d in zip(eta, delta, strict=True))
            valid = family.in_domain(*new_eta)
            note = ""
            if not bool(valid.all()):
                repaired = (self.domain.repair(family, eta, delta, dmu, d_loc, rate * scale,
                                               valid) if self.domain is not None else None)
                if repaired is None:
                    return None
                new_eta, note = repaired
                if not bool(family.in_domain(*new_eta).all()):
                    return None
            if velocity is not None:
                move = family.natural_to_args(*new_eta)[0] - args[0]
                new_eta = family.translate(new_eta, momentum.shift(
                    velocity, rate, move, lambda x: _whitened(args[1], x)))
            new_args = family.natural_to_args(*new_eta)
            return (lambda: new_args), exact_kl(family, current,
                                                family.distribution(*new_args)), note

        return step

    def _gaussian(self, key: tuple[str, ...], direction: GaussianDirection, d_loc: Tensor,
                  scale: float, momentum: HeavyBall | None) -> Step:
        """N(m, LLᵀ) in its Cholesky factor (:mod:`~pyro_natgrad.families.gaussian_step`): the
        same step as :meth:`_natural`, with one d×d product per step, per rate one Cholesky
        where the step stays in the domain, and one triangular solve for the new factor when the
        candidate's values are read (with the momentum's shift, when its KL is: KL = KL₀ +
        ½bᵀ(2a + b) for the mean shifted by s, a = L'⁻¹(m' − m) = −ρL'ᵀ∂L/∂m, b = L'⁻¹s; KL₀
        the unshifted KL)."""
        repair = (self.domain.gaussian(direction, key) if self.domain is not None
                  else _unrepaired(direction))

        def step(rate: float, velocity: Velocity | None
                 ) -> tuple[Callable[[], Params], float, str] | None:
            stepped = repair(rate * scale)
            if stepped is None:
                return None
            new, note = stepped
            kl, shift = new.kl, None
            if velocity is not None:
                shift = momentum.shift(velocity, rate, new.loc - direction.loc,
                                       lambda x: _whitened(direction.scale_tril, x))
                a = -rate * scale * (new.scale_tril.mT @ d_loc.unsqueeze(-1))
                b = torch.linalg.solve_triangular(new.scale_tril, shift.unsqueeze(-1),
                                                  upper=False)
                kl = kl + 0.5 * (b * (2 * a + b)).sum((-2, -1))

            def args() -> Params:
                return (new.loc if shift is None else new.loc + shift), new.scale_tril

            return args, float(kl.sum()), note

        return step


def _whitened(scale: Tensor, x: Tensor) -> Tensor:
    """x in q's whitened frame: x/σ for a Normal (``scale`` σ shaped as x), L⁻¹x for a
    multivariate Normal (``scale`` its factor L, one dimension more)."""
    if scale.dim() == x.dim():
        return x / scale
    return torch.linalg.solve_triangular(scale, x.unsqueeze(-1), upper=False).squeeze(-1)


def _unrepaired(direction: GaussianDirection) -> GaussianRepair:
    """The plain step, or None where it leaves the domain."""
    def step(rate: float) -> tuple[GaussianStep, str] | None:
        new = natural_step(direction, rate)
        return (new, "") if bool(new.ok.all()) else None
    return step


def exact_kl(family: ExponentialFamily, p: torch.distributions.Distribution,
             q: torch.distributions.Distribution) -> float:
    """KL(p ‖ q) summed over the batch, in float64: torch's closed form where registered, else
    the family's Bregman divergence A(η_q) − A(η_p) − <η_q − η_p, μ_p>. In float32 the terms of
    either form cancel catastrophically for a small step of a large or narrow q (a KL of 0.015
    came out as −6,272), so the arguments are promoted first."""
    return kl64(family, float64(family, p), float64(family, q))


def float64(family: ExponentialFamily, d: torch.distributions.Distribution
            ) -> torch.distributions.Distribution:
    """``d`` rebuilt from copies of its arguments in float64 (for :func:`kl64`): it does not
    follow later in-place changes of the params its arguments may be."""
    return family.distribution(*(a.detach().to(torch.float64, copy=True)
                                 for a in family.args(d)))


def kl64(family: ExponentialFamily, p64: torch.distributions.Distribution,
         q64: torch.distributions.Distribution) -> float:
    """:func:`exact_kl` of distributions already in float64 (:func:`float64`), so that one
    built once serves many KLs."""
    try:
        value = kl_divergence(p64, q64)
    except NotImplementedError:
        value = family.kl(family.args_to_natural(*family.args(p64)),
                          family.args_to_natural(*family.args(q64)))
    return float(value.sum())
