"""Adaptive step size from gradients alone (the optimizer never sees the loss value).

After a step θ₀ → θ₁ the next call brings the gradient g₁ at θ₁. The change of the loss along the
step is estimated by the trapezoidal rule on the line integral of the gradient,
ΔL ≈ ½ (g₀ + g₁)ᵀ (θ₁ − θ₀), exact for a quadratic loss (the same information as the Wolfe
curvature test; Nocedal & Wright 2006, §3.1). A step whose estimate shows the loss got worse by more
than ``tolerance`` is rejected: the params go back to θ₀ and the step shrinks; accepted steps let
it grow back ("bold driver", Battiti 1989), never beyond the user's ``lr``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AdaptiveStep:
    """Multiplicative step-size control within ``[min_lr, lr]``."""

    lr: float
    grow: float = 1.5
    shrink: float = 0.5
    min_lr: float = 1e-4
    tolerance: float = 0.0
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.rate is None:
            self.rate = self.lr

    @staticmethod
    def loss_change(theta0: dict[str, Tensor], theta1: dict[str, Tensor],
                    g0: dict[str, Tensor], g1: dict[str, Tensor]) -> float:
        """Trapezoidal estimate of L(θ₁) − L(θ₀)."""
        total = 0.0
        for name, t0 in theta0.items():
            total += float(0.5 * torch.sum((g0[name] + g1[name]) * (theta1[name] - t0)))
        return total

    def judge(self, change: float) -> bool:
        """Updates the rate from the estimated loss change; True when the step is kept."""
        if change > self.tolerance:
            self.rate = max(self.min_lr * self.lr, self.rate * self.shrink)
            return False
        self.rate = min(self.lr, self.rate * self.grow)
        return True

    def state_dict(self) -> dict:
        return {"rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        self.rate = state["rate"]
