"""Wasserstein natural-gradient descent on the ELBO, as a drop-in Pyro optimizer: the pieces of
:mod:`~pyro_natgrad.optim` assembled with the Wasserstein-2 metric of the guide (the seed, §4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..guides import Group
from .bures import Bures, MetricSolve
from .geometric import GeometricOptim
from .proposal import Proposal
from .step_size import BoldDriver, PflugCeiling
from .trust_region import KLTrustRegion

__all__ = ["WassersteinGradient"]

Auto = Literal["auto"]
_CLOSED_FORM = ("Normal", "MultivariateNormal")
_GAUSSIANS = _CLOSED_FORM + ("LowRankMultivariateNormal",)


class WassersteinGradient(GeometricOptim):
    """Wasserstein natural-gradient optimizer for :class:`pyro.infer.SVI`, θ ← θ − ρ G(θ)⁻¹∇θL
    with G the W₂ metric of the guide.

    >>> svi = SVI(model, guide, WassersteinGradient(guide), Trace_ELBO(num_particles=32))

    Per group of guide sites, the first that applies: the closed-form Bures step
    (:class:`~.bures.Bures`, by default the forward–backward step with h = ρ / curvature) for a
    Normal or MultivariateNormal site written through an invertible parameterization; a linear
    step with the Bures metric of q's frame for an AutoLowRankMultivariateNormal group, with the
    Bures metric pulled back to the params for other Gaussian groups, or with the pushforward
    metric for any other reparameterized site (:class:`~.bures.MetricSolve`).

    :param guide: the guide object passed to SVI.
    :param lr: step size ρ. For the default closed-form and framed steps (the pushforward step
        included, taken in q's frame) it is dimensionless (:class:`~.bures.Bures`: the fraction
        of 1 / curvature the step takes); for the plain Bures metric of other Gaussian groups,
        ``MetricSolve(framed=False)`` and ``Bures(scheme="explicit")`` it has the units of
        1 / curvature of the loss (the step-size policy and the trust region correct too large
        a value).
    :param metric: ``"auto"`` (Bures–Wasserstein for Gaussian sites, pushforward elsewhere) or
        ``"pushforward"`` for every site.
    :param trust_region: ``"auto"`` (a :class:`~.trust_region.KLTrustRegion` with
        ``trust_clean=False``: every step under the adaptive radius, ½√n at the start, on the
        exact KL both ways of a closed-form Bures step (:class:`~.bures.Bures`' ``reverse_kl``;
        its h = ρ / curvature is unbounded where the curvature estimate is near 0) and of a
        framed low-rank step, on the squared W₂ length along the coupling of the others, in q's
        frame for a pushforward step), a KLTrustRegion (``KLTrustRegion(bound_exact=False)``:
        closed-form Bures steps unbounded, the default up to 0.1.0), or None.
    :param step_size: ``"auto"`` (a :class:`~.step_size.BoldDriver`), a BoldDriver, or None.
    :param stationarity: ``"auto"`` (a :class:`~.step_size.PflugCeiling` with window 5 and the
        two-step test, which a Bures step that overshoots a stiff direction does not fool; window
        4 when every group takes the framed full-covariance Bures step, which is affine
        invariant at the optimum; ``recover=1.0``: a window that says the iterate still travels
        raises the ceiling back), a PflugCeiling, or None.
    :param bures: ``"auto"`` or a :class:`~.bures.Bures` (scheme, Lanczos steps).
    :param solve: ``"auto"`` or a :class:`~.bures.MetricSolve` (form, damping, draws).
    :param base_optim: torch optimizer class for params outside the guide's distributions;
        ``base_args`` its arguments.
    :param on_nonfinite: ``"warn"`` or ``"raise"``.
    """

    def __init__(self, guide: Callable, lr: float = 0.5, *,
                 metric: Literal["auto", "pushforward"] = "auto",
                 trust_region: KLTrustRegion | Auto | None = "auto",
                 step_size: BoldDriver | Auto | None = "auto",
                 stationarity: PflugCeiling | Auto | None = "auto",
                 bures: Bures | Auto = "auto",
                 solve: MetricSolve | Auto = "auto",
                 base_optim: type[torch.optim.Optimizer] = torch.optim.Adam,
                 base_args: dict | None = None,
                 on_nonfinite: Literal["warn", "raise"] = "warn"):
        if metric not in ("auto", "pushforward"):
            raise ValueError(f"metric must be 'auto' or 'pushforward', got {metric!r}")
        solve = MetricSolve() if solve == "auto" else solve
        if not isinstance(solve, MetricSolve):
            raise TypeError(f"solve must be 'auto' or a MetricSolve, got {solve!r}")
        bures = Bures() if bures == "auto" else bures
        if not isinstance(bures, Bures):
            raise TypeError(f"bures must be 'auto' or a Bures, got {bures!r}")
        if trust_region == "auto":
            trust_region = KLTrustRegion(trust_clean=False)
        if stationarity == "auto":
            stationarity = PflugCeiling(window=5, lag=2, invariant_window=4, recover=1.0)
        super().__init__(guide, lr, trust_region=trust_region,
                         step_size=BoldDriver() if step_size == "auto" else step_size,
                         stationarity=stationarity, base_optim=base_optim, base_args=base_args,
                         on_nonfinite=on_nonfinite)
        self.metric, self.solve, self.bures = metric, solve, bures
        self._claim_pieces()

    def _method(self, group: Group) -> str:
        if self.metric == "pushforward":
            return "pushforward"
        if group.natural and group.sites[0].family.name in _CLOSED_FORM:
            return "bures"
        if all(s.family is not None and s.family.name in _GAUSSIANS for s in group.sites):
            return "bures_metric"
        return "pushforward"

    def _invariant(self, group: Group) -> bool:
        """The framed forward–backward step of a MultivariateNormal site: in q's frame its
        curvature LᵀĤL → I at the optimum, so every direction contracts alike (a Normal site's
        elementwise step is not: on a correlated posterior its directions settle at different
        speeds)."""
        return (self._method(group) == "bures" and self.bures.framed
                and self.bures.scheme == "forward_backward"
                and group.sites[0].family.name == "MultivariateNormal")

    def _reads_distributions(self, group: Group) -> bool:
        return self._method(group) != "bures"  # the closed-form step reads params and structure

    def _propose(self, key: tuple[str, ...], group: Group, leaves: dict[str, Tensor],
                 grads: dict[str, Tensor]) -> Proposal:
        method = self._method(group)
        if method == "bures":
            return self.bures.propose(group.sites[0], leaves, grads)
        return self.solve.propose(key, group, leaves, grads,
                                  "bures" if method == "bures_metric" else "pushforward")
