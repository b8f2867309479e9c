"""The closed-form exponential-family Fisher, pulled back to the guide's own parameters.

For q_θ in an exponential family with natural parameters η(θ) and mean parameters μ(θ),
F(θ) = (∂η/∂θ)ᵀ F(η) (∂η/∂θ) = (∂η/∂θ)ᵀ (∂μ/∂θ), because F(η) = ∂μ/∂η
(Amari 1998, "Natural gradient works efficiently in learning", §3; Amari & Nagaoka 2000, §2.3).
A Fisher-vector product therefore needs only the two maps η(θ) and μ(θ) and reverse-mode
autodiff: no Jacobian is formed and the family's Fisher is never inverted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..families import ExponentialFamily
from ..families.base import Params
from .autodiff import jacobian, jvp, vjp
from .linalg import flat, hutchinson_trace, solve_metric, unflat


class PulledBackFisher:
    """F(θ) = Σ_sites m_s J_sᵀ F_s J_s over the sites of one group (m_s: multiplicity): J_s the
    Jacobian of the site's arguments, and F_s·u the family's closed-form product in its arguments
    where it has one (:meth:`~pyro_natgrad.families.ExponentialFamily.args_fisher_product`),
    else the η/μ pullback above."""

    def __init__(self, sites: Sequence[tuple[ExponentialFamily, tuple[Tensor, ...], float]],
                 leaves: Sequence[Tensor]):
        self.leaves = list(leaves)
        self._sites = list(sites)
        self._pullbacks: dict[int, tuple[Tensor, Tensor]] = {}
        # per site: the family's closed-form product at the (fixed) arguments, or None
        self._operators = [family.args_fisher_operator(_detached(args))
                           for family, args, _ in self._sites]

    def _pullback(self, i: int) -> tuple[Tensor, Tensor]:
        """The flat η(θ) and μ(θ) of site i, built once."""
        if i not in self._pullbacks:
            family, args, _ = self._sites[i]
            self._pullbacks[i] = (family.flatten(family.args_to_natural(*args))[0].reshape(-1),
                                  family.flatten(family.args_to_mean(*args))[0].reshape(-1))
        return self._pullbacks[i]

    def mvp(self, v: Tensor) -> Tensor:
        """F(θ)·v: J·v by the double-backward trick, the family's F·(J v) (closed form, or
        (∂η/∂θ)ᵀ applied to ∂μ/∂θ·v by one backward pass), then Jᵀ by one backward pass."""
        total = torch.zeros_like(v)
        for i, (_, args, multiplicity) in enumerate(self._sites):
            operator = self._operators[i]
            if operator is not None:
                flat_args = flat(args)
                tangent = tuple(unflat(jvp(flat_args, self.leaves, v), args))
                term = vjp(flat_args, self.leaves, flat(operator(tangent)))
            else:
                eta, mu = self._pullback(i)
                term = vjp(eta, self.leaves, jvp(mu, self.leaves, v))
            total = total + multiplicity * term
        return total

    def diag(self) -> Tensor:
        return self.dense().diagonal()

    def trace(self) -> Tensor:
        """tr F(θ) by Hutchinson's estimate from Fisher-vector products."""
        return hutchinson_trace(self.mvp, flat([x.detach() for x in self.leaves]))

    def dense(self) -> Tensor:
        """The matrix F(θ) (small groups only): Jᵀ F_args J from the Jacobian J of the site's
        arguments and the family's product applied to every argument direction, where it has one
        (a low-rank Gaussian's η has d + d² entries, its arguments d(r + 2): at d = 90, rank 10
        the η Jacobians took 2.7 s per step), else (∂η/∂θ)ᵀ(∂μ/∂θ) from the two Jacobians."""
        total = 0
        for i, (_, args, multiplicity) in enumerate(self._sites):
            operator = self._operators[i]
            if operator is not None:
                flat_args = flat(args)
                eye = torch.eye(flat_args.numel(), dtype=flat_args.dtype, device=flat_args.device)
                f_args = torch.cat([f.reshape(len(eye), -1)
                                    for f in operator(tuple(unflat(eye, args)))], -1)
                j = jacobian(flat_args, self.leaves)
                term = j.T @ f_args @ j
            else:
                eta, mu = self._pullback(i)
                term = jacobian(eta, self.leaves).T @ jacobian(mu, self.leaves)
            total = total + multiplicity * term
        return 0.5 * (total + total.T)


def solve_args_fisher(operator: Callable[[Params], Params], b: Params, damping: float,
                      max_iter: int = 100, rtol: float = 1e-6) -> Params:
    """(F + damping·I)⁻¹b in a family's own arguments, F given by its closed-form ``operator``
    (:meth:`~pyro_natgrad.families.ExponentialFamily.args_fisher_operator`), by conjugate
    gradients preconditioned with the operator's ``preconditioner(damping)`` where it has one
    (:meth:`~pyro_natgrad.families.multivariate_normal.LowRankFisher.preconditioner`).
    With params θ mapped invertibly onto the arguments (Jacobian J), the natural direction in θ
    is F_θ⁻¹g_θ = J⁻¹(F + λI)⁻¹J⁻ᵀg_θ for the metric Jᵀ(F + λI)J, J⁻ᵀg_θ the gradient in the
    arguments: one solve here and two products through the inverse map."""
    like = list(b)
    x = solve_metric(_FlatOperator(operator, like), flat(like), "cg", damping, max_iter, rtol)
    return tuple(unflat(x, like))


class _FlatOperator:
    """A family's operator on argument tuples shaped like ``like``, as a
    :class:`~pyro_natgrad.fisher.linalg.Metric` on flat vectors (its products, and its
    preconditioner where it has one)."""

    def __init__(self, operator: Callable[[Params], Params], like: Sequence[Tensor]):
        self.like = list(like)
        self.mvp = self._flat(operator)
        make = getattr(operator, "preconditioner", None)
        if make is not None:
            self.preconditioner = lambda damping: self._flat(make(damping))

    def _flat(self, operator: Callable[[Params], Params]) -> Callable[[Tensor], Tensor]:
        return lambda v: flat(operator(tuple(unflat(v, self.like))))


def _detached(args: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(a.detach() for a in args)
