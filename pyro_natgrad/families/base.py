"""The geometry of one exponential family, as small pure maps between coordinate systems.

An exponential family q(z) = h(z) exp(<η, T(z)> - A(η)) has three coordinate systems:

* the distribution's own constructor arguments ("args", e.g. ``loc, scale``),
* the natural parameters η,
* the mean (expectation) parameters μ = E_q[T(z)] = ∇A(η).

Its Fisher information in natural coordinates is F(η) = ∇²A(η) = Cov_q[T(z)] = ∂μ/∂η, and
KL(q_η ‖ q_η') is the Bregman divergence of A: A(η') - A(η) - <η' - η, μ(η)>
(Amari & Nagaoka 2000, *Methods of Information Geometry*, §2.3 and §3.5;
Wainwright & Jordan 2008, *Graphical Models, Exponential Families, and Variational Inference*, §3).

Every map works elementwise over leading batch dimensions: a parameter tuple holds tensors whose
rightmost ``event_dims[i]`` dimensions belong to one distribution. Nothing here knows about Pyro's
SVI, the param store or guides.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor
from torch.distributions import Distribution

Params = tuple[Tensor, ...]


class ExponentialFamily:
    """Base class: subclasses fill in the maps; the defaults compose them.

    Subclasses set ``dist_class`` (the torch distribution class they describe), ``arg_names`` (the
    constructor keywords read from and passed to it), ``event_dims`` (event rank of each natural /
    mean parameter) and ``full_rank`` (False when the distribution's arguments cannot represent
    every natural parameter, e.g. a low-rank covariance: then ``natural_to_args`` is unavailable and
    the optimizer steps in the guide's own parameters with this family's Fisher instead).
    ``closed_form_mean_map`` is False when μ ↦ args has no closed form and is solved iteratively
    (Gamma, Beta, Dirichlet): consumers then prefer the η-side maps. ``location_split`` is True
    for Gaussians, whose natural step can be written in (mean, precision) and the precision's
    part shortened alone (the first argument is the mean; :meth:`translate` moves it).
    """

    name: str = ""
    dist_class: type[Distribution] = Distribution
    arg_names: tuple[str, ...] = ()
    event_dims: tuple[int, ...] = ()
    full_rank: bool = True
    closed_form_mean_map: bool = True
    location_split: bool = False
    # index of an argument W (… × d × r) whose right rotations W ↦ WQ leave the distribution
    # unchanged (it enters only through WWᵀ), or None
    rotation_gauge: int | None = None

    # ----- reading and building distributions -------------------------------------------------
    def args(self, d: Distribution) -> Params:
        """The constructor arguments of ``d`` (a bare instance of ``dist_class``)."""
        return tuple(getattr(d, n) for n in self.arg_names)

    def distribution(self, *args: Tensor) -> Distribution:
        """Builds the distribution from its constructor arguments."""
        build: Callable[..., Distribution] = self.dist_class  # a subclass: takes ``arg_names``
        return build(**dict(zip(self.arg_names, args, strict=True)), validate_args=False)

    def event_rank(self) -> int:
        """Event rank of a sample z (0 for scalar families, 1 for vector-valued ones)."""
        return 0

    # ----- coordinate maps (subclasses implement the first four) ------------------------------
    def args_to_natural(self, *args: Tensor) -> Params:
        raise NotImplementedError

    def natural_to_args(self, *eta: Tensor) -> Params:
        raise NotImplementedError

    def args_to_mean(self, *args: Tensor) -> Params:
        raise NotImplementedError

    def mean_to_args(self, *mu: Tensor) -> Params:
        raise NotImplementedError

    def mean_gradient(self, args: Params, d_args: Params) -> Params:
        """∂L/∂μ from ∂L/∂args: the adjoint of μ ↦ args applied to ``d_args``, one
        vector-Jacobian product through :meth:`mean_to_args` (GPflow's natgrad trick). Where that
        map is iterative (``closed_form_mean_map`` False) the equivalent ∂L/∂μ = F(η)⁻¹ ∂L/∂η,
        with ∂L/∂η the adjoint of η ↦ args. Families override it with the closed form."""
        if self.closed_form_mean_map:
            return _pullback(self.mean_to_args, self.args_to_mean(*args), d_args)
        eta = self.args_to_natural(*args)
        flat_deta, batch_shape = self.flatten(_pullback(self.natural_to_args, eta, d_args))
        fisher = self.fisher(*(e.detach() for e in eta))
        return self.unflatten(torch.linalg.solve(fisher.expand(batch_shape + fisher.shape[-2:]),
                                                 flat_deta))

    def args_fisher_product(self, args: Params, v: Params) -> Params | None:
        """F(args)·v, the Fisher in the constructor arguments applied to a tangent ``v`` (shaped
        like ``args``), in closed form, or None: consumers then pull the Fisher back through
        η(args) and μ(args) (a family overrides it when that is cheaper, e.g. a structured
        covariance whose η would be a dense d×d matrix). None for every ``v`` or for none. ``v`` may
        carry extra leading dimensions (a batch of tangents), which broadcast against ``args``."""
        return None

    def args_fisher_operator(self, args: Params) -> Callable[[Params], Params] | None:
        """v ↦ F(args)·v at fixed ``args`` (:meth:`args_fisher_product`), for many products at
        the same point: a family overrides it to compute what depends on ``args`` alone once.
        None where the family has no closed-form product."""
        if self.args_fisher_product(args, args) is None:
            return None
        return lambda v: cast(Params, self.args_fisher_product(args, v))

    def natural_to_mean(self, *eta: Tensor) -> Params:
        """μ(η) = ∇A(η)."""
        return self.args_to_mean(*self.natural_to_args(*eta))

    def mean_to_natural(self, *mu: Tensor) -> Params:
        """η(μ) = (∇A)⁻¹(μ), the Legendre dual map."""
        return self.args_to_natural(*self.mean_to_args(*mu))

    def log_partition(self, *eta: Tensor) -> Tensor:
        """A(η), with the batch shape of the parameters."""
        raise NotImplementedError

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        """T(z), shaped like the natural parameters (batch dims from ``z``).

        ``eta`` is read only by families whose statistic needs more than ``z`` (Categorical takes
        the number of categories from it); the others ignore it.
        """
        raise NotImplementedError

    def in_domain(self, *eta: Tensor) -> Tensor:
        """Boolean tensor (batch shape): is η inside the natural parameter space?"""
        raise NotImplementedError

    def translate(self, eta: Params, shift: Tensor) -> Params:
        """η of the same distribution with its mean moved by ``shift`` (``location_split``
        families only): for a Gaussian, η = (Λm, −½Λ) ↦ (η₁ + Λ·shift, η₂)."""
        raise NotImplementedError(f"{type(self).__name__} has no location to translate")

    def retract(self, eta: Params, step: Params) -> Params | None:
        """A point near η + step that stays in the domain for any step, or None if the family has
        no such map (the optimizer then shortens the step)."""
        return None

    # ----- geometry built from the maps -------------------------------------------------------
    def fisher(self, *eta: Tensor) -> Tensor:
        """Fisher information in natural coordinates, F(η) = ∇²A(η) = ∂μ/∂η.

        Dense over the flattened natural parameters of each batch element: shape
        ``batch_shape + (k, k)``. The default differentiates ``natural_to_mean``; families override
        it with the closed form Cov_q[T(z)].
        """
        flat, batch_shape = self.flatten(eta)

        def mean_flat(v: Tensor) -> Tensor:
            return self.flatten(self.natural_to_mean(*self.unflatten(v)))[0]

        jac = torch.func.vmap(torch.func.jacrev(mean_flat))(flat.reshape(-1, flat.shape[-1]))
        return jac.reshape(batch_shape + jac.shape[-2:])

    def kl(self, eta_p: Params, eta_q: Params, mu_p: Params | None = None,
           log_partition_p: Tensor | None = None) -> Tensor:
        """KL(q_{η_p} ‖ q_{η_q}) = A(η_q) − A(η_p) − <η_q − η_p, μ_p>, the Bregman divergence of
        the log-partition; μ_p and A(η_p), when known, are not recomputed."""
        mu_p = self.natural_to_mean(*eta_p) if mu_p is None else mu_p
        a_p = self.log_partition(*eta_p) if log_partition_p is None else log_partition_p
        inner = sum(self._inner(a - b, m, k) for a, b, m, k in
                    zip(eta_q, eta_p, mu_p, self.event_dims, strict=True))
        return self.log_partition(*eta_q) - a_p - inner

    def inner(self, eta: Params, mu: Params) -> Tensor:
        """<η, μ> summed over each parameter's event dimensions (batch shape)."""
        return cast(Tensor, sum(self._inner(e, m, k)
                                for e, m, k in zip(eta, mu, self.event_dims, strict=True)))

    @staticmethod
    def _inner(a: Tensor, b: Tensor, event_dim: int) -> Tensor:
        prod = a * b
        return prod.sum(tuple(range(-event_dim, 0))) if event_dim else prod

    # ----- flattening per batch element --------------------------------------------------------
    def flatten(self, params: Params) -> tuple[Tensor, torch.Size]:
        """Concatenates the parameters of each batch element into one vector: ``batch + (k,)``."""
        batch_shape = torch.broadcast_shapes(
            *(p.shape[: p.dim() - k] for p, k in zip(params, self.event_dims, strict=True))
        )
        parts = []
        for p, k in zip(params, self.event_dims, strict=True):
            p = p.expand(batch_shape + p.shape[p.dim() - k:])
            parts.append(p.reshape(batch_shape + (-1,)))
        return torch.cat(parts, dim=-1), batch_shape

    def unflatten(self, flat: Tensor) -> Params:
        """Inverse of :meth:`flatten`."""
        shapes = self.param_event_shapes(flat.shape[-1])
        out, start = [], 0
        batch_shape = flat.shape[:-1]
        for shape in shapes:
            size = math.prod(shape)
            out.append(flat[..., start:start + size].reshape(batch_shape + tuple(shape)))
            start += size
        return tuple(out)

    def param_event_shapes(self, flat_size: int) -> tuple[torch.Size, ...]:
        """Event shapes of the natural parameters given the flattened size.

        The default covers scalar parameters and a single vector parameter; families with other
        layouts (the multivariate normal's (d, d×d)) override it.
        """
        if all(k == 0 for k in self.event_dims):
            return tuple(torch.Size(()) for _ in self.event_dims)
        if self.event_dims == (1,):
            return (torch.Size((flat_size,)),)
        raise NotImplementedError(
            f"{type(self).__name__} must override param_event_shapes for event dims "
            f"{self.event_dims}")


def _pullback(fn: Callable[..., Params], coords: Params, cotangents: Params) -> Params:
    """(∂fn/∂coords)ᵀ·cotangents, one vector-Jacobian product (no Jacobian formed)."""
    with torch.enable_grad():
        leaves = [c.detach().requires_grad_() for c in coords]
        got = torch.autograd.grad(fn(*leaves), leaves, list(cotangents), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves,
                                                                       strict=True))


def symmetric_2x2(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The batch of matrices [[a, b], [b, c]], shape ``broadcast(a, b, c) + (2, 2)``."""
    a, b, c = torch.broadcast_tensors(a, b, c)
    return torch.stack([torch.stack([a, b], -1), torch.stack([b, c], -1)], -2)
