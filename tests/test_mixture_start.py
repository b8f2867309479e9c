"""The trust region's cautious first phase (``KLTrustRegion(probation=...)``): its unit tests
without SVI, and the Gaussian mixture on iris that motivates it.

Iris mixture: K = 3 components with diagonal scales on the four standardized features, weights,
locs and scales latent (Pyro's GMM tutorial with priors on every global), the assignments
enumerated by ``TraceEnum_ELBO`` and hidden from an ``AutoNormal`` guide. From AutoNormal's
default start (all components at the same place) a fit ends either in the three-cluster mode
(−ELBO ≈ 520) or in a two-cluster mode with one component empty at its prior (≈ 570).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoNormal
from pyro.ops.indexing import Vindex

from pyro_natgrad import NaturalGradient, record_args
from pyro_natgrad.optim import Judgement, KLTrustRegion

from .conjugate import CONJUGATE_SCALARS

ACCEPTED = Judgement(descent=True, change=-1.0, ratio=-0.5, accepted=True)
REJECTED = Judgement(descent=True, change=1.0, ratio=2.0, accepted=False)
KEY = ("loc", "scale")
N = 16  # params: the start radius is ½√16 = 2 nats


@pytest.mark.unit
def test_probation_trusts_only_the_first_clean_step_and_does_not_grow():
    region = KLTrustRegion(probation=3)
    assert region.bound(KEY, N, exact=True, clean=True) == math.inf  # the conjugate step
    region.update(KEY, N, kl=50.0, judgement=ACCEPTED)
    for _ in range(2):  # judged steps 2 and 3: bounded at the start radius, which does not grow
        assert region.bound(KEY, N, exact=True, clean=True) == 2.0
        region.update(KEY, N, kl=1.9, judgement=ACCEPTED)
    assert region.radius[KEY] == 2.0 and KEY not in region.distrusted
    # probation over, never rejected nor repaired: clean steps are trusted again (held only to
    # clean_growth × the last accepted KL, above the radius)
    assert region.bound(KEY, N, exact=True, clean=True) == 4 * 1.9
    # first-order steps grow again after probation
    other = ("w",)
    for _ in range(3):
        region.bound(other, N, exact=False)
        region.update(other, N, kl=1.9, judgement=ACCEPTED)
    assert region.radius[other] == 2.0
    region.update(other, N, kl=1.9, judgement=ACCEPTED)
    assert region.radius[other] == 3.8


@pytest.mark.unit
def test_probation_a_rejection_or_repair_distrusts_for_good():
    region = KLTrustRegion(probation=3)
    region.bound(KEY, N, exact=True, clean=True)
    region.update(KEY, N, kl=50.0, judgement=REJECTED)
    assert region.radius[KEY] == 2.0  # a rejected unbounded step: back to the start at most
    for _ in range(5):
        assert region.bound(KEY, N, exact=True, clean=True) <= 2.0
        region.update(KEY, N, kl=0.1, judgement=ACCEPTED)
    repaired = ("a",)
    region.bound(repaired, N, exact=True, clean=True)
    region.update(repaired, N, kl=1.0, judgement=ACCEPTED)
    assert region.bound(repaired, N, exact=True, clean=False) == 2.0
    for _ in range(3):
        region.update(repaired, N, kl=0.1, judgement=ACCEPTED)
    assert region.bound(repaired, N, exact=True, clean=True) == 2.0


@pytest.mark.unit
def test_probation_zero_is_the_plain_region_and_state_round_trips():
    plain, zero = KLTrustRegion(), KLTrustRegion(probation=0)
    for region in (plain, zero):
        region.bound(KEY, N, exact=True, clean=True)
        region.update(KEY, N, kl=5.0, judgement=ACCEPTED)
        assert region.bound(KEY, N, exact=True, clean=True) == 4 * 5.0  # clean_growth × 5
    region = KLTrustRegion(probation=5)
    region.bound(KEY, N, exact=True, clean=True)
    region.update(KEY, N, kl=5.0, judgement=ACCEPTED)
    copy = KLTrustRegion(probation=5)
    copy.load_state_dict(region.state_dict())
    assert copy == region and copy.judged == {KEY: 1}
    copy.forget(KEY)
    assert copy.bound(KEY, N, exact=True, clean=True) == math.inf  # a new group's first step


@pytest.mark.unit
@pytest.mark.parametrize("bad", [-1, 2.5])
def test_probation_must_be_a_count(bad):
    with pytest.raises(ValueError, match="probation"):
        KLTrustRegion(probation=bad)


@pytest.mark.parametrize("case", CONJUGATE_SCALARS, ids=lambda c: c.__name__)
def test_probation_keeps_the_one_step_exact_conjugate_posterior(case):
    """The cautious phase trusts a group's first clean step: with exact gradients and lr = 1 a
    conjugate model still lands on its exact posterior in one step, and stays there."""
    c = case(torch.float64)
    guide = record_args(c.guide)
    opt = NaturalGradient(guide, lr=1.0, trust_region=KLTrustRegion(probation=50))
    svi = SVI(c.model, guide, opt, c.loss)
    guide(*c.data)
    for step in range(3):
        svi.step(*c.data)
        if step == 0:
            assert all(v["method"] == "natural" for v in opt.last_step.values())
        for name, value in c.exact.items():
            torch.testing.assert_close(pyro.param(name).detach(), value, rtol=1e-6, atol=1e-8)


K = 3


@config_enumerate
def iris_model(data: torch.Tensor) -> None:
    d = data.shape[-1]
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * data.new_ones(K)))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(data.new_zeros(d), 10.0).to_event(1))
        scale = pyro.sample("scale", dist.LogNormal(data.new_zeros(d), 2.0).to_event(1))
    with pyro.plate("data", len(data)):
        a = pyro.sample("assignment", dist.Categorical(weights))
        # unsqueeze: a particle dim, if any, stays left of the data plate's dim
        loc, sc = (Vindex(t.unsqueeze(-3))[..., a, :] for t in (locs, scale))
        pyro.sample("obs", dist.Normal(loc, sc).to_event(1), obs=data)


def iris() -> torch.Tensor:
    from sklearn.datasets import load_iris
    x = torch.tensor(load_iris().data, dtype=torch.float64)
    return (x - x.mean(0)) / x.std(0)


def fit_iris(data: torch.Tensor, seed: int, steps: int, **options) -> float:
    """A fit from AutoNormal's default start with 1-particle TraceEnum_ELBO gradients; its −ELBO
    from 1,000 particles."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(poutine.block(iris_model, hide=["assignment"]))
    svi = SVI(iris_model, guide, NaturalGradient(guide, **options),
              TraceEnum_ELBO(max_plate_nesting=1))
    for _ in range(steps):
        svi.step(data)
    elbo = TraceEnum_ELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        return elbo.loss(iris_model, guide, data)


@pytest.mark.slow
def test_iris_mixture_defaults_can_end_in_the_two_cluster_mode_probation_mostly_avoids_it():
    """At the defaults some fits are not in the three-cluster mode after 200 steps: the cautious
    first phase is not the default (it slows other problems). With
    ``KLTrustRegion(probation=50)`` the worse mode is rare (measured with 1,500 steps: defaults 4
    of 9 seeds, probation 1 of 9; best Adam of a 4-rate grid 0 of 9). At 200 steps, seeds 0–7:
    defaults 6 in the three-cluster mode, one in the two-cluster mode (570.1) and one leaving it
    (534 at step 200, 581 at 100, 521 at 400); probation 8 of 8 (with the heavy ball's secant
    hold left out, ``HeavyBall(secant=False)``, 3 of the defaults ended in the two-cluster
    mode)."""
    data = iris()
    seeds, steps = range(8), 200
    defaults = [fit_iris(data, seed, steps) for seed in seeds]
    cautious = [fit_iris(data, seed, steps, trust_region=KLTrustRegion(probation=50))
                for seed in seeds]
    for value in cautious:  # three clusters ≈ 520.5, two clusters ≈ 570
        assert value < 523 or 565 < value < 575
    assert all(value < 575 for value in defaults), defaults
    away = sum(value > 523 for value in defaults), sum(value > 545 for value in cautious)
    assert away[0] >= 1 and away[1] <= 1, (defaults, cautious)
