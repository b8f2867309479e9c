"""KL trust regions: how far one step of a group of guide sites may move q.

The seed's constrained step (maximize the decrease subject to ½δᵀFδ ≤ ε²) is a trust region in
the units of KL. :class:`KLTrustRegion` keeps one radius per group of sites and updates it from
the :class:`~pyro_natgrad.optim.step_size.Judgement` of the group's last step, as classical trust
regions update theirs from the ratio of actual to predicted decrease (Nocedal & Wright 2006,
§4.1). The optimizer scales a step whose KL exceeds the radius (:func:`rate_for_kl`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .step_size import Judgement

__all__ = ["KLAim", "KLTrustRegion", "rate_for_kl"]

Key = tuple[str, ...]


@dataclass
class KLTrustRegion:
    """KL(q_old ‖ q_new) ≤ radius, one radius per group (keyed by its param names).

    A step is *exact* when it is taken in a family's own coordinates with its KL computed in
    closed form (natural-parameter and Bures steps), and *clean* when it also needed no repair
    to stay in the family's domain: with exact gradients such a step is Newton's step on a
    model that is exact for conjugate models (the full natural step lands on the posterior), and
    a natural update that leaves the domain (a precision that is not positive definite) is the
    sign that the model does not hold at that rate. Other steps are first-order steps in the
    guide's parameters, whose quadratic model is only locally right.

    :param start: the radius every group starts from, per √n (n = the group's param count).
    :param trust_clean: a clean exact step is not held to the radius until the evidence says its
        model does not hold for the group: a step that needed a repair at the full rate, or a
        rejected step (False: every step is bounded).
    :param clean_growth: a trusted clean step after the group's first is held to
        max(radius, ``clean_growth`` × the KL of the group's last accepted step): step lengths
        (√KL) may double per step at 4, as a classical radius grows (Nocedal & Wright 2006,
        Alg. 4.1). With exact gradients the steps of a fit that converges shrink, and a
        conjugate model's exact first step is unbounded; the bound holds the step that a Monte
        Carlo precision estimate near 0 makes many times the last (math.inf: clean steps
        unbounded).
    :param linear_cap: a first-order step's radius never exceeds ``linear_cap``·n.
    :param grow: an accepted step that did not overshoot (Pflug's ratio ≤ 0: the gradient at the
        candidate still points the same way) raises the radius to ``grow`` × its KL.
    :param shrink: a rejected step sets the radius to ``shrink`` × its KL, floored at
        ``min_radius``·√n (a rejected unbounded step: at most the start radius). While a group's
        clean steps are trusted, its radius stays at its start.
    :param probation: a group's first ``probation`` judged steps are a cautious phase in which
        trust must be earned: its radius does not grow, and a clean exact step is unbounded only
        as the group's first step (the one that makes a conjugate model exact); later clean
        steps are held to the radius until the phase ends, and stay unbounded after it only if
        no step of the group was rejected or repaired. 0: no cautious phase.
    :param adaptive: False keeps every radius at its start (a fixed bound).
    :param bound_exact: False: exact steps are never bounded (their own rule sizes them) and the
        radius holds first-order steps only. (``WassersteinGradient``'s default up to 0.1.0: the
        curvature-scaled Bures step's h = ρ/Ĥ is unbounded where a Monte Carlo Ĥ is near 0.)
    :param sized: True: ``start`` and ``min_radius`` are per √n and ``linear_cap`` per n;
        False: they are nats.

    State: the radius of each group, the groups whose clean steps are trusted now, those no
    longer trusted, each group's count of judged steps and the KL of its last accepted step.
    """

    start: float = 0.5
    trust_clean: bool = True
    linear_cap: float = 0.5
    grow: float = 2.0
    shrink: float = 0.5
    min_radius: float = 0.5e-4
    probation: int = 0
    adaptive: bool = True
    sized: bool = True
    bound_exact: bool = True
    clean_growth: float = 4.0
    radius: dict[Key, float] = field(default_factory=dict)
    last: dict[Key, float] = field(default_factory=dict)
    trusted: set[Key] = field(default_factory=set)
    distrusted: set[Key] = field(default_factory=set)
    judged: dict[Key, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.start > 0 and self.linear_cap > 0 and self.grow >= 1
                and 0 < self.shrink < 1 and self.min_radius > 0 and self.clean_growth >= 1):
            raise ValueError(f"KLTrustRegion needs start, linear_cap, min_radius > 0, "
                             f"grow, clean_growth >= 1 and 0 < shrink < 1, got {self!r}")
        if not (isinstance(self.probation, int) and self.probation >= 0):
            raise ValueError(f"KLTrustRegion needs an integer probation >= 0, got {self!r}")

    @classmethod
    def fixed(cls, max_kl: float) -> KLTrustRegion:
        """KL(q_old ‖ q_new) ≤ ``max_kl`` nats for every step, whatever the group's size."""
        return cls(start=max_kl, trust_clean=False, linear_cap=math.inf, adaptive=False,
                   sized=False)

    def bound(self, key: Key, n: int, exact: bool, clean: bool = False) -> float:
        """The largest KL a step of the group may take now."""
        if exact and not self.bound_exact:
            return math.inf
        radius = self.radius.setdefault(key, self.start * self._root(n))
        if not self.decided(key, exact):  # a trusted group's exact step: clean ones not held
            if not clean:
                self._distrust(key)
            elif 0 < self.judged.get(key, 0) < self.probation:  # on probation: bounded
                self.trusted.discard(key)
            else:
                self.trusted.add(key)
                return max(radius, self.clean_growth * self.last.get(key, math.inf))
        if exact:
            return radius
        return min(radius, self.linear_cap * (n if self.sized else 1))

    def decided(self, key: Key, exact: bool) -> bool:
        """Whether :meth:`bound` gives the group the same bound whatever the step at hand (a
        clean exact step of a group still trusted may be unbounded: then it depends)."""
        return not (exact and self.bound_exact and self.trust_clean
                    and key not in self.distrusted)

    def update(self, key: Key, n: int, kl: float, judgement: Judgement) -> None:
        """After the judgement of a step of KL ``kl``: shrink below a rejected step, grow past
        an accepted one that did not overshoot."""
        if key not in self.radius or not self.adaptive:
            return
        self.judged[key] = self.judged.get(key, 0) + 1
        trusted = key in self.trusted
        if judgement.accepted and math.isfinite(kl):
            self.last[key] = kl
        if not judgement.accepted:
            radius = max(self.min_radius * self._root(n), self.shrink * kl)
            # a rejected unbounded step falls back to the start radius at most
            self.radius[key] = min(radius, self.start * self._root(n)) if trusted else radius
            self._distrust(key)
        elif judgement.ratio <= 0 and not trusted and self.judged[key] > self.probation:
            # a trusted step was not bounded by the radius; on probation it does not grow
            self.radius[key] = max(self.radius[key], self.grow * kl)

    def _distrust(self, key: Key) -> None:
        self.trusted.discard(key)
        self.distrusted.add(key)

    def _root(self, n: int) -> float:
        return math.sqrt(n) if self.sized else 1.0

    def forget(self, key: Key) -> None:
        self.radius.pop(key, None)
        self.trusted.discard(key)
        self.distrusted.discard(key)
        self.judged.pop(key, None)
        self.last.pop(key, None)

    def state_dict(self) -> dict:
        return {"radius": dict(self.radius), "trusted": sorted(self.trusted),
                "distrusted": sorted(self.distrusted), "judged": dict(self.judged),
                "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.radius = {tuple(k): v for k, v in state["radius"].items()}
        self.trusted = {tuple(k) for k in state["trusted"]}
        self.distrusted = {tuple(k) for k in state["distrusted"]}
        self.judged = {tuple(k): v for k, v in state.get("judged", {}).items()}
        self.last = {tuple(k): v for k, v in state["last"].items()}


def rate_for_kl(rate: float, kl: float, bound: float, quadratic: bool,
                previous: tuple[float, float] | None = None) -> float:
    """A smaller rate for a step whose KL at ``rate`` exceeds ``bound``: KL ∝ rate² for a step
    measured by its quadratic model (the rate is solved for, within [0.01, 0.9] of the old one);
    a measured KL need not scale so, and the rate is at most halved (within [0.5, 0.9]).
    ``previous``: the (rate, KL) of the try before this one; where the KL fell by less than half
    of what KL ∝ rate² predicts from it (part of the step does not shrink with the rate: a param
    held at its ``VarianceAdaptation`` cap, a momentum shift held by its secant bound), the rate
    is halved, so that the tries reach below every such hold."""
    if previous is not None and previous[0] > rate:
        predicted = previous[1] * (1 - (rate / previous[0]) ** 2)
        if previous[1] - kl < 0.5 * predicted:
            return 0.5 * rate
    root = math.sqrt(bound / kl)
    if quadratic:
        return rate * max(0.01, min(0.9, root))
    return rate * min(0.9, max(0.5, root))


@dataclass
class KLAim:
    """Where a step that the trust region bounds starts.

    Where the proposal offers a model of its KL that costs no candidate
    (:attr:`~pyro_natgrad.optim.proposal.Proposal.model_kl`: a full-covariance Gaussian's
    ½ρ²|Lᵀ∂L/∂m|² + ¼ρ²|S|²_F,
    :meth:`~pyro_natgrad.families.gaussian_step.GaussianDirection.model_kl`) and the group's bound
    does not depend on the step (:meth:`KLTrustRegion.decided`), the first candidate takes the
    rate at which the model, scaled by the ratio c = KL/model of the group's last accepted step,
    meets the bound, when the step size's rate lies beyond it: KL(ρ) ≈ c·model(ρ) with c measured
    one step before. A full-covariance candidate rejected by its KL costs a Cholesky of the d×d
    precision; the model's costs one pass over S. The bound itself is unchanged: an aimed
    candidate beyond it is shortened as any other (:func:`rate_for_kl`).

    State: per group, c of its last accepted step.
    """

    ratio: dict[Key, float] = field(default_factory=dict)

    def first(self, key: Key, rate: float, model: Callable[[float], float] | None,
              bound: float) -> float | None:
        """The first candidate's rate, aimed at ``bound`` by the calibrated model, where it
        puts the step at ``rate`` beyond the bound; else None (the step at ``rate``)."""
        if model is None or key not in self.ratio or not math.isfinite(bound):
            return None
        predicted = self.ratio[key] * model(rate)
        if not predicted > bound:
            return None
        return rate * max(0.01, math.sqrt(bound / predicted))

    def record(self, key: Key, kl: float | None, model: float) -> None:
        """After a step of the group is accepted: c = ``kl`` / ``model`` at its rate."""
        if kl is not None and math.isfinite(kl) and kl > 0 and math.isfinite(model) \
                and model > 0:
            self.ratio[key] = kl / model

    def forget(self, key: Key) -> None:
        self.ratio.pop(key, None)

    def state_dict(self) -> dict:
        return {"ratio": dict(self.ratio)}

    def load_state_dict(self, state: dict) -> None:
        self.ratio = {tuple(k): v for k, v in state["ratio"].items()}
