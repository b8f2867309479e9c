"""Natural-gradient descent on the ELBO (Amari 1998), as a drop-in Pyro optimizer: the pieces of
:mod:`~pyro_natgrad.optim` assembled with the Fisher information of the guide as the metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..guides import Group
from .fisher_solve import FisherSolve
from .geometric import GeometricOptim
from .mirror import Mirror
from .proposal import Proposal
from .step_size import BoldDriver, PflugCeiling
from .transforms import HeavyBall, PrecisionShortening
from .trust_region import KLAim, KLTrustRegion

__all__ = ["NaturalGradient"]

Auto = Literal["auto"]
_FISHERS = ("auto", "exact", "monte_carlo")


class NaturalGradient(GeometricOptim):
    """Natural-gradient optimizer for :class:`pyro.infer.SVI`, θ ← θ − ρ F(θ)⁻¹∇θL.

    >>> svi = SVI(model, guide, NaturalGradient(guide), Trace_ELBO(num_particles=32))

    Per group of guide sites that share params, the first that applies: the mirror step
    η ← η − ρ ∂L/∂μ in natural parameters (:class:`~.mirror.Mirror`; an exponential-family site
    written through an invertible parameterization: AutoNormal, AutoDiagonalNormal,
    AutoMultivariateNormal, custom guides whose distribution arguments are params), else a solve
    with the closed-form Fisher pulled back through the guide (other exponential-family groups:
    low-rank covariances, shared or amortized params) or a Monte Carlo Fisher (flows, Student-t,
    mixtures): :class:`~.fisher_solve.FisherSolve`. With exact gradients and ``lr=1`` a conjugate
    model lands on its exact posterior in one step, at the defaults.

    :param guide: the guide object passed to SVI.
    :param lr: the largest step ρ; 1.0 is the full natural step.
    :param fisher: ``"auto"`` (closed form for exponential families, Monte Carlo elsewhere),
        ``"exact"`` (closed form only: an error for other sites) or ``"monte_carlo"``.
    :param num_samples: Monte Carlo Fisher draws per site (default: see
        :class:`~.fisher_solve.FisherSolve`).
    :param momentum: heavy-ball momentum β on a Gaussian mean, ``"auto"`` (0.9 on factorized
        sites, 0 on full-covariance ones), a number, a :class:`~.transforms.HeavyBall`, or None.
    :param trust_region: ``"auto"`` (a :class:`~.trust_region.KLTrustRegion`: ½√n nats, except
        that natural steps that stay in the family's domain at the full rate are not held to it
        until one of the group's steps needs a repair or is rejected: the group's first step is
        unbounded, later ones at most 4× the KL of its last accepted step), a KLTrustRegion, or
        None.
    :param aim: a :class:`~.trust_region.KLAim` (a full-covariance Gaussian's first candidate
        aimed at the trust region's bound by its calibrated KL model: about one Cholesky fewer
        per bounded step, a different path; opt-in), or None (default: the first candidate
        takes the step size's rate).
    :param step_size: ``"auto"`` (a :class:`~.step_size.BoldDriver`: rejected steps are undone
        and the rate shrinks), a BoldDriver, or None (every step is kept).
    :param stationarity: ``"auto"`` (a :class:`~.step_size.PflugCeiling` with a window of 10
        steps), a PflugCeiling, or None.
    :param base_optim: torch optimizer class for params that are not a guide distribution's
        arguments (model params, AutoDelta values, network weights); ``base_args`` its arguments
        (default ``{"lr": 0.01}``).
    :param mirror: ``"auto"`` (a :class:`~.mirror.Mirror` with precision shortening), a Mirror,
        or None (every group steps in parameter space).
    :param solve: ``"auto"`` or a :class:`~.fisher_solve.FisherSolve` (form, damping, draws, the
        :class:`~.transforms.VarianceAdaptation` of closed-form steps).
    :param on_nonfinite: ``"warn"`` (refuse the step, warn, keep the params) or ``"raise"``.

    Pieces hold state: give each optimizer its own (a piece object that another live
    optimizer holds is refused).
    """

    def __init__(self, guide: Callable, lr: float = 0.5, *,
                 fisher: Literal["auto", "exact", "monte_carlo"] = "auto",
                 num_samples: int | None = None,
                 momentum: float | Auto | HeavyBall | None = "auto",
                 trust_region: KLTrustRegion | Auto | None = "auto",
                 aim: KLAim | None = None,
                 step_size: BoldDriver | Auto | None = "auto",
                 stationarity: PflugCeiling | Auto | None = "auto",
                 base_optim: type[torch.optim.Optimizer] = torch.optim.Adam,
                 base_args: dict | None = None,
                 mirror: Mirror | Auto | None = "auto",
                 solve: FisherSolve | Auto = "auto",
                 on_nonfinite: Literal["warn", "raise"] = "warn"):
        if fisher not in _FISHERS:
            raise ValueError(f"fisher must be one of {_FISHERS}, got {fisher!r}")
        solve = FisherSolve() if solve == "auto" else solve
        if not isinstance(solve, FisherSolve):
            raise TypeError(f"solve must be 'auto' or a FisherSolve, got {solve!r}")
        if num_samples is not None:
            solve = FisherSolve(**{**vars(solve), "num_samples": num_samples})
        if isinstance(momentum, int | float) and not isinstance(momentum, bool):
            momentum = HeavyBall(momentum) if momentum else None
        elif momentum == "auto":
            momentum = HeavyBall()
        super().__init__(
            guide, lr,
            trust_region=KLTrustRegion() if trust_region == "auto"
            else trust_region,
            step_size=BoldDriver() if step_size == "auto" else step_size,
            stationarity=PflugCeiling() if stationarity == "auto" else stationarity,
            momentum=momentum, aim=aim,
            base_optim=base_optim, base_args=base_args,
            on_nonfinite=on_nonfinite)
        self.fisher = fisher
        self.mirror = Mirror() if mirror == "auto" else mirror
        if self.mirror is not None and not isinstance(self.mirror, Mirror):
            raise TypeError(f"mirror must be 'auto', a Mirror or None, got {mirror!r}")
        self.solve = solve
        self._claim_pieces()

    def _stateful(self) -> dict[str, object]:
        domain = self.mirror.domain if self.mirror is not None else None
        return {**super()._stateful(), "fisher_average": self.solve.average,
                "variance_adaptation": self.solve.adaptation,
                "precision_floor": domain if isinstance(domain, PrecisionShortening) else None}

    def diagnose(self) -> list[str]:
        """:meth:`GeometricOptim.diagnose`, and the params whose rate
        :class:`~.transforms.VarianceAdaptation` caps below 0.1."""
        notes = super().diagnose()
        adaptation = self.solve.adaptation
        capped = [f"{name} ({cap:.2g})" for key in (adaptation.averages if adaptation else ())
                  for name, cap in zip(key, adaptation.current(key), strict=True) if cap < 0.1]
        if capped:
            notes.append(
                f"the successive natural directions of {', '.join(capped)} disagree (Monte Carlo "
                "noise, or an overshoot), so its rate is capped at that estimated signal "
                "fraction (VarianceAdaptation); where it is noise, more particles "
                "(Trace_ELBO(num_particles=...)) would move it faster")
        return notes

    def _method(self, group: Group) -> str:
        exp_family = all(s.family is not None for s in group.sites)
        if self.fisher == "exact" and not exp_family:
            names = [s.name for s in group.sites if s.family is None]
            raise ValueError(f"fisher='exact' needs exponential-family sites; site(s) {names} "
                             "are not (use fisher='auto' or 'monte_carlo')")
        if self.fisher == "monte_carlo" or not exp_family:
            return "monte_carlo"
        if self.mirror is not None and group.natural:
            return "natural"
        return "closed_form"

    def _reads_distributions(self, group: Group) -> bool:
        return self._method(group) != "natural"  # the mirror step reads params and structure

    def _propose(self, key: tuple[str, ...], group: Group, leaves: dict[str, Tensor],
                 grads: dict[str, Tensor]) -> Proposal:
        method = self._method(group)
        if method == "natural":
            return self.mirror.propose(key, group.sites[0], leaves, grads, self.momentum)
        return self.solve.propose(key, group, leaves, grads, method == "monte_carlo")
