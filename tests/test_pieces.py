"""The step's pieces without SVI: trust region, momentum, domain repairs, checks. Each test names
the mechanism it pins."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.distributions import constraints

from pyro_natgrad.families import MultivariateNormal, Normal
from pyro_natgrad.optim import (
    Candidate,
    HeavyBall,
    Judgement,
    KLTrustRegion,
    PrecisionShortening,
    Retraction,
)
from pyro_natgrad.optim.checks import finite, in_support
from pyro_natgrad.optim.trust_region import rate_for_kl

ACCEPTED = Judgement(descent=True, change=-1.0, ratio=-0.5, accepted=True)
OVERSHOOT = Judgement(descent=True, change=-1.0, ratio=0.5, accepted=True)
REJECTED = Judgement(descent=True, change=1.0, ratio=2.0, accepted=False)
KEY = ("loc", "scale")


def test_trust_region_clean_exact_steps_are_unbounded_until_a_repair_or_a_rejection():
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


def test_trust_region_grows_past_accepted_steps_that_did_not_overshoot():
    region = KLTrustRegion()
    region.bound(KEY, 16, exact=False)
    region.update(KEY, 16, kl=1.5, judgement=ACCEPTED)
    assert region.radius[KEY] == 3.0
    region.update(KEY, 16, kl=2.9, judgement=OVERSHOOT)
    assert region.radius[KEY] == 3.0
    assert region.bound(KEY, 4, exact=False) == min(3.0, 0.5 * 4)  # the linear cap ½n


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


@pytest.mark.parametrize("bad", [dict(start=0.0), dict(grow=0.5), dict(shrink=1.0),
                                 dict(min_radius=-1.0)])
def test_trust_region_rejects_bad_options(bad):
    with pytest.raises(ValueError, match="KLTrustRegion"):
        KLTrustRegion(**bad)


def test_heavy_ball_velocity_restarts_uphill_and_remembers_only_accepted_steps():
    """β(m − m_prev)/ρ_prev, dropped when the last move went uphill by the new gradient; "auto"
    is 0.9 on a factorized family, 0 on a full-covariance one."""
    momentum, normal = HeavyBall(), Normal()
    loc = torch.tensor([1.0, 2.0])
    assert momentum.velocity(KEY, normal, loc, d_loc=torch.ones(2)) is None  # no history
    momentum.accept(KEY, Candidate({}, rate=0.5, anchor=torch.tensor([0.0, 0.0])))
    downhill = momentum.velocity(KEY, normal, loc, d_loc=-torch.ones(2))
    torch.testing.assert_close(downhill, 0.9 / 0.5 * loc)
    assert momentum.velocity(KEY, normal, loc, d_loc=torch.ones(2)) is None  # uphill: restart
    assert momentum.velocity(KEY, MultivariateNormal(), loc, d_loc=-torch.ones(2)) is None
    momentum.accept(KEY, Candidate({}, rate=0.25))  # no anchor (not a Gaussian step): kept
    copy = HeavyBall()
    copy.load_state_dict(momentum.state_dict())
    torch.testing.assert_close(copy.velocity(KEY, normal, loc, -torch.ones(2)), downhill)
    with pytest.raises(ValueError, match="momentum"):
        HeavyBall(1.0)


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
    assert in_support(Candidate({"scale": torch.tensor(-200.0)}, rate=1.0)) == "domain"  # exp → 0
    assert in_support(Candidate({"scale": torch.tensor(-2.0)}, rate=1.0)) is None


def test_mirror_domain_none_means_no_repair_and_bad_pieces_are_named():
    from pyro_natgrad.optim import Mirror

    assert Mirror(domain=None).domain is None
    assert isinstance(Mirror().domain, PrecisionShortening)
    with pytest.raises(TypeError, match="Mirror domain"):
        Mirror(domain="retract")
