"""Wasserstein natural-gradient descent on the ELBO, as a drop-in Pyro optimizer.

θ ← θ − ρ G(θ)⁻¹ ∇θ L with G the Wasserstein-2 metric of the guide (the seed, §4):

* Gaussian sites written through an invertible parameterization (AutoNormal, AutoDiagonalNormal,
  AutoMultivariateNormal, custom guides whose Normal / MultivariateNormal arguments are params):
  the closed-form Bures–Wasserstein step m' = m − h∇ₘL, Σ' = (I − hM)Σ(I − hM), M = 2 sym ∇_ΣL
  (see :mod:`pyro_natgrad.wasserstein.gaussian`), with h = ρ / (copies × ELBO scale) of the site.
  The gradients in (m, Σ) come from the params' gradients by one vector-Jacobian product through
  (m, Σ) ↦ distribution arguments ↦ params.
* Any other reparameterized site (low-rank Gaussians, flows, Student-t, ...): the pushforward
  metric E[JᵀJ] of its sampling map (:class:`~pyro_natgrad.wasserstein.PushforwardMetric`),
  estimated with ``num_samples`` draws and solved dense, diagonal or by conjugate gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..fisher.linalg import flat, solve_metric
from ..guides import Group, coordinate_gradient
from ..wasserstein import PushforwardMetric, bures_step
from .base import Candidate, GeometricOptim, StepFn, linear_step

__all__ = ["WassersteinGradient"]

_GAUSSIANS = ("Normal", "MultivariateNormal")
_FORMS = ("dense", "diag", "cg")


class WassersteinGradient(GeometricOptim):
    """Wasserstein natural-gradient optimizer for :class:`pyro.infer.SVI`.

    >>> svi = SVI(model, guide, WassersteinGradient(guide, lr=0.1), Trace_ELBO(num_particles=32))

    :param guide: the guide passed to SVI.
    :param lr: step size ρ (a time step of the Wasserstein gradient flow; it has the units of
        1 / curvature of the loss, so unlike the natural gradient it depends on the problem's scale;
        the adaptive step corrects too large a value).
    :param metric: ``"auto"`` (Bures–Wasserstein for Gaussian sites, pushforward elsewhere) or
        ``"pushforward"`` for every site.
    :param form: ``"dense"``, ``"diag"`` or ``"cg"`` for the pushforward metric (default: dense up
        to ``dense_max`` params, else CG).
    :param damping: λ in (G + λI)⁻¹.
    :param num_samples: draws for the pushforward metric.
    Remaining keywords go to :class:`~pyro_natgrad.optim.base.GeometricOptim`. ``max_kl``, when a
    number, bounds KL(q_old ‖ q_new) of Gaussian sites and ½ρ²δᵀGδ of the others (default: no
    bound); Pflug's stationarity test is off by default (``stationarity_window=None``), because
    it presumes an affine-invariant step.
    """

    def __init__(self, guide: Callable, lr: float = 0.1, *, metric: str = "auto",
                 form: str | None = None, damping: float = 1e-6, num_samples: int = 64,
                 dense_max: int = 2000, cg_iters: int = 50, **kwargs):
        if metric not in ("auto", "pushforward"):
            raise ValueError(f"metric must be 'auto' or 'pushforward', got {metric!r}")
        if form is not None and form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if not (isinstance(num_samples, int) and num_samples > 0):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        kwargs.setdefault("max_kl", None)
        kwargs.setdefault("stationarity_window", None)  # a W₂ step is not affine invariant
        super().__init__(guide, lr, **kwargs)
        self.metric, self.form, self.damping = metric, form, damping
        self.num_samples, self.dense_max, self.cg_iters = num_samples, dense_max, cg_iters

    def _method(self, group: Group) -> str:
        site = group.sites[0]
        if (self.metric == "auto" and group.natural and site.family.name in _GAUSSIANS):
            return "bures"
        return "pushforward"

    def _step_fn(self, group: Group, leaves: dict[str, Tensor],
                 grads: dict[str, Tensor]) -> tuple[StepFn, str]:
        method = self._method(group)
        if method == "bures":
            return self._bures_step(group, leaves, grads), method
        return self._pushforward_step(group, leaves, grads), method

    def _bures_step(self, group: Group, leaves: dict[str, Tensor],
                    grads: dict[str, Tensor]) -> StepFn:
        site = group.sites[0]
        family, param = site.family, site.parameterization
        dense = family.name == "MultivariateNormal"
        with torch.no_grad():
            args = param.args({n: leaves[n].detach() for n in param.param_names})
            eta = family.args_to_natural(*args)
            coords = (args[0], args[1] @ args[1].mT) if dense else args
        to_args = _loc_cov_to_args if dense else _identity
        d_loc, d_second = coordinate_gradient(param, to_args, coords,
                                              [grads[n] for n in param.param_names])
        scale = 1.0 / site.multiplicity

        def step(rate: float) -> Candidate | None:
            h = rate * scale
            with torch.no_grad():
                if dense:
                    new_args = _loc_cov_to_args(*bures_step(*coords, d_loc, d_second, h),
                                                checked=True)
                else:
                    new_args = (coords[0] - h * d_loc, coords[1] - h * d_second)
                if new_args is None or not bool((new_args[1].diagonal(dim1=-2, dim2=-1)
                                                 if dense else new_args[1]).gt(0).all()):
                    return None
                values = param.unconstrained(new_args)
                kl = float(family.kl(eta, family.args_to_natural(*new_args)).sum())
            return Candidate(values, kl * site.multiplicity)

        return step

    def _pushforward_step(self, group: Group, leaves: dict[str, Tensor],
                          grads: dict[str, Tensor]) -> StepFn:
        names = group.param_names
        theta = [leaves[n] for n in names]
        g = flat([grads[n] for n in names])
        metric = PushforwardMetric([(s.fn, s.scale) for s in group.sites], theta,
                                   self.num_samples)
        form = self.form or ("dense" if g.numel() <= self.dense_max else "cg")
        direction = solve_metric(metric, g, form, self.damping, self.cg_iters)
        return linear_step(names, theta, direction, float(direction @ metric.mvp(direction)))


def _identity(*args: Tensor) -> tuple[Tensor, ...]:
    return args


def _loc_cov_to_args(loc: Tensor, cov: Tensor, checked: bool = False):
    """(m, Σ) ↦ (m, cholesky(Σ)); with ``checked``, None when Σ is not positive definite."""
    cov = 0.5 * (cov + cov.mT)
    if not checked:
        return loc, torch.linalg.cholesky(cov)
    tril, info = torch.linalg.cholesky_ex(cov)
    return None if bool((info != 0).any()) or not bool(torch.isfinite(tril).all()) else (loc, tril)
