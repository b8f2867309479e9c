"""KL trust regions: how far one step of a group of guide sites may move q.

The seed's constrained step (maximize the decrease subject to ½δᵀFδ ≤ ε²) is a trust region in
the units of KL. :class:`KLTrustRegion` keeps one radius per group of sites and updates it from
the :class:`~pyro_natgrad.optim.step_size.Judgement` of the group's last step, as classical trust
regions update theirs from the ratio of actual to predicted decrease (Nocedal & Wright 2006,
§4.1). The optimizer scales a step whose KL exceeds the radius (:func:`rate_for_kl`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .step_size import Judgement

__all__ = ["KLTrustRegion", "rate_for_kl"]

Key = tuple[str, ...]


@dataclass
class KLTrustRegion:
    """KL(q_old ‖ q_new) ≤ radius, one radius per group (keyed by its param names).

    A step is *exact* when it is taken in a family's own coordinates and its KL is computed in
    closed form at the candidate (natural-parameter and Bures steps); otherwise it is a first-order
    step in the guide's parameters, whose quadratic model is only locally right.

    :param start: the radius an exact step starts from: ``"unbounded"`` (+∞, so the full natural
        step is taken until a step is rejected: a conjugate model is exact in one step) or a
        number of nats per √n (n = the group's param count).
    :param linear_start: the radius a first-order step starts from, per √n.
    :param linear_cap: a first-order step's radius never exceeds ``linear_cap``·n.
    :param grow: an accepted step that did not overshoot (Pflug's ratio ≤ 0: the gradient at the
        candidate still points the same way) raises the radius to ``grow`` × its KL.
    :param shrink: a rejected step sets the radius to ``shrink`` × its KL, floored at
        ``min_radius``·√n.
    :param adaptive: False keeps every radius at its start (a fixed bound).
    """

    start: float | str = 0.5
    linear_start: float = 0.5
    linear_cap: float = 0.5
    grow: float = 2.0
    shrink: float = 0.5
    min_radius: float = 0.5e-4
    adaptive: bool = True
    radius: dict[Key, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.start == "unbounded" or (isinstance(self.start, int | float)
                                              and self.start > 0)):
            raise ValueError(f"KLTrustRegion start must be > 0 or 'unbounded', got "
                             f"{self.start!r}")
        if not (self.linear_start > 0 and self.linear_cap > 0 and self.grow >= 1
                and 0 < self.shrink < 1 and self.min_radius > 0):
            raise ValueError(f"KLTrustRegion needs linear_start, linear_cap, min_radius > 0, "
                             f"grow >= 1 and 0 < shrink < 1, got {self!r}")

    def bound(self, key: Key, n: int, exact: bool) -> float:
        """The largest KL a step of the group may take now."""
        if key not in self.radius:
            per_root = self.start if exact else self.linear_start
            self.radius[key] = math.inf if per_root == "unbounded" else per_root * math.sqrt(n)
        return self.radius[key] if exact else min(self.radius[key], self.linear_cap * n)

    def update(self, key: Key, n: int, kl: float, judgement: Judgement) -> None:
        """After the judgement of a step of KL ``kl``: shrink below a rejected step, grow past
        an accepted one that did not overshoot."""
        if key not in self.radius or not self.adaptive:
            return
        if not judgement.accepted:
            self.radius[key] = max(self.min_radius * math.sqrt(n), self.shrink * kl)
        elif judgement.ratio <= 0:
            self.radius[key] = max(self.radius[key], self.grow * kl)

    def forget(self, key: Key) -> None:
        self.radius.pop(key, None)

    def state_dict(self) -> dict:
        return {"radius": dict(self.radius)}

    def load_state_dict(self, state: dict) -> None:
        self.radius = {tuple(k): v for k, v in state["radius"].items()}


def rate_for_kl(rate: float, kl: float, bound: float, quadratic: bool) -> float:
    """A smaller rate for a step whose KL at ``rate`` exceeds ``bound``: KL ∝ rate² for a step
    measured by its quadratic model (the rate is solved for, within [0.01, 0.9] of the old one);
    a measured KL need not scale so, and the rate is at most halved (within [0.5, 0.9])."""
    root = math.sqrt(bound / kl)
    if quadratic:
        return rate * max(0.01, min(0.9, root))
    return rate * min(0.9, max(0.5, root))
