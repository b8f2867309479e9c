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
stationary). Either can be left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Judgement", "judge", "BoldDriver", "PflugCeiling"]


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
        delta = theta1[name] - t0
        start += float(torch.sum(g0[name] * delta))
        end += float(torch.sum(g1[name] * delta))
    change = 0.5 * (start + end)
    descent = math.isfinite(change) and start < 0
    ratio = end / -start if descent else math.inf
    return Judgement(descent, change, ratio, descent and change <= tolerance)


@dataclass
class BoldDriver:
    """Multiplicative rate control: ×``shrink`` after a rejected step, ×``grow`` after an
    accepted one, within [``min_lr``·lr, ceiling] (Battiti 1989, "Accelerated backpropagation
    learning: two optimization methods"). ``tolerance``: the loss rise a step may show and still
    be accepted. A rejected step is undone by the optimizer."""

    grow: float = 1.5
    shrink: float = 0.5
    min_lr: float = 1e-4
    tolerance: float = 0.0
    rate: float | None = None  # None until the optimizer sets it to its lr

    def __post_init__(self) -> None:
        if not (self.grow >= 1 and 0 < self.shrink < 1 and 0 < self.min_lr <= 1
                and self.tolerance >= 0):
            raise ValueError(f"BoldDriver needs grow >= 1, 0 < shrink < 1, 0 < min_lr <= 1 and "
                             f"tolerance >= 0, got {self!r}")

    def start(self, lr: float) -> None:
        self.rate = lr if self.rate is None else self.rate

    def update(self, judgement: Judgement, lr: float, ceiling: float) -> None:
        floor = self.min_lr * lr
        if judgement.accepted:
            self.rate = min(ceiling, self.rate * self.grow)
        else:
            self.rate = max(floor, self.rate * self.shrink)

    def rescale(self, factor: float) -> None:
        self.rate *= factor

    def state_dict(self) -> dict:
        return {"rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        self.rate = state["rate"]


@dataclass
class PflugCeiling:
    """The largest rate, lowered by Pflug's stationarity test.

    Each descent step adds r clipped to [−1, 1] (one wild step cannot decide) to a running sum;
    a window that ends with a positive sum multiplies the ceiling by ``shrink``, so the stationary
    spread of the iterate (∝ rate) shrinks too. A window lasts ``window``·(lr/ceiling)^½ steps:
    at a lower rate the iterate needs more steps to settle before the test can judge it (Chee &
    Toulis restart the test after each decrease), so the ceiling falls like 1/t² rather than
    geometrically. For a natural step of size ρ on a quadratic, E[r] ≈ −(1 − ρ) while travelling
    and ≈ ρ/2 at stationarity; with exact gradients r ≤ 0 and the ceiling stays at lr. The test
    presumes an affine-invariant step: a Euclidean step zig-zags across a stiff direction while
    still travelling along a flat one, which it would mistake for noise.
    """

    window: int = 10
    shrink: float = 0.5
    min_lr: float = 1e-4
    ceiling: float | None = None  # None until the optimizer sets it to its lr
    drift: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window > 0 and 0 < self.shrink < 1
                and 0 < self.min_lr <= 1):
            raise ValueError(f"PflugCeiling needs an integer window > 0, 0 < shrink < 1 and "
                             f"0 < min_lr <= 1, got {self!r}")

    def start(self, lr: float) -> None:
        self.ceiling = lr if self.ceiling is None else self.ceiling

    def update(self, judgement: Judgement, lr: float) -> None:
        if not judgement.descent:
            return
        self.drift += min(1.0, max(-1.0, judgement.ratio))
        self.count += 1
        if self.count >= self.window * math.sqrt(lr / self.ceiling):
            if self.drift > 0:
                self.ceiling = max(self.min_lr * lr, self.ceiling * self.shrink)
            self.drift, self.count = 0.0, 0

    def rescale(self, factor: float) -> None:
        self.ceiling *= factor

    def state_dict(self) -> dict:
        return {"ceiling": self.ceiling, "drift": self.drift, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.ceiling, self.drift, self.count = state["ceiling"], state["drift"], state["count"]
