"""Exponential-family geometry, one module per family, and the lookup from a distribution."""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, Independent

from .base import ExponentialFamily, Params
from .categorical import Bernoulli, Categorical
from .dirichlet import Beta, Dirichlet
from .gamma import Exponential, Gamma
from .multivariate_normal import LowRankMultivariateNormal, MultivariateNormal
from .normal import Normal
from .poisson import Poisson

FAMILIES: tuple[ExponentialFamily, ...] = (
    Normal(), MultivariateNormal(), LowRankMultivariateNormal(), Gamma(), Exponential(), Beta(),
    Dirichlet(), Categorical(), Bernoulli(), Poisson(),
)


def unwrap(d: Distribution) -> tuple[Distribution, float]:
    """Strips ``Independent``, ``ExpandedDistribution`` and ``MaskedDistribution`` wrappers.

    Returns the bare distribution and its multiplicity: how many copies of each base element the
    wrapped distribution holds (an expanded distribution is a product of identical copies, whose
    Fisher is that many times the base Fisher). A mask of ``False`` (or all False) contributes 0
    copies, ``True`` (or all True) leaves the count unchanged; a mask that differs between batch
    elements has no single multiplicity and is refused.
    """
    from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution

    multiplicity = 1.0
    while True:
        if isinstance(d, Independent):
            d = d.base_dist
        elif isinstance(d, MaskedDistribution):
            multiplicity *= mask_multiplicity(d._mask)
            d = d.base_dist
        elif isinstance(d, ExpandedDistribution):
            multiplicity *= math.prod(d.batch_shape) / math.prod(d.base_dist.batch_shape)
            d = d.base_dist
        else:
            return d, multiplicity


def mask_multiplicity(mask: bool | torch.Tensor) -> float:
    """The copies a mask leaves of each element: 1 for True (or all True), 0 for False (or all
    False); raises ValueError for a mask that differs between elements."""
    if isinstance(mask, bool):
        return float(mask)
    if bool(mask.all()):
        return 1.0
    if not bool(mask.any()):
        return 0.0
    raise ValueError("a MaskedDistribution or poutine.mask whose mask differs between batch "
                     "elements has no single multiplicity: only masks that are all True or all "
                     "False are supported")


def family_of(d: Distribution) -> ExponentialFamily | None:
    """The registered family of a bare distribution, or None.

    Matches the torch class itself or Pyro's wrapper of it (``pyro.distributions.X`` derives
    directly from ``torch.distributions.X``); other subclasses (torch's ``Chi2`` of ``Gamma``) may
    constrain or rename the arguments and are not matched.
    """
    from pyro.distributions.torch_distribution import TorchDistributionMixin

    cls = type(d)
    for fam in FAMILIES:
        if cls is fam.dist_class or (
            issubclass(cls, TorchDistributionMixin) and cls.__mro__[1] is fam.dist_class
        ):
            return fam
    return None


__all__ = [
    "ExponentialFamily", "Params", "FAMILIES", "family_of", "unwrap", "mask_multiplicity", "Normal",
    "MultivariateNormal", "LowRankMultivariateNormal", "Gamma", "Exponential", "Beta", "Dirichlet",
    "Categorical", "Bernoulli", "Poisson",
]
