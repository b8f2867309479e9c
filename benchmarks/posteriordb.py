"""The names ``tests/test_robust_defaults.py`` imports; the models live in :mod:`benchmarks.models`.
"""

from __future__ import annotations

from torch.distributions import biject_to

from .models import POSTERIORS, Moments, Posterior, moment_error

__all__ = ["POSTERIORS", "Posterior", "guide_moments", "posterior_error"]


def guide_moments(guide, num_samples: int = 4000) -> Moments:
    """Mean and sd of each latent site of an AutoContinuous guide, constrained space (no model
    run: deterministic sites are not included; use :func:`benchmarks.models.moments` for them)."""
    draws = guide.get_posterior().sample((num_samples,)).detach()
    out = {}
    for site, u in guide._unpack_latent(draws):
        v = biject_to(site["fn"].support)(u).reshape(num_samples, -1)
        out[site["name"]] = (v.mean(0), v.std(0))
    return out


def posterior_error(posterior: Posterior, fitted: Moments) -> tuple[float, float]:
    """(max |Δmean|/sd_ref, max |log(sd/sd_ref)|) of ``fitted`` against the reference."""
    return moment_error(posterior.reference, fitted)
