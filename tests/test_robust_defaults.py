"""Issue 2, item 9: real regressions from posteriordb, unscaled, from Pyro's default
initialisation, fitted with AutoMultivariateNormal and NaturalGradient's defaults, reach the
reference (long-run NUTS) posterior means within 0.1 reference sd in at most 200 steps; and a
mean-field guide, whose natural step is only a Jacobi step on these correlated posteriors, gets
there with the default momentum."""

from __future__ import annotations

import pyro
import pytest
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal

from benchmarks.posteriordb import POSTERIORS, guide_moments, posterior_error
from pyro_natgrad import NaturalGradient


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sblrc-blr", "arK-arK", "diamonds-diamonds"])
@pytest.mark.parametrize("seed", [0, 1])
def test_full_rank_fit_reaches_reference_means_in_200_steps(name, seed):
    mean_error, sd_error = _fit_errors(name, AutoMultivariateNormal, seed)
    assert mean_error < 0.1, f"{name}: max |Δmean|/sd_ref = {mean_error:.3f}"
    assert sd_error < 0.35, f"{name}: max |log(sd/sd_ref)| = {sd_error:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_mean_field_fit_of_an_unscaled_regression_reaches_reference_means(seed):
    """sblrc-blr (5 unscaled coefficients and a scale), AutoDiagonalNormal, 200 steps: the posterior
    means within 0.5 reference sd (measured 0.07–0.31 over 5 runs; without momentum 2.1–11, and
    the best Adam of the benchmark's grid ends 1,757 sd away). The sds of a mean-field fit are
    too small on a correlated posterior (the optimum's 1/Λᵢᵢ): measured max |log(sd/sd_ref)|
    0.73–0.76, bounded here by 1."""
    mean_error, sd_error = _fit_errors("sblrc-blr", AutoDiagonalNormal, seed)
    assert mean_error < 0.5, f"max |Δmean|/sd_ref = {mean_error:.3f}"
    assert sd_error < 1.0, f"max |log(sd/sd_ref)| = {sd_error:.3f}"


def _fit_errors(name: str, autoguide: type, seed: int) -> tuple[float, float]:
    """200 NaturalGradient steps (defaults, 64 particles) on a posteriordb posterior; the fitted
    guide's max |Δmean|/sd_ref and max |log(sd/sd_ref)| against the reference draws."""
    posterior = POSTERIORS[name]()
    pyro.set_rng_seed(seed)
    guide = autoguide(posterior.model)
    svi = SVI(posterior.model, guide, NaturalGradient(guide),
              Trace_ELBO(num_particles=64, vectorize_particles=True))
    for _ in range(200):
        svi.step(*posterior.data)
    return posterior_error(posterior, guide_moments(guide))
