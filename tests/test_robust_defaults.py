"""Issue 2, item 9: real regressions from posteriordb, unscaled, from Pyro's default
initialisation, fitted with AutoMultivariateNormal and NaturalGradient's defaults, reach the
reference (long-run NUTS) posterior means within 0.1 reference sd in at most 200 steps."""

from __future__ import annotations

import pyro
import pytest
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

from benchmarks.posteriordb import POSTERIORS, guide_moments, posterior_error
from pyro_natgrad import NaturalGradient


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sblrc-blr", "arK-arK", "diamonds-diamonds"])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_rank_fit_reaches_reference_means_in_200_steps(name, seed):
    posterior = POSTERIORS[name]()
    pyro.set_rng_seed(seed)
    guide = AutoMultivariateNormal(posterior.model)
    svi = SVI(posterior.model, guide, NaturalGradient(guide),
              Trace_ELBO(num_particles=64, vectorize_particles=True))
    for _ in range(200):
        svi.step(*posterior.data)
    mean_error, sd_error = posterior_error(posterior, guide_moments(guide))
    assert mean_error < 0.1, f"{name}: max |Δmean|/sd_ref = {mean_error:.3f}"
    assert sd_error < 0.35, f"{name}: max |log(sd/sd_ref)| = {sd_error:.3f}"
