"""The step-size pieces without SVI: the trapezoidal judgement, the bold driver and Pflug's
ceiling, on quadratic losses L(θ) = ½θᵀdiag(a)θ with exact and with noisy gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_natgrad.optim import BoldDriver, Judgement, PflugCeiling, Step, judge


def _run(bold: BoldDriver | None, pflug: PflugCeiling | None, noise: float, steps: int,
         lr: float = 0.5, seed: int = 0, curvature: torch.Tensor | None = None) -> list[float]:
    """Gradient descent θ ← θ − ρ ĝ with ĝ = aθ + noise·ε (a = 1 unless ``curvature``), judged as
    the optimizer judges it (a rejected step is undone); returns the ceiling after each step."""
    g = torch.Generator().manual_seed(seed)
    a = torch.ones(5, dtype=torch.float64) if curvature is None else curvature
    theta = torch.full(a.shape, 10.0, dtype=torch.float64)
    for piece in (bold, pflug):
        if piece is not None:
            piece.start(lr)

    def grad(t):
        return a * t + noise * torch.randn(t.shape, generator=g, dtype=torch.float64)

    g0 = grad(theta)
    ceilings = []
    for _ in range(steps):
        rate = bold.rate if bold is not None else pflug.ceiling
        theta1 = theta - rate * g0
        g1 = grad(theta1)
        judgement = judge({"t": theta}, {"t": theta1}, {"t": g0}, {"t": g1})
        if pflug is not None:
            pflug.update(judgement, lr, Step({"t": theta}, {"t": theta1}, {"t": g0}, {"t": g1}))
        if bold is not None:
            bold.update(judgement, lr, pflug.ceiling if pflug is not None else lr)
        if judgement.accepted or bold is None:
            theta = theta1
        g0 = g1 if theta is theta1 else grad(theta)
        ceilings.append(pflug.ceiling if pflug is not None else bold.rate)
    return ceilings


def test_judge_trapezoid_and_pflug_ratio_on_a_quadratic():
    theta0, g0 = {"t": torch.tensor([2.0])}, {"t": torch.tensor([2.0])}
    half = judge(theta0, {"t": torch.tensor([1.0])}, g0, {"t": torch.tensor([1.0])})
    assert half == Judgement(descent=True, change=-1.5, ratio=-0.5, accepted=True)
    over = judge(theta0, {"t": torch.tensor([-3.0])}, g0, {"t": torch.tensor([-3.0])})
    assert over.descent and over.change == 2.5 and over.ratio == 1.5 and not over.accepted
    uphill = judge(theta0, {"t": torch.tensor([3.0])}, g0, {"t": torch.tensor([3.0])})
    assert not uphill.descent and uphill.ratio == math.inf and not uphill.accepted
    nan = judge(theta0, {"t": torch.tensor([1.0])}, g0, {"t": torch.tensor([float("nan")])})
    assert not nan.descent and not nan.accepted


def test_pflug_ceiling_stays_at_lr_with_exact_gradients():
    assert _run(BoldDriver(), PflugCeiling(), noise=0.0, steps=200) == [0.5] * 200


@pytest.mark.parametrize("lag", [1, 2])
def test_pflug_ceiling_falls_polynomially_once_noise_dominates(lag):
    """At stationarity E[r] ≈ ρ/2 (lag 1) or ρ (lag 2) > 0: the ceiling falls, not within the
    first window while the iterate travels from θ = 10 to the noise floor, and polynomially
    rather than geometrically: each window lasts 10·(lr/ceiling)^½ steps, so after 200 steps it
    has halved 4 to 7 times, not ~20 times down to the floor."""
    ceilings = _run(BoldDriver(), PflugCeiling(lag=lag), noise=1.0, steps=200)
    assert ceilings[9] == 0.5
    assert 0.5 * 2**-7 <= ceilings[-1] <= 0.5 * 2**-4
    assert all(c >= min(0.5, 25 / (t + 1) ** 2) for t, c in enumerate(ceilings))  # ρ_t ≳ 1/t²


def test_pflug_ceiling_with_growth_one_falls_like_one_over_t():
    """growth = 1: windows of 10·lr/ceiling steps, so the ceiling stays ≳ 10·lr/t (Σρₜ = ∞)."""
    ceilings = _run(BoldDriver(), PflugCeiling(growth=1.0), noise=1.0, steps=400)
    assert ceilings[-1] < 0.5 * 2**-2
    assert all(c >= min(0.5, 2.5 / (t + 1)) for t, c in enumerate(ceilings))


def test_two_step_test_is_not_fooled_by_deterministic_overshoot():
    """A Jacobi-like step on an ill-conditioned quadratic (curvatures 0.01–3.9, rate 0.5: the
    stiff directions overshoot with c = 1 − ρa down to −0.95 while the flat ones travel), exact
    gradients: the one-step ratio reads the zig-zag as noise and lowers the ceiling; the two-step
    ratio, Σ a c²(c² − 1)x² ≤ 0, does not."""
    a = torch.tensor([0.01, 0.03, 0.3, 2.0, 3.9], dtype=torch.float64)
    one = _run(None, PflugCeiling(lag=1), noise=0.0, steps=200, curvature=a)
    two = _run(None, PflugCeiling(lag=2), noise=0.0, steps=200, curvature=a)
    assert one[-1] < 0.5
    assert two == [0.5] * 200


def test_two_step_test_keeps_its_anchor_across_a_rejected_step_and_forgets_stale_params():
    pflug = PflugCeiling(lag=2)
    pflug.start(1.0)
    t = {name: torch.tensor([v]) for name, v in (("a", 4.0), ("b", 2.0), ("c", 1.0))}
    accepted = Judgement(descent=True, change=-1.0, ratio=-0.5, accepted=True)
    pflug.update(accepted, 1.0, Step({"x": t["a"]}, {"x": t["b"]}, {"x": t["a"]}, {"x": t["b"]}))
    assert pflug.count == 0 and pflug.anchor is not None  # the first step has no anchor yet
    rejected = Judgement(descent=True, change=1.0, ratio=2.0, accepted=False)
    pflug.update(rejected, 1.0, Step({"x": t["b"]}, {"x": -t["b"]}, {"x": t["b"]}, {"x": -t["b"]}))
    assert pflug.count == 0 and torch.equal(pflug.anchor[0]["x"], t["a"])
    pflug.update(accepted, 1.0, Step({"x": t["b"]}, {"x": t["c"]}, {"x": t["b"]}, {"x": t["c"]}))
    # the two-step move 4 → 1 with gradients 4 and 1: r = 1·(−3) / (−4·(−3)) = −0.25
    assert pflug.count == 1 and pflug.drift == -0.25
    pflug.forget(("y",))
    assert pflug.anchor is not None
    pflug.forget(("x", "y"))
    assert pflug.anchor is None


def test_invariant_window_applies_only_to_steps_reported_affine_invariant():
    """Three stationary judgements (r = ½ each) end a window of 3 for an invariant step and
    lower the ceiling; for any other step the window stays 10."""
    stationary = Judgement(descent=True, change=-0.1, ratio=0.5, accepted=True)
    for invariant, ceiling in ((True, 0.5), (False, 1.0)):
        pflug = PflugCeiling(window=10, invariant_window=3)
        pflug.start(1.0)
        for _ in range(3):
            pflug.update(stationary, 1.0, invariant=invariant)
        assert pflug.ceiling == ceiling
    plain = PflugCeiling(window=10)
    plain.start(1.0)
    for _ in range(3):
        plain.update(stationary, 1.0, invariant=True)
    assert plain.ceiling == 1.0  # no invariant_window: the window is 10 for every step
    with pytest.raises(ValueError, match="invariant_window"):
        PflugCeiling(invariant_window=0)


def _feed(pflug: PflugCeiling, ratios: list[float], lr: float = 0.5) -> None:
    for r in ratios:
        pflug.update(Judgement(descent=True, change=-1.0, ratio=r, accepted=True), lr)


@pytest.mark.parametrize("recover", [None, 1.0])
def test_pflug_ceiling_recovers_after_a_window_that_travels_beyond_its_noise(recover):
    """``recover``: a window whose mean ratio is more than ``recover`` standard errors below 0
    raises the ceiling by 1/shrink, up to lr; a window whose mean is negative but within its
    noise leaves it; None: the ceiling only falls."""
    pflug = PflugCeiling(window=4, recover=recover)
    pflug.start(0.5)
    _feed(pflug, [0.5] * 4)  # a stationary window (4 steps at the ceiling lr)
    assert pflug.ceiling == 0.25
    _feed(pflug, [-0.9, 0.8, -0.9, 0.8, -0.9, 0.8])  # mean −0.05, standard error 0.35
    assert pflug.ceiling == 0.25 and pflug.count == 0  # 4·√2 → 6 steps a window at 0.25
    _feed(pflug, [-0.5, -0.4, -0.6, -0.5, -0.45, -0.55])  # mean −0.5, standard error 0.03
    assert pflug.ceiling == (0.25 if recover is None else 0.5)
    _feed(pflug, [-0.5, -0.4, -0.6, -0.5])
    assert pflug.ceiling == (0.25 if recover is None else 0.5)  # never above lr


@pytest.mark.parametrize("lag", [1, 2])
def test_a_recovering_ceiling_still_falls_once_noise_dominates(lag):
    """At stationarity E[r] > 0, so a window reads as travelling beyond its noise only by
    chance (< Φ(−1)): the ceiling still falls, if by fewer halvings than without recovery."""
    ceilings = _run(BoldDriver(), PflugCeiling(lag=lag, recover=1.0), noise=1.0, steps=400)
    plain = _run(BoldDriver(), PflugCeiling(lag=lag), noise=1.0, steps=400)
    assert ceilings[9] == 0.5
    assert plain[-1] <= ceilings[-1] <= 0.5 * 2**-4


def test_pflug_ceiling_works_without_the_bold_driver():
    ceilings = _run(None, PflugCeiling(), noise=1.0, steps=200)
    assert ceilings[-1] < 0.5 * 2**-3


def test_bold_driver_shrinks_on_a_rejected_step_and_grows_back_to_the_ceiling():
    bold = BoldDriver()
    bold.start(1.0)
    overshoot = judge({"t": torch.tensor([1.0])}, {"t": torch.tensor([-3.0])},
                      {"t": torch.tensor([1.0])}, {"t": torch.tensor([-3.0])})
    bold.update(overshoot, lr=1.0, ceiling=1.0)
    assert bold.rate == 0.5
    good = Judgement(descent=True, change=-1.0, ratio=-0.5, accepted=True)
    bold.update(good, lr=1.0, ceiling=1.0)
    assert bold.rate == 0.75
    bold.update(good, lr=1.0, ceiling=1.0)
    assert bold.rate == 1.0  # never above the ceiling
    for _ in range(40):
        bold.update(overshoot, lr=1.0, ceiling=1.0)
    assert bold.rate == 1e-4  # the floor, min_lr · lr


def test_bold_driver_counts_steps_rejected_at_its_floor_as_far_too_long():
    """``stuck``: rejected descent steps in a row at the floor whose Pflug ratio r > 3 (on a
    quadratic, four times past the line's minimum); an accepted step, a milder overshoot or a
    step above the floor starts the count again."""
    bold = BoldDriver()
    bold.start(1.0)
    far = Judgement(descent=True, change=5.0, ratio=15.0, accepted=False)
    mild = Judgement(descent=True, change=0.1, ratio=1.5, accepted=False)
    good = Judgement(descent=True, change=-1.0, ratio=-0.5, accepted=True)
    for _ in range(14):  # 1 → 2⁻¹⁴ < 10⁻⁴: the floor
        bold.update(far, lr=1.0, ceiling=1.0)
    assert bold.rate == 1e-4 and bold.stuck == 0
    for expected in (1, 2, 3):
        bold.update(far, lr=1.0, ceiling=1.0)
        assert bold.stuck == expected
    bold.update(mild, lr=1.0, ceiling=1.0)
    assert bold.stuck == 0
    bold.update(far, lr=1.0, ceiling=1.0)
    bold.update(good, lr=1.0, ceiling=1.0)
    assert bold.stuck == 0 and bold.rate == pytest.approx(1.5e-4)
    bold.update(far, lr=1.0, ceiling=1.0)  # from above the floor
    assert bold.stuck == 0


@pytest.mark.parametrize("piece", [BoldDriver, PflugCeiling])
def test_step_size_state_round_trip(piece):
    bold, pflug = BoldDriver(), PflugCeiling(lag=2, recover=1.0)
    _run(bold, pflug, noise=1.0, steps=37)
    original = bold if piece is BoldDriver else pflug
    copy = piece(lag=2, recover=1.0) if piece is PflugCeiling else piece()
    copy.start(0.5)
    copy.load_state_dict(original.state_dict())
    assert copy == original
    if piece is PflugCeiling:
        assert all(torch.equal(x[n], y[n]) for x, y in zip(copy.anchor, original.anchor,
                                                          strict=True) for n in x)


@pytest.mark.parametrize("bad", [dict(grow=0.5), dict(shrink=1.0), dict(min_lr=0.0),
                                 dict(min_lr=float("nan")), dict(tolerance=-1.0)])
def test_bold_driver_rejects_bad_options(bad):
    with pytest.raises(ValueError, match="BoldDriver"):
        BoldDriver(**bad)


@pytest.mark.parametrize("bad", [dict(window=0), dict(window=2.5), dict(shrink=0.0),
                                 dict(min_lr=-1.0), dict(lag=3), dict(growth=0.0),
                                 dict(recover=-1.0)])
def test_pflug_ceiling_rejects_bad_options(bad):
    with pytest.raises(ValueError, match="PflugCeiling"):
        PflugCeiling(**bad)
