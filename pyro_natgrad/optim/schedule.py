"""Adaptive step size from gradients alone (the optimizer never sees the loss value).

After a step θ₀ → θ₁ the next call brings the gradient g₁ at θ₁. Two statistics of the step:

* The change of the loss along it, by the trapezoidal rule on the line integral of the gradient,
  ΔL ≈ ½ (g₀ + g₁)ᵀ (θ₁ − θ₀), exact for a quadratic loss (the same information as the Wolfe
  curvature test; Nocedal & Wright 2006, §3.1). A step whose estimate shows the loss got worse by
  more than ``tolerance`` is rejected: the params go back to θ₀ and the rate shrinks; accepted steps
  let it grow back ("bold driver", Battiti 1989), never beyond the ceiling.
* Pflug's stationarity statistic s = g₁ᵀ(θ₁ − θ₀) = −ρ ⟨g₁, g₀⟩ for a preconditioned step
  θ₁ = θ₀ − ρ P g₀ (Pflug 1983; Chee & Toulis 2018, "Convergence diagnostics for stochastic
  gradient descent with constant learning rate", AISTATS). While the iterate still travels,
  successive gradients agree and s < 0; once it only bounces in the noise of Monte Carlo
  gradients around the optimum, they disagree and s > 0 on average. The test reads s in units of
  the step's own first-order decrease, r = s / (−g₀ᵀ(θ₁ − θ₀)) clipped to [−1, 1] (so one wild
  step cannot decide it), summed over consecutive windows: a window whose sum is positive
  multiplies the ceiling by ``shrink``, so the stationary spread of the iterate (∝ ρ) shrinks
  too. A window lasts ``window``·(lr/ceiling)^½ steps: at a lower rate the iterate needs more
  steps to settle before the test can judge it (Chee & Toulis restart the test after each
  decrease), so the ceiling falls like 1/t² rather than geometrically to the floor, which froze
  fits with Monte Carlo gradients far from the optimum (a window ∝ 1/ceiling, the Robbins–Monro
  1/t rate, was measured too slow to damp mini-batch noise in a few hundred steps). For a
  natural step of size ρ on a quadratic, E[r] ≈ −(1 − ρ) while travelling and ≈ ρ/2 at
  stationarity; with exact gradients r ≤ 0 and the ceiling stays at ``lr``. The test
  presumes a well-conditioned (natural) step: a Euclidean-like step zig-zags across a stiff
  direction while still travelling along a flat one, which it would mistake for noise
  (``window=None`` turns it off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class AdaptiveStep:
    """Multiplicative step-size control within ``[min_lr·lr, ceiling]``, ``ceiling ≤ lr``."""

    lr: float
    grow: float = 1.5
    shrink: float = 0.5
    min_lr: float = 1e-4
    tolerance: float = 0.0
    window: int | None = 10
    rate: float | None = None
    ceiling: float | None = None
    drift: float = 0.0
    count: int = 0
    # r of the step judged last (+∞: not a descent step); read right after ``observe``, not state
    last_ratio: float = field(default=math.inf, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.ceiling = self.lr if self.ceiling is None else self.ceiling
        self.rate = self.ceiling if self.rate is None else self.rate

    def observe(self, theta0: dict[str, Tensor], theta1: dict[str, Tensor],
                g0: dict[str, Tensor], g1: dict[str, Tensor]) -> bool:
        """Judges the step θ₀ → θ₁ from the gradients at both ends; True when it is kept."""
        start = end = 0.0
        for name, t0 in theta0.items():
            delta = theta1[name] - t0
            start += float(torch.sum(g0[name] * delta))
            end += float(torch.sum(g1[name] * delta))
        change = 0.5 * (start + end)
        floor = self.min_lr * self.lr
        self.last_ratio = math.inf
        if not (math.isfinite(change) and start < 0):
            self.rate = max(floor, self.rate * self.shrink)
            return False
        self.last_ratio = end / -start
        self.drift += min(1.0, max(-1.0, self.last_ratio))
        self.count += 1
        if self.window is not None and self.count >= self.window * math.sqrt(
                self.lr / self.ceiling):
            if self.drift > 0:
                self.ceiling = max(floor, self.ceiling * self.shrink)
            self.drift, self.count = 0.0, 0
        if change > self.tolerance:
            self.rate = max(floor, self.rate * self.shrink)
            return False
        self.rate = min(self.ceiling, self.rate * self.grow)
        return True

    def state_dict(self) -> dict:
        return {"rate": self.rate, "ceiling": self.ceiling, "drift": self.drift,
                "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.rate, self.ceiling = state["rate"], state["ceiling"]
        self.drift, self.count = state["drift"], state["count"]
