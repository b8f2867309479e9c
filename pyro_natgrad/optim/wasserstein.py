"""Wasserstein natural-gradient descent on the ELBO, as a drop-in Pyro optimizer.

θ ← θ − ρ G(θ)⁻¹ ∇θ L with G the Wasserstein-2 metric of the guide (the seed, §4). Per group of
guide sites, the first that applies:

* ``"bures"``: a Normal or MultivariateNormal site written through an invertible parameterization
  (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, custom guides whose loc / scale /
  scale_tril are params) takes the closed-form Bures–Wasserstein step m' = m − h∇ₘL,
  Σ' = (I − hM)Σ(I − hM), M = 2 sym ∇_ΣL (:func:`~pyro_natgrad.wasserstein.bures_step`; for a
  Normal, the Euclidean step in (m, σ)), with h = ρ / (copies × ELBO scale) of the site. The
  gradients in the distribution's arguments (m, L) or (m, σ) come from the params' gradients by one
  vector-Jacobian product through arguments ↦ params, ∂L/∂Σ from ∂L/∂L by the Cholesky reverse
  rule (:func:`~pyro_natgrad.wasserstein.cholesky_to_cov_gradient`); the new Cholesky factor
  (never Σ itself) is written back through the same map.
* ``"bures_metric"``: any other group of Gaussian sites (AutoLowRankMultivariateNormal, params
  shared between sites, amortized guides) steps linearly in its params with the exact W₂ metric
  of Gaussians pulled back to them (:class:`~pyro_natgrad.wasserstein.BuresMetric`).
* ``"pushforward"``: any other reparameterized site (flows, Student-t, ...) uses the pushforward
  metric E[JᵀJ] of its sampling map, an upper bound of the W₂ metric
  (:class:`~pyro_natgrad.wasserstein.PushforwardMetric`), estimated with ``num_samples`` draws.

The two linear steps solve their metric dense, diagonal or by conjugate gradient (matrix-free).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import kl_divergence

from ..fisher.linalg import flat, solve_metric
from ..guides import Group, Site, args_gradient
from ..wasserstein import BuresMetric, PushforwardMetric, bures_step, cholesky_to_cov_gradient
from .base import Candidate, GeometricOptim, StepFn, _count, linear_step

__all__ = ["WassersteinGradient"]

_CLOSED_FORM = ("Normal", "MultivariateNormal")
_GAUSSIANS = _CLOSED_FORM + ("LowRankMultivariateNormal",)
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
    :param form: ``"dense"``, ``"diag"`` or ``"cg"`` for the pulled-back Bures and the pushforward
        metrics (default: dense up to ``dense_max`` params, else CG).
    :param damping: λ in (G + λI)⁻¹.
    :param num_samples: draws for the pushforward metric.
    Remaining keywords go to :class:`~pyro_natgrad.optim.base.GeometricOptim`. ``max_kl``, when a
    number, bounds KL(q_old ‖ q_new) of ``"bures"`` sites and ½ρ²δᵀGδ (half a squared W₂ length)
    of the others; ``"auto"``: no bound on ``"bures"`` steps, ½ρ²δᵀGδ ≤ ½·dim θ on the others
    (a squared length has the problem's units, so the KL radius of
    :class:`~pyro_natgrad.optim.base.GeometricOptim` does not apply). Pflug's stationarity test is
    off by default (``stationarity_window=None``), because it presumes an affine-invariant step.
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
        kwargs.setdefault("stationarity_window", None)  # a W₂ step is not affine invariant
        super().__init__(guide, lr, **kwargs)
        self.metric, self.form, self.damping = metric, form, damping
        self.num_samples, self.dense_max, self.cg_iters = num_samples, dense_max, cg_iters

    def _method(self, group: Group) -> str:
        if self.metric == "pushforward":
            return "pushforward"
        if group.natural and group.sites[0].family.name in _CLOSED_FORM:
            return "bures"
        if all(s.family is not None and s.family.name in _GAUSSIANS for s in group.sites):
            return "bures_metric"
        return "pushforward"

    def _max_kl(self, group: Group, leaves: dict[str, Tensor], method: str) -> float | None:
        if self.max_kl != "auto":
            return self.max_kl
        if method == "bures":
            return None
        return 0.5 * _count(group.param_names, leaves)

    def _step_fn(self, group: Group, leaves: dict[str, Tensor],
                 grads: dict[str, Tensor]) -> tuple[StepFn, str]:
        method = self._method(group)
        if method == "bures":
            return self._bures_step(group, leaves, grads), method
        return self._linear_step(group, leaves, grads, method), method

    def _bures_step(self, group: Group, leaves: dict[str, Tensor],
                    grads: dict[str, Tensor]) -> StepFn:
        site = group.sites[0]
        family, param = site.family, site.parameterization
        dense = family.name == "MultivariateNormal"  # arguments (m, L), else (m, σ)
        with torch.no_grad():
            args = param.args({n: leaves[n].detach() for n in param.param_names})
            current = family.distribution(*args)
        d_loc, d_second = args_gradient(param, args, [grads[n] for n in param.param_names])
        if dense:
            d_second = cholesky_to_cov_gradient(args[1], d_second)
        scale = 1.0 / site.multiplicity

        def step(rate: float) -> Candidate | None:
            h = rate * scale
            with torch.no_grad():
                if dense:
                    new_args = bures_step(*args, d_loc, d_second, h)
                    positive = new_args[1].diagonal(dim1=-2, dim2=-1)
                else:
                    new_args = (args[0] - h * d_loc, args[1] - h * d_second)
                    positive = new_args[1]
                if not bool(positive.gt(0).all()):  # Σ' singular, or σ' ≤ 0 (or NaN)
                    return None
                values = param.unconstrained(new_args)
                kl = float(kl_divergence(current, family.distribution(*new_args)).sum())
            return Candidate(values, kl * site.multiplicity)

        return step

    def _linear_step(self, group: Group, leaves: dict[str, Tensor], grads: dict[str, Tensor],
                     method: str) -> StepFn:
        names = group.param_names
        theta = [leaves[n] for n in names]
        g = flat([grads[n] for n in names])
        if method == "bures_metric":
            metric = BuresMetric([(*_loc_cov(s), s.multiplicity) for s in group.sites], theta)
        else:
            metric = PushforwardMetric([(s.fn, s.scale) for s in group.sites], theta,
                                       self.num_samples)
        form = self.form or ("dense" if g.numel() <= self.dense_max else "cg")
        direction = solve_metric(metric, g, form, self.damping, self.cg_iters)
        return linear_step(names, theta, direction, float(direction @ metric.mvp(direction)))


def _loc_cov(site: Site) -> tuple[Tensor, Tensor]:
    """(m, Σ) of a Gaussian site's base distribution, a Normal's as 1 × 1 covariances, on the live
    graph from the params."""
    base = site.base
    if site.family.name == "Normal":
        return base.loc[..., None], base.variance[..., None, None]
    return base.loc, base.covariance_matrix

