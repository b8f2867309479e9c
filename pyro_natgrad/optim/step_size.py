"""Step-size policies that read gradients alone (the optimizer never sees the loss value).

After a step θ₀ → θ₁ the next call brings the gradient g₁ at θ₁, and :func:`judge` turns the pair
of gradients into a :class:`Judgement` of the step:

* the change of the loss along it by the trapezoidal rule on the line integral of the gradient,
  ΔL ≈ ½ (g₀ + g₁)ᵀ(θ₁ − θ₀), exact for a quadratic loss (the information of the Wolfe curvature
  test; Nocedal & Wright 2006, §3.1);
* Pflug's ratio r = g₁ᵀ(θ₁ − θ₀) / (−g₀ᵀ(θ₁ − θ₀)) (Pflug 1983; Chee & Toulis 2018,
  "Convergence diagnostics for stochastic gradient descent with constant learning rate",
  AISTATS): r < 0 while the iterate still travels (successive gradients agree), r > 0 on average
  once it only bounces in Monte Carlo noise around the optimum.

Two pieces consume the judgement, each with its own state: :class:`BoldDriver` (a step whose loss
estimate rose is rejected and the rate shrinks; accepted steps let it grow back; Battiti 1989)
and :class:`PflugCeiling` (the largest rate falls when Pflug's statistic says the iterate is
stationary and, with ``recover``, rises back where it says the iterate still travels). Either can
be left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Judgement", "judge", "Step", "BoldDriver", "PflugCeiling"]


@dataclass(frozen=True)
class Judgement:
    """What the gradients at both ends say of a step θ₀ → θ₁.

    ``descent``: g₀ᵀ(θ₁ − θ₀) < 0 and the estimate is finite; ``change``: ½(g₀ + g₁)ᵀ(θ₁ − θ₀);
    ``ratio``: Pflug's r (+∞ when not a descent step); ``accepted``: descent and
    ``change ≤ tolerance``.
    """

    descent: bool
    change: float
    ratio: float
    accepted: bool


def judge(theta0: dict[str, Tensor], theta1: dict[str, Tensor], g0: dict[str, Tensor],
          g1: dict[str, Tensor], tolerance: float = 0.0) -> Judgement:
    """Judges the step θ₀ → θ₁ from the gradients g₀, g₁ at its two ends."""
    start = end = 0.0
    for name, t0 in theta0.items():
        delta = (theta1[name] - t0).reshape(-1)
        start += float(torch.dot(g0[name].reshape(-1), delta))
        end += float(torch.dot(g1[name].reshape(-1), delta))
    change = 0.5 * (start + end)
    descent = math.isfinite(change) and start < 0
    ratio = end / -start if descent else math.inf
    return Judgement(descent, change, ratio, descent and change <= tolerance)


@dataclass
class BoldDriver:
    """Multiplicative rate control: ×``shrink`` after a rejected step, ×``grow`` after an
    accepted one, within [``min_lr``·lr, ceiling] (Battiti 1989, "Accelerated backpropagation
    learning: two optimization methods"). ``tolerance``: the loss rise a step may show and still
    be accepted. A rejected step is undone by the optimizer. ``stuck`` counts the steps rejected
    in a row at the floor as four times too long, Pflug's r > 3 (the optimizer warns: the fit
    cannot move)."""

    grow: float = 1.5
    shrink: float = 0.5
    min_lr: float = 1e-4
    tolerance: float = 0.0
    rate: float | None = None  # None until the optimizer sets it to its lr
    stuck: int = 0  # steps in a row rejected at the floor as four times too long

    def __post_init__(self) -> None:
        if not (self.grow >= 1 and 0 < self.shrink < 1 and 0 < self.min_lr <= 1
                and self.tolerance >= 0):
            raise ValueError(f"BoldDriver needs grow >= 1, 0 < shrink < 1, 0 < min_lr <= 1 and "
                             f"tolerance >= 0, got {self!r}")

    def start(self, lr: float) -> None:
        self.rate = lr if self.rate is None else self.rate

    def update(self, judgement: Judgement, lr: float, ceiling: float) -> None:
        floor = self.min_lr * lr
        # a descent step at the floor that went four times past its line's minimum (r > 3: on a
        # quadratic the best length is 1/(1 + r) of it) says the floor itself is too long
        overshot = judgement.descent and not judgement.accepted and judgement.ratio > 3
        self.stuck = self.stuck + 1 if overshot and self.rate <= floor * (1 + 1e-9) else 0
        if judgement.accepted:
            self.rate = min(ceiling, self.rate * self.grow)
        else:
            self.rate = max(floor, self.rate * self.shrink)

    def rescale(self, factor: float) -> None:
        self.rate *= factor

    def state_dict(self) -> dict:
        return {"rate": self.rate, "stuck": self.stuck}

    def load_state_dict(self, state: dict) -> None:
        self.rate, self.stuck = state["rate"], state.get("stuck", 0)


class Step(NamedTuple):
    """A step θ₀ → θ₁ with the gradients g₀, g₁ at its ends (tensors by param name)."""

    theta0: dict[str, Tensor]
    theta1: dict[str, Tensor]
    g0: dict[str, Tensor]
    g1: dict[str, Tensor]


@dataclass
class PflugCeiling:
    """The largest rate, lowered by Pflug's stationarity test.

    Each judged step adds r clipped to [−1, 1] (one wild step cannot decide) to a running sum;
    a window that ends with a positive sum multiplies the ceiling by ``shrink``, so the stationary
    spread of the iterate (∝ rate) shrinks too. A window lasts ``window``·(lr/ceiling)^``growth``
    steps: at a lower rate the iterate needs more steps to settle before the test can judge it
    (Chee & Toulis restart the test after each decrease). Under persistent noise the ceiling then
    falls like t^(−1/growth): ``growth=0.5`` (1/t²) settles fast but Σρₜ < ∞, so it can stop
    short of an optimum that is still far along a direction the test cannot see; ``growth=1``
    (1/t) keeps Σρₜ = ∞ (Robbins & Monro 1951) at the price of a larger late rate.

    ``lag=2`` judges the two-step move θₜ₋₂ → θₜ of the accepted iterates with g(θₜ₋₂) and
    g(θₜ). With a fixed preconditioner P on a quadratic, each eigen-direction of P½HP½
    (curvature a) moves by c = 1 − ρa per step, and the two-step ratio is
    Σ a c²(c² − 1)x² / (…) ≤ 0 whenever every |c| < 1: a step that overshoots a stiff direction
    (c < 0: a mean-field or Euclidean step on a correlated posterior) while it travels along a
    flat one is not mistaken for noise, whatever the conditioning. In Monte Carlo noise at
    stationarity E[r] ≈ ρa > 0 (the AR(1) iterate x ← cx − ρε). ``lag=1`` judges single steps:
    E[r] ≈ ρa/2 at stationarity, but also r = ρa − 1 > 0 for every deterministic overshoot, so it
    presumes an affine-invariant step (c = 1 − ρ ≥ 0). With exact gradients and a stable rate the
    ceiling stays at lr. Noise in stiff directions outweighs slow travel in flat ones in either
    ratio: the test judges the step as a whole.

    ``invariant_window`` (None: ``window`` always) is the window of a step the optimizer reports
    as affine invariant (every direction settles alike, c = 1 − ρa with a ≈ 1, so the iterate
    reaches its stationary spread within a few steps of a rate change and a shorter window
    suffices); the ceiling then falls sooner, towards the noise-optimal rate ≈ 1/(2t).

    ``recover`` (None: the ceiling only falls) makes the test two-sided: a window whose mean
    clipped ratio r̄ lies more than ``recover`` standard errors below 0 (r̄ < −recover·s/√n, s
    the ratios' spread over the window's n steps: successive moves agree beyond the window's
    noise, so the iterate still travels) divides the ceiling by ``shrink``, up to lr. A window's
    sign is a noisy vote: travelling with ratios of mean −m, a window closes positive with
    probability ≈ Φ(−√n·m/s), large where few-particle noise makes m/s small, and without
    ``recover`` each such false reading lowers the ceiling for good. At stationarity (E[r] > 0)
    a window reads as travelling with probability below Φ(−recover), so the ceiling still falls,
    more slowly.

    State: the ceiling, the window's sum, sum of squares and count, and (``lag=2``) the start of
    the last accepted step, its params and gradient.
    """

    window: int = 10
    shrink: float = 0.5
    min_lr: float = 1e-4
    lag: int = 1
    growth: float = 0.5
    invariant_window: int | None = None
    recover: float | None = None
    ceiling: float | None = None  # None until the optimizer sets it to its lr
    drift: float = 0.0
    square: float = 0.0  # the window's sum of squared clipped ratios (``recover``)
    count: int = 0
    anchor: tuple[dict[str, Tensor], dict[str, Tensor]] | None = field(default=None,
                                                                       compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window > 0 and 0 < self.shrink < 1
                and 0 < self.min_lr <= 1 and self.lag in (1, 2) and 0 < self.growth <= 2
                and (self.invariant_window is None or isinstance(self.invariant_window, int)
                     and self.invariant_window > 0)
                and (self.recover is None or self.recover >= 0)):
            raise ValueError(f"PflugCeiling needs an integer window > 0, 0 < shrink < 1, "
                             f"0 < min_lr <= 1, lag 1 or 2, 0 < growth <= 2, an "
                             f"invariant_window that is None or an integer > 0 and a recover "
                             f"that is None or >= 0, got {self!r}")

    def start(self, lr: float) -> None:
        self.ceiling = lr if self.ceiling is None else self.ceiling

    def update(self, judgement: Judgement, lr: float, step: Step | None = None,
               invariant: bool = False) -> None:
        """Counts the judged ``step`` (lag 1: ``judgement`` itself; lag 2: the move from the
        start of the previous accepted step to the end of this one, when this one is accepted);
        ``invariant``: the step was affine invariant (``invariant_window`` applies)."""
        if self.lag == 2:
            judgement = self._lagged(judgement, step)
        if judgement is None or not judgement.descent:
            return
        clipped = min(1.0, max(-1.0, judgement.ratio))
        self.drift += clipped
        self.square += clipped * clipped
        self.count += 1
        window = (self.invariant_window if invariant and self.invariant_window is not None
                  else self.window)
        if self.count >= window * (lr / self.ceiling) ** self.growth:
            if self.drift > 0:
                self.ceiling = max(self.min_lr * lr, self.ceiling * self.shrink)
            elif self.recover is not None and self._travels():
                self.ceiling = min(lr, self.ceiling / self.shrink)
            self.drift, self.square, self.count = 0.0, 0.0, 0

    def _travels(self) -> bool:
        """The window's mean clipped ratio is more than ``recover`` standard errors below 0."""
        n = self.count
        if n < 2:
            return False
        mean = self.drift / n
        variance = max(0.0, self.square - n * mean * mean) / (n - 1)
        return mean < -self.recover * math.sqrt(variance / n)

    def _lagged(self, judgement: Judgement, step: Step | None) -> Judgement | None:
        if step is None or not judgement.accepted:
            return None  # a rejected step is undone: the anchor stays
        anchor, self.anchor = self.anchor, (step.theta0, step.g0)
        if anchor is None:
            return None
        names = anchor[0].keys() & step.theta1.keys()
        if not names or any(anchor[0][n].shape != step.theta1[n].shape for n in names):
            return None
        return judge({n: anchor[0][n] for n in names}, {n: step.theta1[n] for n in names},
                     {n: anchor[1][n] for n in names}, {n: step.g1[n] for n in names})

    def forget(self, key: tuple[str, ...]) -> None:
        """Drops the anchor when it holds any of ``key``'s params (they changed elsewhere)."""
        if self.anchor is not None and set(key) & self.anchor[0].keys():
            self.anchor = None

    def rescale(self, factor: float) -> None:
        self.ceiling *= factor

    def state_dict(self) -> dict:
        return {"ceiling": self.ceiling, "drift": self.drift, "square": self.square,
                "count": self.count, "anchor": _copy_anchor(self.anchor)}

    def load_state_dict(self, state: dict) -> None:
        self.ceiling, self.drift, self.count = state["ceiling"], state["drift"], state["count"]
        self.square = state["square"]
        self.anchor = _copy_anchor(state.get("anchor"))


def _copy_anchor(anchor: tuple[dict[str, Tensor], ...] | None) -> tuple | None:
    """A detached copy of a two-step anchor (params, gradient), or None."""
    return None if anchor is None else tuple(
        {n: t.detach().clone() for n, t in part.items()} for part in anchor)
