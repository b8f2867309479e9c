"""The adaptive step size: trapezoidal acceptance test and Pflug's stationarity test, on a
quadratic loss L(θ) = ½|θ|² with exact and with noisy gradients."""

from __future__ import annotations

import torch

from pyro_natgrad.optim.schedule import AdaptiveStep


def _run(schedule: AdaptiveStep, noise: float, steps: int, seed: int = 0) -> list[float]:
    """Preconditioned gradient descent θ ← θ − ρ ĝ with ĝ = θ + noise·ε, judged by ``schedule``
    (a rejected step is undone, as the optimizer does); returns the ceiling after each step."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.full((5,), 10.0, dtype=torch.float64)

    def grad(t):
        return t + noise * torch.randn(t.shape, generator=g, dtype=torch.float64)

    g0 = grad(theta)
    ceilings = []
    for _ in range(steps):
        theta1 = theta - schedule.rate * g0
        g1 = grad(theta1)
        if schedule.observe({"t": theta}, {"t": theta1}, {"t": g0}, {"t": g1}):
            theta = theta1
        g0 = g1 if theta is theta1 else grad(theta)
        ceilings.append(schedule.ceiling)
    return ceilings


def test_exact_gradients_keep_the_ceiling_at_lr():
    schedule = AdaptiveStep(0.5)
    assert _run(schedule, noise=0.0, steps=200) == [0.5] * 200


def test_noise_dominated_steps_lower_the_ceiling():
    """At stationarity E[r] ≈ ρ/2 > 0: the ceiling falls, not before the iterate has travelled
    from θ = 10 to the noise floor (~20 steps), and polynomially rather than geometrically: each
    window lasts 10·(lr/ceiling)^½ steps, so after 200 steps it has halved 5 or 6 times
    (measured: at steps 19, 34, 94, 123, 163), not ~20 times down to the floor."""
    schedule = AdaptiveStep(0.5)
    ceilings = _run(schedule, noise=1.0, steps=200)
    assert ceilings[9] == 0.5
    assert 0.5 * 2**-7 <= ceilings[-1] <= 0.5 * 2**-4
    assert all(c >= min(0.5, 100 / (t + 1) ** 2) for t, c in enumerate(ceilings))  # ρ_t ≳ 1/t²


def test_a_step_that_raises_the_loss_is_rejected_and_the_rate_shrinks():
    schedule = AdaptiveStep(1.0)
    theta0, theta1 = {"t": torch.tensor([1.0])}, {"t": torch.tensor([-3.0])}  # overshoot
    assert not schedule.observe(theta0, theta1, {"t": torch.tensor([1.0])},
                                {"t": torch.tensor([-3.0])})
    assert schedule.rate == 0.5
    nan = {"t": torch.tensor([float("nan")])}
    assert not schedule.observe(theta0, theta1, {"t": torch.tensor([1.0])}, nan)
    assert schedule.rate == 0.25


def test_state_round_trip():
    schedule = AdaptiveStep(0.5)
    _run(schedule, noise=1.0, steps=37)
    copy = AdaptiveStep(0.5)
    copy.load_state_dict(schedule.state_dict())
    assert copy == schedule
