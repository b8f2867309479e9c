"""Posteriors from posteriordb (stan-dev/posteriordb, BSD-3; data in ``benchmarks/posteriordb/``),
translated from Stan to Pyro once, with their gold-standard (long-run NUTS) reference moments.

Every model is written for vectorized particles: a global latent of shape (P, 1, D) broadcasts
against data (N, D) as ``(X * w).sum(-1)``. None of these Stan programs has an improper flat
prior; a ``<lower=0>`` parameter with a symmetric prior centred at 0 is the half (folded)
distribution, equal to Stan's truncated density up to a constant (diamonds states it exactly).

>>> post = load_posterior("sblrc-blr")
>>> posterior_error(post.model, guide, post.data, post.reference)  # after fitting ``guide``
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ark, diamonds, eight_schools, gp_pois_regr, sblrc
from ._reference import (
    ROOT,
    Moments,
    draws,
    moment_error,
    moments,
    posterior_error,
    read_data,
    reference,
)

__all__ = ["Posterior", "load_posterior", "POSTERIORS", "MODELS", "ROOT", "reference", "read_data",
           "draws",
           "moments", "moment_error", "posterior_error"]

MODELS: dict[str, tuple[Callable, Callable]] = {  # name -> (loader, model)
    sblrc.NAME: (sblrc.load, sblrc.model),
    ark.NAME: (ark.load, ark.model),
    diamonds.NAME: (diamonds.load, diamonds.model),
    eight_schools.NONCENTERED: (eight_schools.load, eight_schools.noncentered),
    eight_schools.CENTERED: (eight_schools.load, eight_schools.centered),
    gp_pois_regr.NAME: (gp_pois_regr.load, gp_pois_regr.model),
}


@dataclass
class Posterior:
    """A model, its data (the model's arguments) and the reference mean and sd of each site."""

    name: str
    model: Callable
    data: tuple[Tensor, ...]
    reference: Moments


def load_posterior(name: str, dtype: torch.dtype = torch.float64) -> Posterior:
    """The model, data (as ``dtype`` tensors) and reference moments of posterior ``name``."""
    load, model = MODELS[name]
    return Posterior(name, model, load(dtype), reference(name))


POSTERIORS: dict[str, Callable[..., Posterior]] = {
    name: functools.partial(load_posterior, name) for name in MODELS}
