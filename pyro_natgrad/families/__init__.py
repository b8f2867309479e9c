"""Exponential-family geometry, one module per family, and the lookup from a distribution."""

from __future__ import annotations

from torch.distributions import Distribution, Independent

from .base import ExponentialFamily, Params
from .normal import Normal

FAMILIES: tuple[ExponentialFamily, ...] = (Normal(),)


def unwrap(d: Distribution) -> tuple[Distribution, float]:
    """Strips ``Independent``, ``ExpandedDistribution`` and ``MaskedDistribution`` wrappers.

    Returns the bare distribution and its multiplicity: how many copies of each base element the
    wrapped distribution holds (an expanded distribution is a product of identical copies, whose
    Fisher is that many times the base Fisher).
    """
    from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution

    multiplicity = 1.0
    while True:
        if isinstance(d, Independent):
            d = d.base_dist
        elif isinstance(d, MaskedDistribution):
            d = d.base_dist
        elif isinstance(d, ExpandedDistribution):
            multiplicity *= d.batch_shape.numel() / max(d.base_dist.batch_shape.numel(), 1)
            d = d.base_dist
        else:
            return d, multiplicity


def family_of(d: Distribution) -> ExponentialFamily | None:
    """The registered family of a bare distribution, or None."""
    for fam in FAMILIES:
        if type(d) is fam.dist_class or (
            isinstance(d, fam.dist_class) and type(d).__mro__[1:2] == (fam.dist_class,)
        ):
            return fam
    return None


__all__ = ["ExponentialFamily", "Params", "FAMILIES", "family_of", "unwrap", "Normal"]
