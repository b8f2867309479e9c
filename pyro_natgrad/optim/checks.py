"""Checks of a candidate step: each returns the problem it finds (a short word), or None."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pyro
import torch
from torch import Tensor
from torch.distributions import constraints, transform_to

from ..guides import GuideReader, is_real, is_unit_lower_cholesky
from .proposal import Candidate

__all__ = ["all_finite", "closed_form", "finite", "in_support", "rebuild"]


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Every element of every tensor is finite. Decided by one sum: a NaN or ±∞ element makes
    the sum NaN or ±∞ (∞ − ∞ = NaN), so a finite sum proves them all finite; only a sum that
    overflows (or a non-finite element) takes the elementwise test. A sum reads each tensor
    once; ``isfinite(t).all()`` writes and reads a boolean copy."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    if bool(torch.isfinite(sum(t.sum() for t in tensors))):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def finite(candidate: Candidate | None) -> str | None:
    """``"domain"`` for no candidate (the direction found none) or one whose values cannot be
    formed (a deferred map back to the params failed, e.g. the Cholesky of a covariance that is
    not numerically positive definite), ``"non-finite"`` for a value or a KL that is NaN or
    ±∞."""
    if candidate is None:
        return "domain"
    try:
        values = list(candidate.values.values())
    except (torch.linalg.LinAlgError, ValueError, RuntimeError):
        return "domain"
    if not all_finite(values):
        return "non-finite"
    if candidate.kl is not None and not math.isfinite(candidate.kl):
        return "non-finite"
    return None


def in_support(candidate: Candidate) -> str | None:
    """``"domain"`` when an unconstrained value maps outside its param's constraint or to a
    non-finite value (a softplus or exp that underflows to 0 leaves a scale's support). Values
    are taken as finite (:func:`finite` runs first): a constraint whose transform maps every
    finite value into its support, finitely (real, unit lower triangular), is not evaluated."""
    constraints_ = getattr(pyro.get_param_store(), "_constraints", {})
    with torch.no_grad():
        for name, value in candidate.values.items():
            constraint = constraints_.get(name, constraints.real)
            if _total(constraint):
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
    return _measured(candidate, kl)


def closed_form(candidate: Candidate) -> str | None:
    """Replaces the candidate's KL by its ``closed_form_kl``, the guide not re-built (the map
    from its params to q is known); ``"domain"`` when q cannot be formed at the candidate (a
    factorization fails), ``"non-finite"`` for a non-finite KL."""
    try:
        with torch.no_grad():
            kl = candidate.closed_form_kl(candidate.values)
    except (torch.linalg.LinAlgError, ValueError, RuntimeError):
        return "domain"
    return _measured(candidate, kl)


def _measured(candidate: Candidate, kl: float | None) -> str | None:
    if kl is not None and not math.isfinite(kl):
        return "non-finite"
    candidate.kl = kl
    return None


def _total(constraint: constraints.Constraint) -> bool:
    """The constraint's transform maps every finite value to a finite point of its support:
    the identity of the reals, or x ↦ tril(x, −1) + I (Pyro's ``unit_lower_cholesky``)."""
    return is_real(constraint) or is_unit_lower_cholesky(constraint)
