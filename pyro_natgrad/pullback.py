"""The chain rule between a guide's params and its distributions: the loss's gradient in the
params θ, pulled back to a distribution's arguments (or to other coordinates of its family)
through the invertible map of a :class:`~pyro_natgrad.guides.Parameterization`.

With args = a(θ) invertible, θ = a⁻¹(args), the gradient in the arguments is
∂L/∂args = (∂θ/∂args)ᵀ ∂L/∂θ: one vector-Jacobian product through the inverse map
(:meth:`~pyro_natgrad.guides.Parameterization.unconstrained`), no Jacobian formed (the trick of
GPflow's natural gradient: Salimbeni, Eleftheriadis & Hensman 2018, "Natural gradients in
practice", §3), or a closed form where the map is known (AutoMultivariateNormal's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions import transform_to

from .fisher.linalg import unflat
from .guides import (
    Group,
    Parameterization,
    ScaledLowRank,
    ScaledUnitCholesky,
    is_real,
    is_unit_lower_cholesky,
)

__all__ = ["args_gradient", "coordinate_gradient", "ScaledLowRankCoordinates",
           "scaled_low_rank_coordinates"]


def coordinate_gradient(param: Parameterization, to_args: Callable[..., Sequence[Tensor]],
                        coords: Sequence[Tensor], grads: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """∂L/∂c from the params' gradients ∂L/∂θ (``grads``, in ``param.param_names`` order), for
    coordinates c ↦ args = ``to_args(c)`` ↦ θ: one vector-Jacobian product (∂θ/∂c)ᵀ ∂L/∂θ."""
    with torch.enable_grad():
        leaves = [c.detach().requires_grad_() for c in coords]
        values = param.unconstrained(to_args(*leaves))
        outs = [values[n] for n in param.param_names]
        got = torch.autograd.grad(outs, leaves, list(grads), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves,
                                                                       strict=True))


def args_gradient(param: Parameterization, args: Sequence[Tensor],
                  grads: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """∂L/∂args, the distribution's own arguments, from the params' gradients ``grads`` (in
    ``param.param_names`` order): in closed form for :class:`ScaledUnitCholesky` with a real loc
    and Pyro's ``unit_lower_cholesky`` factor, else by :func:`coordinate_gradient`."""
    if isinstance(param, ScaledUnitCholesky):
        closed = _scaled_unit_cholesky(param, args, grads)
        if closed is not None:
            return closed
    return coordinate_gradient(param, _identity, args, grads)


def _scaled_unit_cholesky(param: ScaledUnitCholesky, args: Sequence[Tensor],
                          grads: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None:
    """AutoMultivariateNormal's ∂L/∂(loc, L) where loc is unconstrained and the unit factor's
    inverse transform is the identity (``unit_lower_cholesky``), else None: with s = diag L and
    U = L/s (rows), ∂L/∂Lᵢⱼ = g_Uᵢⱼ/sᵢ + δᵢⱼ(∂L/∂sᵢ − Σₖ g_Uᵢₖ Lᵢₖ/sᵢ²), ∂L/∂s through the
    scale's transform by autograd (a vector); two d×d passes instead of autograd's graph."""
    loc_constraint, scale_constraint, unit_constraint = param.constraints
    if not (is_real(loc_constraint) and is_unit_lower_cholesky(unit_constraint)):
        return None
    (_, tril), (g_loc, g_scale, g_unit) = args, grads
    scale = tril.diagonal(dim1=-2, dim2=-1).detach()
    with torch.enable_grad():
        leaf = scale.clone().requires_grad_()
        (g_s,) = torch.autograd.grad(transform_to(scale_constraint).inv(leaf), leaf, g_scale)
    d_tril = g_unit / scale[..., None]
    d_tril.diagonal(dim1=-2, dim2=-1).add_(g_s - torch.linalg.vecdot(d_tril, tril) / scale)
    return g_loc, d_tril


def _identity(*args: Tensor) -> tuple[Tensor, ...]:
    return args


class ScaledLowRankCoordinates:
    """The params θ = (loc, u, P) of one unbatched AutoLowRankMultivariateNormal site
    (:class:`~pyro_natgrad.guides.ScaledLowRank`) at fixed values, and their flat vectors:
    s = t(u) (the scale's elementwise transform), s' = dt/du, W = diag(s)P, D = s², so that
    q = N(loc, WWᵀ + diag D) = N(loc, diag(s)(I + PPᵀ)diag(s)). The metrics in θ
    (:class:`~pyro_natgrad.fisher.low_rank.ScaledLowRankFisher`,
    :class:`~pyro_natgrad.wasserstein.ScaledLowRankBures`) are pulled back through this map by the
    chain rule in closed form.

    :param names: the group's param names, the flat vector's order.
    :param roles: the names of (loc, scale, cov_factor).
    :param values: unconstrained param values by name.
    :param scale_constraint: the scale's constraint (an elementwise transform).
    """

    def __init__(self, names: Sequence[str], roles: Sequence[str], values: dict[str, Tensor],
                 scale_constraint: constraints.Constraint):
        self.names, self.roles = tuple(names), tuple(roles)
        self.like = [values[n].detach() for n in self.names]
        self._order = [self.names.index(n) for n in roles]  # loc, scale, factor positions
        self._scale = transform_to(scale_constraint)
        loc, u, p = (values[n].detach() for n in roles)
        with torch.enable_grad():
            leaf = u.clone().requires_grad_()
            s = self._scale(leaf)
            (ds,) = torch.autograd.grad(s, leaf, torch.ones_like(s))
        self.loc, self.s, self.ds, self.p = loc, s.detach(), ds, p

    @staticmethod
    def applies(values: dict[str, Tensor], roles: Sequence[str],
                scale_constraint: constraints.Constraint) -> bool:
        """Unbatched (loc (d,), scale (d,), P (d, r)) with an elementwise scale transform."""
        loc, u, p = (values[n] for n in roles)
        return (loc.dim() == 1 and u.shape == loc.shape and p.dim() == 2
                and p.shape[0] == loc.shape[0]
                and transform_to(scale_constraint).event_dim == 0)

    def scaled(self, values: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(loc, s, P) of the site at other unconstrained ``values`` (by name), detached."""
        loc, u, p = (values[n].detach() for n in self.roles)
        return loc, self._scale(u), p

    def args(self) -> tuple[Tensor, Tensor, Tensor]:
        """(loc, W, D)."""
        return self.loc, self.p * self.s.unsqueeze(-1), self.s.square()

    def split(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(v_loc, v_u, v_P) of a flat vector (leading dimensions of ``v`` are a batch)."""
        parts = unflat(v, self.like)
        return tuple(parts[i] for i in self._order)

    def join(self, loc: Tensor, u: Tensor, p: Tensor) -> Tensor:
        """The flat vector (with the batch dimensions of ``loc`` beyond (d,))."""
        parts = [None] * 3
        for i, x in zip(self._order, (loc, u, p), strict=True):
            parts[i] = x
        batch = loc.shape[:-1]
        return torch.cat([x.reshape(batch + (-1,)) for x in parts], -1)


def scaled_low_rank_coordinates(group: Group, leaves: dict[str, Tensor]
                                ) -> ScaledLowRankCoordinates | None:
    """The :class:`ScaledLowRankCoordinates` of a one-site group of
    AutoLowRankMultivariateNormal whose metrics have a closed form in its params (unbatched, loc
    and factor unconstrained, an elementwise scale transform); else None."""
    site = group.sites[0]
    param = site.parameterization
    if len(group.sites) != 1 or not isinstance(param, ScaledLowRank):
        return None
    loc_constraint, scale_constraint, factor_constraint = param.constraints
    values = {n: leaves[n].detach() for n in group.param_names}
    if not (is_real(loc_constraint) and is_real(factor_constraint)
            and ScaledLowRankCoordinates.applies(values, param.param_names, scale_constraint)):
        return None
    return ScaledLowRankCoordinates(group.param_names, param.param_names, values,
                                    scale_constraint)
