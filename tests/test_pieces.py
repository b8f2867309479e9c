"""The step's pieces without SVI: trust region, momentum, domain repairs, checks. Each test names
the mechanism it pins."""

from __future__ import annotations

import gc
import math

import pyro
import pytest
import torch
from pyro.distributions import constraints

import pyro_natgrad
from pyro_natgrad.families import MultivariateNormal, Normal
from pyro_natgrad.optim import (
    Candidate,
    HeavyBall,
    Judgement,
    KLAim,
    KLTrustRegion,
    PrecisionShortening,
    Retraction,
    Velocity,
)
from pyro_natgrad.optim.checks import closed_form, finite, in_support
from pyro_natgrad.optim.options import require_counts, require_numbers
from pyro_natgrad.optim.proposal import Deferred
from pyro_natgrad.optim.trust_region import rate_for_kl

ACCEPTED = Judgement(descent=True, change=-1.0, ratio=-0.5, accepted=True)
OVERSHOOT = Judgement(descent=True, change=-1.0, ratio=0.5, accepted=True)
REJECTED = Judgement(descent=True, change=1.0, ratio=2.0, accepted=False)
KEY = ("loc", "scale")


def test_trust_region_trusts_clean_exact_steps_until_a_repair_or_a_rejection():
    region = KLTrustRegion()
    assert region.bound(KEY, 16, exact=True, clean=True) == math.inf
    assert region.bound(KEY, 16, exact=False) == 0.5 * 4  # first-order: ½√n
    assert region.bound(KEY, 16, exact=True, clean=False) == 2.0  # a repaired step: distrusted
    assert region.bound(KEY, 16, exact=True, clean=True) == 2.0  # ... from then on
    other = ("a",)
    region.bound(other, 4, exact=True, clean=True)
    region.update(other, 4, kl=10.0, judgement=ACCEPTED)
    assert region.radius[other] == 1.0  # an unbounded step did not use the radius: no growth
    region.update(other, 4, kl=10.0, judgement=REJECTED)
    assert region.bound(other, 4, exact=True, clean=True) == 1.0  # back to the start ½√4
    region.update(other, 4, kl=1.0, judgement=REJECTED)
    assert region.bound(other, 4, exact=True, clean=True) == 0.5  # ½ the rejected KL


def test_trust_region_holds_a_trusted_clean_step_to_a_multiple_of_the_last_accepted_one():
    """``clean_growth``: after a group's first step (unbounded: a conjugate model's exact step),
    a clean step of a trusted group may take max(radius, 4 × the last accepted KL); a rejected
    step's KL is not recorded (the group is distrusted anyway); ``math.inf`` leaves clean steps
    unbounded; the record survives a state round trip and ``forget``."""
    region = KLTrustRegion()
    assert region.bound(KEY, 16, exact=True, clean=True) == math.inf
    region.update(KEY, 16, kl=0.1, judgement=ACCEPTED)
    assert region.bound(KEY, 16, exact=True, clean=True) == 2.0  # the radius ½√16 is larger
    region.update(KEY, 16, kl=1.5, judgement=ACCEPTED)
    assert region.bound(KEY, 16, exact=True, clean=True) == 6.0  # 4 × 1.5
    region.update(KEY, 16, kl=6.0, judgement=OVERSHOOT)  # accepted: still the last
    assert region.bound(KEY, 16, exact=True, clean=True) == 24.0
    assert KEY in region.trusted and region.radius[KEY] == 2.0  # no radius growth while trusted
    copy = KLTrustRegion()
    copy.load_state_dict(region.state_dict())
    assert copy == region and copy.last == {KEY: 6.0}
    copy.forget(KEY)
    assert copy.bound(KEY, 16, exact=True, clean=True) == math.inf
    unbounded = KLTrustRegion(clean_growth=math.inf)
    unbounded.bound(KEY, 16, exact=True, clean=True)
    unbounded.update(KEY, 16, kl=0.1, judgement=ACCEPTED)
    assert unbounded.bound(KEY, 16, exact=True, clean=True) == math.inf


def test_trust_region_grows_past_accepted_steps_that_did_not_overshoot():
    region = KLTrustRegion()
    region.bound(KEY, 16, exact=False)
    region.update(KEY, 16, kl=1.5, judgement=ACCEPTED)
    assert region.radius[KEY] == 3.0
    region.update(KEY, 16, kl=2.9, judgement=OVERSHOOT)
    assert region.radius[KEY] == 3.0
    assert region.bound(KEY, 4, exact=False) == min(3.0, 0.5 * 4)  # the linear cap ½n


def test_trust_region_without_exact_bounds_holds_first_order_steps_only():
    """``bound_exact=False`` (WassersteinGradient's default up to 0.1.0): exact steps are never
    bounded, repaired or rejected; first-order steps keep the adaptive radius."""
    region = KLTrustRegion(bound_exact=False)
    assert region.bound(KEY, 16, exact=True, clean=False) == math.inf
    region.update(KEY, 16, kl=10.0, judgement=REJECTED)  # an exact group's: no radius to move
    assert region.bound(KEY, 16, exact=True, clean=True) == math.inf
    assert region.bound(KEY, 16, exact=False) == 2.0  # first-order: ½√n
    region.update(KEY, 16, kl=1.0, judgement=REJECTED)
    assert region.bound(KEY, 16, exact=False) == 0.5  # ½ the rejected KL
    assert region.bound(KEY, 16, exact=True, clean=True) == math.inf


def test_trust_region_fixed_bound_ignores_size_and_judgements():
    region = KLTrustRegion.fixed(2.0)
    assert region.bound(KEY, 100, exact=True, clean=True) == 2.0
    assert region.bound(KEY, 100, exact=False) == 2.0
    region.update(KEY, 100, kl=1.0, judgement=REJECTED)
    assert region.bound(KEY, 100, exact=False) == 2.0


def test_trust_region_state_round_trip_and_forget():
    region = KLTrustRegion()
    region.bound(KEY, 9, exact=True, clean=False)
    region.update(KEY, 9, kl=0.2, judgement=REJECTED)
    copy = KLTrustRegion()
    copy.load_state_dict(region.state_dict())
    assert copy == region
    copy.forget(KEY)
    assert copy.bound(KEY, 9, exact=True, clean=True) == math.inf


def test_rate_for_kl_solves_the_quadratic_model_and_halves_a_measured_kl_at_most():
    assert rate_for_kl(1.0, kl=4.0, bound=1.0, quadratic=True) == pytest.approx(0.5)
    assert rate_for_kl(1.0, kl=1e8, bound=1.0, quadratic=True) == 0.01
    assert rate_for_kl(1.0, kl=1e8, bound=1.0, quadratic=False) == 0.5


def test_rate_for_kl_halves_where_the_kl_did_not_fall_with_the_rate():
    """Given the try before, a KL that fell by less than half of what KL ∝ rate² predicts
    (part of the step held fixed) halves the rate; one that fell as predicted keeps the rule."""
    assert rate_for_kl(0.9, kl=2.4e-4, bound=2e-4, quadratic=True,
                       previous=(1.0, 2.45e-4)) == 0.45
    assert rate_for_kl(0.9, kl=0.81, bound=0.5, quadratic=True, previous=(1.0, 1.0)) \
        == pytest.approx(0.9 * math.sqrt(0.5 / 0.81))
    assert rate_for_kl(0.9, kl=0.95, bound=0.5, quadratic=False, previous=(1.0, 1.0)) == 0.45


@pytest.mark.parametrize("bad", [dict(start=0.0), dict(grow=0.5), dict(shrink=1.0),
                                 dict(min_radius=-1.0), dict(clean_growth=0.5)])
def test_trust_region_rejects_bad_options(bad):
    with pytest.raises(ValueError, match="KLTrustRegion"):
        KLTrustRegion(**bad)


def test_trust_region_bound_is_decided_once_the_step_cannot_be_unbounded():
    """``decided``: the bound does not depend on the step at hand. A trusted group's clean
    exact step may be unbounded (not decided) until the group is distrusted; first-order steps
    and exact steps without ``bound_exact`` are always decided. Querying changes no state."""
    region = KLTrustRegion()
    assert not region.decided(KEY, exact=True) and region.decided(KEY, exact=False)
    assert region.radius == {} and region.distrusted == set()
    region.bound(KEY, 16, exact=True, clean=False)  # a repaired step distrusts the group
    assert region.decided(KEY, exact=True)
    assert KLTrustRegion(bound_exact=False).decided(KEY, exact=True)
    assert KLTrustRegion(trust_clean=False).decided(KEY, exact=True)


def test_kl_aim_starts_where_the_calibrated_model_meets_the_bound():
    """The first candidate's rate: none without a calibration, a model or a finite bound, or
    where c·model(rate) is within the bound; else rate·√(bound / (c·model(rate))), at which
    the calibrated quadratic model equals the bound (never below 1% of the rate)."""
    aim = KLAim()

    def model(rate):
        return 8.0 * rate ** 2

    assert aim.first(KEY, 0.5, model, bound=1.0) is None  # not calibrated yet
    aim.record(KEY, kl=1.0, model=4.0)  # c = ¼
    assert aim.ratio == {KEY: 0.25}
    assert aim.first(KEY, 0.5, None, bound=1.0) is None
    assert aim.first(KEY, 0.5, model, bound=math.inf) is None
    assert aim.first(KEY, 0.5, model, bound=0.5) is None  # c·model(0.5) = 0.5: within
    first = aim.first(KEY, 1.0, model, bound=0.5)  # c·model(1) = 2
    assert first == pytest.approx(0.5) and 0.25 * model(first) == pytest.approx(0.5)
    assert aim.first(KEY, 1.0, model, bound=1e-9) == 0.01


def test_kl_aim_calibrates_from_measurable_steps_only_and_keeps_its_state():
    aim = KLAim()
    for kl, model in [(None, 1.0), (math.nan, 1.0), (1.0, 0.0), (0.0, 1.0), (1.0, math.inf)]:
        aim.record(KEY, kl, model)
    assert aim.ratio == {}  # nothing measurable to calibrate from
    aim.record(KEY, 3.0, 2.0)
    copy = KLAim()
    copy.load_state_dict(aim.state_dict())
    assert copy.ratio == {KEY: 1.5}
    copy.forget(KEY)
    assert copy.ratio == {}


def test_heavy_ball_velocity_restarts_uphill_and_remembers_only_accepted_steps():
    """β(m − m_prev)/ρ_prev, dropped when the last move went uphill by the new gradient; "auto"
    is 0.9 on a factorized family, 0 on a full-covariance one. The secant model's reach along
    u = m − m_prev: 2t* = −2g·u / (g − g_prev)·u, None without positive curvature."""
    momentum, normal = HeavyBall(), Normal()
    loc = torch.tensor([1.0, 2.0])
    assert momentum.velocity(KEY, normal, loc, d_loc=torch.ones(2)) is None  # no history
    momentum.accept(KEY, Candidate({}, rate=0.5, anchor=(torch.zeros(2), -3 * torch.ones(2))))
    downhill = momentum.velocity(KEY, normal, loc, d_loc=-torch.ones(2))
    torch.testing.assert_close(downhill.per_rate, 0.9 / 0.5 * loc)
    torch.testing.assert_close(downhill.move, loc)
    assert downhill.reach == pytest.approx(2 * 3 / 6)  # g·u = −3, (g − g_prev)·u = 2 + 4
    flat = momentum.velocity(KEY, normal, loc, d_loc=-4 * torch.ones(2))  # gradient grew
    assert flat is not None and flat.reach is None
    assert momentum.velocity(KEY, normal, loc, d_loc=torch.ones(2)) is None  # uphill: restart
    assert momentum.velocity(KEY, MultivariateNormal(), loc, d_loc=-torch.ones(2)) is None
    momentum.accept(KEY, Candidate({}, rate=0.25))  # no anchor (not a Gaussian step): kept
    copy = HeavyBall()
    copy.load_state_dict(momentum.state_dict())
    again = copy.velocity(KEY, normal, loc, -torch.ones(2))
    torch.testing.assert_close(again.per_rate, downhill.per_rate)
    assert again.reach == downhill.reach
    with pytest.raises(ValueError, match="momentum"):
        HeavyBall(1.0)


def test_heavy_ball_shift_is_capped_by_the_natural_move_in_q_metric():
    """|s|_Λ ≤ cap·|m' − m|_Λ over the group (Λ given as the whitening map x ↦ x/σ here): a
    shift within the cap is kept, a longer one scaled down to it, and a vanishing natural move
    leaves no shift; cap=None leaves every shift (no secant reach here)."""
    sigma = torch.tensor([1.0, 0.1])
    whiten = lambda x: x / sigma  # noqa: E731
    move = torch.tensor([0.0, 0.01])  # |move|_Λ = 0.1
    momentum = HeavyBall(cap=10.0)

    def shift(heavy_ball, s, natural_move):
        return heavy_ball.shift(Velocity(s, s, None), 1.0, natural_move, whiten)

    inside = torch.tensor([0.5, 0.05])  # |·|_Λ = √0.5 < 1
    torch.testing.assert_close(shift(momentum, inside, move), inside)
    outside = torch.tensor([3.0, 0.4])  # |·|_Λ = 5
    capped = shift(momentum, outside, move)
    torch.testing.assert_close(capped, outside / 5.0)
    torch.testing.assert_close(torch.linalg.vector_norm(whiten(capped)), torch.tensor(1.0))
    torch.testing.assert_close(shift(momentum, outside, torch.zeros(2)), torch.zeros(2))
    torch.testing.assert_close(shift(HeavyBall(cap=None), outside, move), outside)
    for bad in (0.0, -1.0, float("inf"), "10"):
        with pytest.raises(ValueError, match="cap"):
            HeavyBall(cap=bad)


def test_heavy_ball_shift_stops_where_the_secant_model_rises_along_the_last_move():
    """On L(m) = ½(m − m*)ᵀH(m − m*) the secant model along the last move u is exact (t* = 1
    below: m + u = m*): a natural step that is Newton's at rate ρ (m' = m + ρ(m* − m), H = Λ)
    followed by the shift ends at most at m + 2t*u, where L is back at L(m), when β's shift
    would carry it further; a shorter shift is kept; ``secant=False`` leaves it; a natural move
    already past 2t* leaves no shift."""
    h = torch.tensor([20.0, 5.0])
    optimum = torch.tensor([3.0, -1.0])
    grad = lambda m: h * (m - optimum)  # noqa: E731
    loss = lambda m: 0.5 * (h * (m - optimum) ** 2).sum()  # noqa: E731
    whiten = lambda x: x * h.sqrt()  # noqa: E731  (q's metric Λ = H)
    m0 = torch.zeros(2)
    m1 = m0 + 0.5 * (optimum - m0)  # a Newton step at rate 0.5
    momentum = HeavyBall(beta=0.9, cap=None)
    momentum.accept(KEY, Candidate({}, rate=0.5, anchor=(m0, grad(m0))))
    velocity = momentum.velocity(KEY, Normal(), m1, grad(m1))
    assert velocity.reach == pytest.approx(2.0)  # m1 + u = m*: t* = 1
    move = optimum - m1  # Newton's step at rate 1, then 0.9·1/0.5 = 1.8 u of momentum
    landed = m1 + move + momentum.shift(velocity, 1.0, move, whiten)
    torch.testing.assert_close(landed, m1 + 2 * velocity.move)  # held at 2t* (not 2.8)
    torch.testing.assert_close(loss(landed), loss(m1))
    plain = HeavyBall(beta=0.9, cap=None, secant=False)
    plain.last = dict(momentum.last)
    unheld = m1 + move + plain.shift(plain.velocity(KEY, Normal(), m1, grad(m1)), 1.0, move,
                                     whiten)
    torch.testing.assert_close(unheld, m1 + 2.8 * velocity.move)
    half = 0.5 * (optimum - m1)  # at rate 0.5: 0.5 + 0.9 < 2, kept
    torch.testing.assert_close(momentum.shift(velocity, 0.5, half, whiten),
                               0.5 * velocity.per_rate)
    beyond = 2.5 * (optimum - m1)  # a natural move past 2t*
    torch.testing.assert_close(momentum.shift(velocity, 0.5, beyond, whiten), torch.zeros(2))


def test_precision_shortening_keeps_the_mean_rate_and_halves_the_precision_per_element():
    """With ∂L/∂σ = −1.5 at σ = 1, element 0's natural step would give η₂' = −½ + ¾ > 0 (no
    precision): its precision rate halves to ½ (λ' = 0.25) while element 1 steps fully."""
    family = Normal()
    loc, scale = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    eta = family.args_to_natural(loc, scale)
    d_args = (torch.tensor([1.0, 1.0], dtype=torch.float64),
              torch.tensor([-1.5, 0.2], dtype=torch.float64))  # ∂L/∂m, ∂L/∂σ
    dmu = family.mean_gradient((loc, scale), d_args)
    delta = tuple(-d for d in dmu)
    valid = family.in_domain(*(e + d for e, d in zip(eta, delta, strict=True)))
    assert valid.tolist() == [False, True]
    new_eta, note = PrecisionShortening().repair(family, eta, delta, dmu, d_args[0], 1.0, valid)
    assert bool(family.in_domain(*new_eta).all()) and "at 1 of 2 elements" in note
    torch.testing.assert_close(new_eta[1][1], eta[1][1] + delta[1][1])  # element 1: full step
    new_loc, new_scale = family.natural_to_args(*new_eta)
    # element 0: the mean keeps rate 1 with the shortened precision, m' = m − Λ'⁻¹ ∂L/∂m
    torch.testing.assert_close(new_loc[0], -new_scale[0] ** 2 * d_args[0][0])
    assert PrecisionShortening().repair(family, eta, delta, dmu, None, 1.0, valid) is None


def test_precision_shortening_runs_lanczos_only_where_a_ritz_pair_could_change_the_step(
        monkeypatch):
    """The full-covariance repair reads S's Ritz pairs (to skip indefinite rates and to lift
    directions below the floor) only where ρ_Λ|S|_F ≥ 1 − floor could let an eigenvalue of
    ρ_Λ S reach floor − 1; below that the step is the plain natural step and Lanczos is not
    run. Above it, Lanczos runs once per direction, whatever the number of rates tried."""
    from pyro_natgrad.families.gaussian_step import gaussian_direction, natural_step
    from pyro_natgrad.optim import transforms

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return ritz_pairs(*args, **kwargs)

    ritz_pairs = transforms.ritz_pairs
    monkeypatch.setattr(transforms, "ritz_pairs", counted)
    g = torch.Generator().manual_seed(0)
    d = 6
    tril = torch.eye(d, dtype=torch.float64)
    d_tril = torch.randn(d, d, generator=g, dtype=torch.float64).tril()
    direction = gaussian_direction(torch.zeros(d, dtype=torch.float64), tril,
                                   torch.ones(d, dtype=torch.float64), d_tril)
    frobenius = float(direction.frobenius)
    shortening = PrecisionShortening()
    shortening.noisy.add(KEY)  # held to hold = 0.2: no lift while ρ|S|_F ≤ 0.8
    step = shortening.gaussian(direction, KEY)
    small = 0.7 / frobenius
    found, note = step(small)
    assert calls == [] and note == ""
    plain = natural_step(direction, small)
    assert torch.equal(found.kl, plain.kl) and torch.equal(found.scale_tril, plain.scale_tril)
    for rate in (5.0 / frobenius, 2.0 / frobenius):  # may leave the domain: pairs needed
        assert step(rate) is not None
    assert calls == [1]


def test_retraction_repairs_only_the_elements_that_left_the_domain():
    family = Normal()
    eta = family.args_to_natural(torch.zeros(2, dtype=torch.float64),
                                 torch.ones(2, dtype=torch.float64))
    delta = (torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 0.1], dtype=torch.float64))
    valid = family.in_domain(*(e + d for e, d in zip(eta, delta, strict=True)))
    new_eta, note = Retraction().repair(family, eta, delta, delta, None, 1.0, valid)
    assert bool(family.in_domain(*new_eta).all()) and "retraction at 1 of 2" in note
    torch.testing.assert_close(new_eta[1][1], eta[1][1] + delta[1][1])


def test_checks_name_non_finite_and_out_of_support_candidates():
    pyro.param("scale", torch.tensor(1.0), constraints.positive)
    assert finite(None) == "domain"
    assert finite(Candidate({"scale": torch.tensor(float("nan"))}, rate=1.0)) == "non-finite"
    assert finite(Candidate({"scale": torch.tensor(0.0)}, rate=1.0, kl=math.inf)) == "non-finite"
    assert finite(Candidate({"scale": torch.tensor(0.0)}, rate=1.0, kl=0.1)) is None

    def unformable():  # a deferred map back to the params that fails
        torch.linalg.cholesky(-torch.eye(2))

    assert finite(Candidate(Deferred(unformable), rate=1.0, kl=0.1)) == "domain"
    assert in_support(Candidate({"scale": torch.tensor(-200.0)}, rate=1.0)) == "domain"  # exp → 0
    assert in_support(Candidate({"scale": torch.tensor(-2.0)}, rate=1.0)) is None


def test_closed_form_check_replaces_the_kl_and_names_a_failure():
    """A candidate's closed-form KL replaces its model KL; a factorization that fails is a
    domain problem, a non-finite KL is named, and the candidate keeps its KL then."""
    values = {"loc": torch.zeros(2)}

    def fails(_):
        raise torch.linalg.LinAlgError("not positive definite")

    measured = Candidate(values, rate=1.0, kl=0.1, closed_form_kl=lambda v: 0.3)
    assert closed_form(measured) is None and measured.kl == 0.3
    for kl, problem in ((fails, "domain"), (lambda v: math.nan, "non-finite")):
        candidate = Candidate(values, rate=1.0, kl=0.1, closed_form_kl=kl)
        assert closed_form(candidate) == problem and candidate.kl == 0.1


def test_mirror_domain_none_means_no_repair_and_bad_pieces_are_named():
    from pyro_natgrad.optim import Mirror

    assert Mirror(domain=None).domain is None
    assert isinstance(Mirror().domain, PrecisionShortening)
    with pytest.raises(TypeError, match="Mirror domain"):
        Mirror(domain="retract")


def _read_low_rank(guide_kind: str, dtype: torch.dtype):
    """A low-rank Gaussian site (d = 6, rank 3) read from a guide: Pyro's
    AutoLowRankMultivariateNormal (ScaledLowRank), a custom guide whose args are its params
    (Direct), or one whose factor is 2P (no known parameterization), with random gradients."""
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    from pyro_natgrad.guides import GuideReader

    pyro.clear_param_store()
    d, r = 6, 3
    g = torch.Generator().manual_seed(5)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(d, dtype=dtype), 1.0).to_event(1))

    def custom():
        loc = pyro.param("loc", torch.randn(d, generator=g, dtype=dtype))
        factor = pyro.param("factor", torch.randn(d, r, generator=g, dtype=dtype))
        diag = pyro.param("diag", torch.rand(d, generator=g, dtype=dtype) + 0.5,
                          constraint=constraints.positive)
        cov_factor = factor if guide_kind == "direct" else 2 * factor
        pyro.sample("z", dist.LowRankMultivariateNormal(loc, cov_factor, diag))

    guide = (AutoLowRankMultivariateNormal(model, rank=r) if guide_kind == "auto"
             else pyro_natgrad.record_args(custom))
    guide()
    if guide_kind == "auto":  # away from Pyro's init (loc 0, factor 1e-2·N(0, 1))
        with torch.no_grad():
            guide.cov_factor.copy_(torch.randn(d, r, generator=g, dtype=dtype))
    store = pyro.get_param_store()
    leaves = {n: store.get_param(n).unconstrained() for n in store.keys()}
    (group,) = GuideReader(guide).read(leaves)
    grads = {n: torch.randn(p.shape, generator=g, dtype=dtype) for n, p in leaves.items()}
    return group, leaves, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("guide_kind", ["auto", "direct", "unknown"])
def test_gauge_projection_declared_by_the_parameterization_equals_the_probe(guide_kind, dtype):
    """GaugeProjection removes the rotation directions of the param its site's parameterization
    declares (AutoLowRankMultivariateNormal's P, a custom guide's own factor), without a probe;
    the same output, bitwise, as the probe, which a site of unknown parameterization uses (there:
    a factor 2P, so P is found by the probe alone)."""
    from dataclasses import replace

    from pyro_natgrad.fisher.linalg import without_rotations
    from pyro_natgrad.optim import GaugeProjection, transforms

    group, leaves, grads = _read_low_rank(guide_kind, dtype)
    (site,) = group.sites
    factor = next(n for n in group.param_names if leaves[n].dim() == 2)
    assert transforms._probe_rotation_gauge(site, group.param_names, leaves) == (factor,)
    if guide_kind == "unknown":
        assert site.parameterization is None
    else:
        assert site.parameterization.rotation_gauge(site.family) == factor
    probed = replace(group, sites=[replace(site, parameterization=None)])
    expected = GaugeProjection().apply(probed, leaves, grads)
    got = GaugeProjection().apply(group, leaves, grads)
    for name, a, b in zip(group.param_names, got, expected, strict=True):
        assert torch.equal(a, b)
        if name != factor:
            assert torch.equal(a, grads[name])
    i = group.param_names.index(factor)
    p = leaves[factor].detach()
    torch.testing.assert_close(got[i], without_rotations(p, grads[factor]))
    assert not torch.allclose(got[i], grads[factor])  # the projection did remove something
    pyro.clear_param_store()


def test_gauge_projection_runs_no_probe_where_the_gauge_is_declared(monkeypatch):
    """With a declared gauge (AutoLowRankMultivariateNormal) the projection takes no forward
    product through autograd; a full-covariance site declares none and is left unchanged."""
    from pyro_natgrad.guides import ScaledUnitCholesky
    from pyro_natgrad.optim import GaugeProjection, transforms

    group, leaves, grads = _read_low_rank("auto", torch.float64)

    def refuse(*args, **kwargs):
        raise AssertionError("a probe ran")

    monkeypatch.setattr(transforms, "jvp", refuse)
    GaugeProjection().apply(group, leaves, grads)
    unit = ScaledUnitCholesky(("loc", "scale", "unit"), (
        constraints.real, constraints.softplus_positive, constraints.unit_lower_cholesky))
    assert unit.rotation_gauge(MultivariateNormal()) is None
    pyro.clear_param_store()


def test_guide_reader_reuses_an_autoguide_read_only_while_nothing_it_was_read_from_changed():
    """GuideReader.read(reuse=True) returns the previous read's groups without running the
    guide for a Pyro AutoGuide called on the same, unmodified arguments with the same leaves and
    no new Pyro handler; an in-place edit of an argument, new leaves, a handler around the call,
    reuse=False or a plain-function guide each run the guide again."""
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoMultivariateNormal

    from pyro_natgrad.guides import GuideReader

    pyro.clear_param_store()
    data = torch.ones(3, dtype=torch.float64)

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(), 1.0).expand([3]).to_event(1), obs=x)

    runs = []
    guide = AutoMultivariateNormal(model)
    guide.register_forward_hook(lambda *_: runs.append(1))
    reader = GuideReader(guide)  # built before the guide's first call, as an optimizer is
    guide(data)
    store = pyro.get_param_store()

    def leaves():
        return {n: store.get_param(n).unconstrained() for n in sorted(store.keys())}

    first = reader.read(leaves(), reuse=True)
    assert not reader.reused and len(runs) == 2
    assert reader.read(leaves(), reuse=True) is first and reader.reused and len(runs) == 2
    assert reader.read(leaves()) is not first and not reader.reused and len(runs) == 3
    again = reader.read(leaves(), reuse=True)  # the plain read above was not cached
    assert not reader.reused and len(runs) == 4
    data.add_(1.0)  # same object, edited in place: its version counter moved
    assert reader.read(leaves(), reuse=True) is not again and len(runs) == 5
    with pyro.poutine.scale(scale=2.0):
        reader.read(leaves(), reuse=True)
    assert not reader.reused and len(runs) == 6
    guide(data.clone())  # a new argument object
    reader.read(leaves(), reuse=True)
    assert not reader.reused and len(runs) == 8
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(model)
    reader = GuideReader(guide)
    guide(data)
    reader.read(leaves(), reuse=True)
    reader.read(leaves(), reuse=True)
    assert reader.reused

    calls = []

    @pyro_natgrad.record_args
    def custom(x):
        calls.append(1)
        pyro.sample("z", dist.Normal(pyro.param("m", torch.zeros(2, dtype=torch.float64)),
                                     1.0).to_event(1))

    pyro.clear_param_store()
    reader = GuideReader(custom)
    custom(data)
    reader.read(leaves(), reuse=True)
    reader.read(leaves(), reuse=True)
    assert not reader.reused and len(calls) == 3


@pytest.mark.parametrize("kind", ["AutoNormal", "record_args"])
def test_guide_reader_reads_the_subsample_the_guides_last_call_drew(kind):
    """The reader re-runs the guide on the indices its subsampling plates drew in its last call
    (the batch the ELBO's gradient came from), not on a new draw, and warns once where calls
    since its last read drew several batches (unvectorized particles); the global RNG is left
    as it was; a raised call leaves no handler behind."""
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal
    from pyro.poutine.runtime import _PYRO_STACK

    from pyro_natgrad.guides import GuideReader

    pyro.clear_param_store()

    def model():
        with pyro.plate("N", 100, subsample_size=10):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def custom():
        loc = pyro.param("loc", torch.zeros(100))
        with pyro.plate("N", 100, subsample_size=10) as i:
            pyro.sample("z", dist.Normal(loc[i], 1.0))

    guide = AutoNormal(model) if kind == "AutoNormal" else pyro_natgrad.record_args(custom)
    reader = GuideReader(guide)
    drawn = [pyro.poutine.trace(guide).get_trace().nodes["N"]["value"] for _ in range(3)][-1]
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="drew different subsamples of plate"):
        assert torch.equal(reader.trace().nodes["N"]["value"], drawn)
    assert torch.equal(reader.trace().nodes["N"]["value"], drawn)
    assert torch.equal(torch.get_rng_state(), state)
    for _ in range(2):  # warned once per reader
        guide()
    reader.trace()
    class Fails(pyro.poutine.messenger.Messenger):
        def _pyro_sample(self, msg):
            if msg["name"] != "N":
                raise RuntimeError("a site failed")

    with pytest.raises(RuntimeError, match="a site failed"), Fails():
        guide()
    assert not _PYRO_STACK


def test_guide_reader_counts_a_poutine_mask_and_names_a_site_whose_mask_varies():
    """A site under ``poutine.mask`` counts as a MaskedDistribution does (all False: no copies,
    not stepped); a mask that differs between a site's elements, by ``.mask()`` or
    ``poutine.mask``, raises naming the site and the way out."""
    import pyro.distributions as dist
    from pyro import poutine

    from pyro_natgrad.guides import GuideReader

    def guide(mask_a, mask_b):
        loc = pyro.param("loc", torch.zeros(3))
        pyro.sample("a", dist.Normal(loc, 1.0).mask(mask_a).to_event(1))
        with poutine.mask(mask=mask_b):
            pyro.sample("b", dist.Normal(pyro.param("m", torch.zeros(3)), 1.0).to_event(1))

    guide = pyro_natgrad.record_args(guide)
    every, none, some = torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), \
        torch.tensor([True, False, True])
    store = pyro.get_param_store()
    for mask_b, read in [(every, ["a", "b"]), (none, ["a"]), (False, ["a"])]:
        guide(every, mask_b)
        leaves = {n: store.get_param(n).unconstrained() for n in sorted(store.keys())}
        groups = GuideReader(guide).read(leaves)
        assert sorted(s.name for g in groups for s in g.sites) == read
    for masks, site in [((some, every), "'a'"), ((every, some), "'b'")]:
        guide(*masks)
        with pytest.raises(ValueError, match=f"guide site {site}: .*mask differs.*split the "
                                             "site"):
            GuideReader(guide).read(leaves)
    pyro.clear_param_store()


@pytest.mark.parametrize("value, ok", [(0, True), (2.5, True), (-1e-9, False),
                                       (math.nan, False), (True, False), ("1", False)])
def test_require_numbers_names_the_option_and_its_value(value, ok):
    owner = type("Piece", (), {"damping": value})()
    if ok:
        require_numbers(owner, ("damping",))
    else:
        with pytest.raises(ValueError, match="^Piece: damping must be a number >= 0, got "):
            require_numbers(owner, ("damping",), "Piece: ")


@pytest.mark.parametrize("value, low, ok", [(1, 1, True), (0, 0, True), (0, 1, False),
                                            (2.0, 1, False), (True, 0, False)])
def test_require_counts_names_the_option_and_its_value(value, low, ok):
    owner = type("Piece", (), {"iters": value})()
    if ok:
        require_counts(owner, ("iters",), low)
    else:
        with pytest.raises(ValueError, match=f"^iters must be an integer >= {low}, got "):
            require_counts(owner, ("iters",), low)


def test_a_stateful_piece_serves_one_live_optimizer():
    """Two optimizers given the same piece object would share its state (a PflugCeiling's
    ceiling, a KLTrustRegion's radii): the second is refused with a message that names the
    piece and both roles; a piece of an optimizer that is gone may be given again."""
    def guide():
        pyro.sample("z", pyro.distributions.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    ceiling, region = pyro_natgrad.optim.PflugCeiling(), pyro_natgrad.optim.KLTrustRegion()
    first = pyro_natgrad.NaturalGradient(guide, stationarity=ceiling, trust_region=region)
    with pytest.raises(ValueError, match="PflugCeiling given as this WassersteinGradient's "
                                         "stationarity is also the stationarity of another "
                                         "NaturalGradient"):
        pyro_natgrad.WassersteinGradient(guide, stationarity=ceiling)
    with pytest.raises(ValueError, match="KLTrustRegion .* trust_region"):
        pyro_natgrad.NaturalGradient(guide, trust_region=region)
    pyro_natgrad.NaturalGradient(guide, stationarity=pyro_natgrad.optim.PflugCeiling())
    del first
    gc.collect()
    pyro_natgrad.WassersteinGradient(guide, stationarity=ceiling, trust_region=region)


def _adapt(adaptation, g, direction=None, sizes=(2000, 2000)):
    return adaptation.caps(KEY, sizes, g, g if direction is None else direction)


def test_variance_adaptation_reads_each_blocks_signal_fraction_from_successive_directions():
    """φ = |s|²/(|s|² + σ²) per block from the cosine of successive directions: a block of pure
    noise is capped at the floor, a noiseless one not at all, one with |s|² = σ² near ½; the
    first direction of a group is never capped (a conjugate model's exact step stands)."""
    gen = torch.Generator().manual_seed(0)
    n = 2000
    signal = torch.randn(n, generator=gen, dtype=torch.float64)
    adaptation = pyro_natgrad.optim.VarianceAdaptation()
    caps = []
    for _ in range(40):
        noise = torch.randn(n, generator=gen, dtype=torch.float64)
        half = signal + torch.randn(n, generator=gen, dtype=torch.float64)  # |s|² ≈ σ²
        caps.append(adaptation.caps(KEY, (n, n, n), torch.cat([signal, noise, half]),
                                    torch.cat([signal, noise, half])))
    assert caps[0] == [1.0, 1.0, 1.0]
    clean, pure, mixed = caps[-1]
    assert clean == 1.0 and pure == adaptation.floor
    assert 0.4 < mixed < 0.6


def test_variance_adaptation_caps_an_overshooting_block_and_uses_the_metric_inner_product():
    """A direction whose signal reverses every step (an overshoot) reads c = −1: the block is
    capped at the floor. The cosine is taken in the metric's inner product gᵀδ, δ = F⁻¹g: with
    F = diag(10⁴, 1) and g alternating (1, ±a), a² = 10⁻⁴/3, it is (10⁻⁴ − a²)/(10⁻⁴ + a²) = ½,
    where the Euclidean cosine of the gradients is ≈ 1 and that of the directions ≈ −1."""
    adaptation = pyro_natgrad.optim.VarianceAdaptation(floor=0.05)
    metric = torch.tensor([1e4, 1.0], dtype=torch.float64)
    a = (1e-4 / 3) ** 0.5
    for sign in (1, -1, 1, -1, 1, -1):
        g = torch.tensor([sign, sign, 1.0, sign * a], dtype=torch.float64)
        caps = adaptation.caps(KEY, (2, 2), g, torch.cat([g[:2], g[2:] / metric]))
    assert caps[0] == 0.05
    assert caps[1] == pytest.approx(0.5)


def test_variance_adaptation_reads_a_subsampled_block_where_both_steps_moved():
    """Local params under a subsampled plate: each step's gradient is zero outside its batch, so
    successive directions are orthogonal there whatever their signal. A noiseless signal read on
    random batches of a quarter of the coordinates is not capped (it was capped at the floor
    when the cosine ran over the whole block); pure noise on the same batches still is."""
    gen = torch.Generator().manual_seed(2)
    n = 400
    signal = torch.randn(n, generator=gen, dtype=torch.float64)
    adaptation = pyro_natgrad.optim.VarianceAdaptation()
    for _ in range(30):
        batch = torch.zeros(n, dtype=torch.bool)
        batch[torch.randperm(n, generator=gen)[:n // 4]] = True
        noise = torch.randn(n, generator=gen, dtype=torch.float64)
        g = torch.cat([signal * batch, noise * batch])
        caps = adaptation.caps(KEY, (n, n), g, g)
    assert caps[0] == 1.0 and caps[1] == adaptation.floor


def test_variance_adaptation_state_round_trip_forget_and_options():
    adaptation = pyro_natgrad.optim.VarianceAdaptation()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        _adapt(adaptation, torch.randn(4000, generator=gen))
    copy = pyro_natgrad.optim.VarianceAdaptation()
    copy.load_state_dict(adaptation.state_dict())
    g = torch.randn(4000, generator=gen)
    assert _adapt(copy, g) == _adapt(adaptation, g)
    adaptation.forget(KEY)
    assert adaptation.current(KEY) == [] and _adapt(adaptation, g) == [1.0, 1.0]
    for bad in ({"decay": 1.0}, {"floor": 0.0}, {"floor": 2.0}):
        with pytest.raises(ValueError, match="VarianceAdaptation needs"):
            pyro_natgrad.optim.VarianceAdaptation(**bad)


def test_linear_proposal_with_caps_moves_each_param_at_its_capped_rate():
    """θᵢ − min(ρ, capᵢ)·dᵢ, and the KL model ½ wᵀMw from the blocks' Gram matrix."""
    from pyro_natgrad.optim.proposal import linear_proposal

    theta = [torch.zeros(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    direction = torch.arange(1.0, 6.0, dtype=torch.float64)
    gram = torch.tensor([[2.0, 0.5], [0.5, 3.0]], dtype=torch.float64)
    proposal = linear_proposal("closed_form", ("a", "b"), theta, direction, gram, [1.0, 0.1])
    c = proposal.candidate(0.5)
    torch.testing.assert_close(c.values["a"], -0.5 * direction[:2])
    torch.testing.assert_close(c.values["b"], -0.1 * direction[2:])
    w = torch.tensor([0.5, 0.1], dtype=torch.float64)
    assert c.kl == pytest.approx(0.5 * float(w @ gram @ w))
    assert proposal.candidate(0.05).kl == pytest.approx(0.5 * 0.05 ** 2 * float(gram.sum()))


def test_block_gram_is_the_damped_metric_between_the_params_blocks():
    """Mᵢⱼ = dᵢᵀ(F + λI)dⱼ, one block per param; its sum is the whole direction's curvature."""
    from pyro_natgrad.optim.fisher_solve import _block_gram, _Fixed

    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    fisher, direction = a @ a.T, torch.randn(6, generator=gen, dtype=torch.float64)
    gram = _block_gram(_Fixed(fisher), 0.1, direction, [2, 4])
    damped = fisher + 0.1 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(gram[0, 1], direction[:2] @ damped[:2, 2:] @ direction[2:])
    torch.testing.assert_close(gram.sum(), direction @ damped @ direction)


def test_fisher_solve_form_is_cg_for_a_closed_form_metric_with_many_argument_entries():
    """Dense up to dense_max params, but CG where the sites' arguments have more than
    2·cg_iters entries (the dense Jacobian costs a backward pass per entry: an amortized
    encoder's batch × outputs), and the diagonal for a rank-deficient Monte Carlo F̂."""
    from pyro_natgrad.optim.fisher_solve import _default_form

    assert _default_form(800, 2000, False, 100, 50) == "dense"
    assert _default_form(800, 2000, False, 101, 50) == "cg"
    assert _default_form(800, 2000, False, None, 50) == "dense"  # Monte Carlo: by its draws
    assert _default_form(3000, 2000, False, 4, 50) == "cg"
    assert _default_form(800, 2000, True, None, 50) == "diag"


def test_gathered_parameterization_reads_and_writes_the_batchs_entries_only():
    """``Gathered``: the arguments are the constrained params at the batch's indices along the
    found axis; the inverse writes them into those entries of the current params and leaves the
    others; ``_gathered_axis`` finds the axis only where the values match exactly."""
    from pyro_natgrad.guides import Gathered, _gathered_axis

    loc = torch.randn(3, 8, dtype=torch.float64)
    raw = torch.randn(3, 8, dtype=torch.float64)
    batch = torch.tensor([6, 1, 4])
    positive = constraints.positive
    assert _gathered_axis(loc, loc[:, batch], batch) == -1
    assert _gathered_axis(loc, loc[:, batch] + 1e-12, batch) is None
    assert _gathered_axis(loc, loc[:, batch], None) is None
    param = Gathered(("l", "s"), (constraints.real, positive), (-1, -1), batch,
                     {"l": loc, "s": raw})
    args = param.args({"l": loc, "s": raw})
    torch.testing.assert_close(args[1], raw.exp()[:, batch])
    values = param.unconstrained((args[0] + 1.0, args[1] * 2.0))
    others = torch.ones(8, dtype=torch.bool)
    others[batch] = False
    assert torch.equal(values["l"][:, others], loc[:, others])
    assert torch.equal(values["s"][:, others], raw[:, others])
    torch.testing.assert_close(values["l"][:, batch], loc[:, batch] + 1.0)
    torch.testing.assert_close(values["s"][:, batch], raw[:, batch] + math.log(2.0))
