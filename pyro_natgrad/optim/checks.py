"""Checks of a candidate step: each returns the problem it finds (a short word), or None."""

from __future__ import annotations

import math

import pyro
import torch
from torch import Tensor
from torch.distributions import constraints, transform_to

from ..guides import GuideReader
from .proposal import Candidate

__all__ = ["finite", "in_support", "rebuild"]


def finite(candidate: Candidate | None) -> str | None:
    """``"domain"`` for no candidate (the direction found none), ``"non-finite"`` for a value or
    a KL that is NaN or ±∞."""
    if candidate is None:
        return "domain"
    if not all(torch.isfinite(v).all() for v in candidate.values.values()):
        return "non-finite"
    if candidate.kl is not None and not math.isfinite(candidate.kl):
        return "non-finite"
    return None


def in_support(candidate: Candidate) -> str | None:
    """``"domain"`` when an unconstrained value maps outside its param's constraint or to a
    non-finite value (a softplus or exp that underflows to 0 leaves a scale's support)."""
    constraints_ = getattr(pyro.get_param_store(), "_constraints", {})
    with torch.no_grad():
        for name, value in candidate.values.items():
            constraint = constraints_.get(name, constraints.real)
            if constraint is constraints.real:
                continue
            constrained = transform_to(constraint)(value)
            if not (torch.isfinite(constrained).all() and constraint.check(constrained).all()):
                return "domain"
    return None


def rebuild(candidate: Candidate, leaves: dict[str, Tensor], reader: GuideReader) -> str | None:
    """Re-builds the guide at the candidate's values, every sample site replayed from the trace
    the step was read from, and replaces the candidate's KL by its ``measure``. A step in the
    guide's own parameters can pass every elementwise check and still give, e.g., a
    LowRankMultivariateNormal whose capacitance matrix fails its Cholesky. The params are left
    as they were; ``"domain"`` when the guide cannot be built, ``"non-finite"`` for a non-finite
    measured KL."""
    with torch.no_grad():
        current = {n: leaves[n].detach().clone() for n in candidate.values}
        for n, v in candidate.values.items():
            leaves[n].copy_(v)
    try:
        trace = reader.trace(replay=reader.last_trace)
        kl = candidate.measure(trace) if candidate.measure is not None else candidate.kl
    except (torch.linalg.LinAlgError, ValueError, RuntimeError):
        return "domain"
    finally:
        with torch.no_grad():
            for n, v in current.items():
                leaves[n].copy_(v)
    if kl is not None and not math.isfinite(kl):
        return "non-finite"
    candidate.kl = kl
    return None
