"""Wasserstein-2 directions of a group of guide sites.

* :class:`Bures`: a Normal or MultivariateNormal site written through an invertible
  parameterization takes a closed-form Bures–Wasserstein step, by default the forward–backward
  step (Diao, Balasubramanian, Chewi & Salim 2023, ICML; gradient step on the energy, exact
  proximal step on the entropy, :func:`~pyro_natgrad.wasserstein.forward_backward_step`) with
  the scale-free h = ρ / ρ(LᵀĤL) (:func:`~pyro_natgrad.wasserstein.curvature_step`) in q's frame
  F = L, Ĥ = 2 sym ∂L/∂Σ + Σ⁻¹ per unit weight; for a Normal, the elementwise step
  (:func:`~pyro_natgrad.wasserstein.forward_backward_step_diag`) in its frame F = diag σ,
  hᵢ = σᵢ²ρ / maxⱼ σⱼ²Ĥⱼⱼ (:func:`~pyro_natgrad.wasserstein.curvature_step_diag`). The explicit
  scheme is the plain step m' = m − h∇ₘL, Σ' = (I − hM)Σ(I − hM), M = 2 sym ∇_ΣL
  (:func:`~pyro_natgrad.wasserstein.bures_step`; for a Normal, the Euclidean step in (m, σ)),
  h = ρ / (copies × ELBO scale). ∂L/∂Σ comes from ∂L/∂L by the Cholesky reverse rule, gradients
  per unit weight divide SVI's by the site's multiplicity, and the new factor is written back
  through the parameterization.
* :class:`MetricSolve`: any other group steps linearly in its params with a W₂ metric pulled
  back to them. An AutoLowRankMultivariateNormal group takes it by default in q's frame, as the
  closed-form step does (F = q's scale; the W₂ cost |F⁻¹(x − x')|²): there the Bures metric at
  q is the Fisher metric on the mean and half of it on the covariance, G = F_m ⊕ ½F_Σ (at Σ = I
  the Bures metric is ¼tr δΣ² and the Fisher ½tr δΣ²; Takatsu 2011; Malagò, Montrucchio &
  Pistone 2018, "Wasserstein Riemannian geometry of Gaussian densities", Inf. Geom.), so the
  step G⁻¹g = F⁻¹(g_m, 2g_Σ) is the closed-form Fisher solve
  (:class:`~pyro_natgrad.optim.fisher_solve.FisherSolve`) of a gradient whose covariance part
  is doubled, its rate dimensionless and its length the exact KL. Other Gaussian groups (and
  ``framed=False``) take the plain Bures metric (:class:`~pyro_natgrad.wasserstein.BuresMetric`,
  a rate in units of 1 / curvature); other reparameterized sites the pushforward metric of
  their sampling map (:class:`~pyro_natgrad.wasserstein.PushforwardMetric`), by default in q's
  frame, E[JᵀV⁻¹J] with V the variance of q's draws per element (a dimensionless rate). A linear
  step's length in its own metric is measured, not only modelled: ½E|F⁻¹(T_θ'(ε) − T_θ(ε))|²
  along the reparameterization coupling (:func:`_coupled_length`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pyro import poutine
from torch import Tensor
from torch.distributions import Dirichlet

from ..fisher.linalg import flat, solve_metric
from ..guides import Group, Site
from ..pullback import args_gradient, scaled_low_rank_coordinates
from ..wasserstein import (
    BuresMetric,
    PushforwardMetric,
    ScaledLowRankBures,
    bures_step,
    cholesky_to_cov_gradient,
    curvature_step,
    curvature_step_diag,
    energy_hessian,
    energy_hessian_diag,
    forward_backward_step,
    forward_backward_step_diag,
)
from .fisher_solve import FisherSolve, kl_both_ways
from .mirror import float64, kl64
from .options import require_counts, require_numbers
from .proposal import Candidate, Proposal, linear_proposal
from .transforms import GaugeProjection

__all__ = ["Bures", "MetricSolve"]

_FORMS = ("dense", "diag", "cg")
_SCHEMES = ("forward_backward", "explicit")


@dataclass
class Bures:
    """The closed-form Bures–Wasserstein step of one Gaussian site (module docstring).

    :param scheme: ``"forward_backward"`` (scale-free: the rate ρ is a fraction of 1 / curvature)
        or ``"explicit"`` (the rate has the units of 1 / curvature).
    :param iters: Lanczos steps of the spectral radius ρ(LᵀĤL) (exact once ≥ the dimension).
    :param framed: the forward–backward step in q's frame F = L (diag σ for a Normal site);
        False: F = I, the plain W₂ geometry.
    :param reverse_kl: a candidate's length, held to the trust region
        (:class:`~.trust_region.KLTrustRegion`), is max(KL(q ‖ q'), KL(q' ‖ q)), exact and in
        float64, as a closed-form linear step's is
        (:class:`~pyro_natgrad.optim.fisher_solve.FisherSolve`): KL(q ‖ q') grows only as the
        log of a widening of q, and a q' much wider than q is what a curvature estimate Ĥ near 0
        proposes (σ'² ≈ h = ρ/Ĥ), whose draws the next ELBO evaluates. False: KL(q ‖ q') alone.
    """

    scheme: Literal["forward_backward", "explicit"] = "forward_backward"
    iters: int = 10
    framed: bool = True
    reverse_kl: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in _SCHEMES:
            raise ValueError(f"Bures: scheme must be one of {_SCHEMES}, got {self.scheme!r}")
        require_counts(self, ("iters",), prefix="Bures: ")
        for name in ("framed", "reverse_kl"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Bures: {name} must be True or False, got "
                                 f"{getattr(self, name)!r}")

    def propose(self, site: Site, leaves: dict[str, Tensor],
                grads: dict[str, Tensor]) -> Proposal:
        family, param = site.family, site.parameterization
        dense = family.name == "MultivariateNormal"  # arguments (m, L), else (m, σ)
        with torch.no_grad():
            args = param.args({n: leaves[n].detach() for n in param.param_names})
            current = float64(family, family.distribution(*args))  # built once, for every KL
        d_loc, d_second = args_gradient(param, args, [grads[n] for n in param.param_names])
        if dense:
            d_second = cholesky_to_cov_gradient(args[1], d_second)
        step = self._step(dense, args, d_loc / site.multiplicity, d_second / site.multiplicity)

        def candidate(rate: float) -> Candidate | None:
            with torch.no_grad():
                new_args = step(rate)
                if new_args is None:
                    return None
                positive = new_args[1].diagonal(dim1=-2, dim2=-1) if dense else new_args[1]
                finite = all(bool(torch.isfinite(a).all()) for a in new_args)
                if not (finite and bool(positive.gt(0).all())):  # Σ' singular, σ' ≤ 0, or NaN
                    return None
                values = param.unconstrained(new_args)
                new = float64(family, family.distribution(*new_args))
                kl = kl64(family, current, new)
                if self.reverse_kl:  # a q' much wider than q: its draws feed the next ELBO
                    kl = max(kl, kl64(family, new, current))
            if not math.isfinite(kl):
                return None
            return Candidate(values, rate, kl * site.multiplicity)

        return Proposal("bures", candidate, exact=True)

    def _step(self, dense: bool, args: tuple[Tensor, ...], g_loc: Tensor,
              g_second: Tensor) -> Callable[[float], tuple[Tensor, Tensor] | None]:
        """rate -> (m', L') or (m', σ') from per-unit-weight gradients in (m, Σ) or (m, σ)."""
        loc, second = args[0], args[1]
        if self.scheme == "explicit":
            if dense:
                return lambda rate: bures_step(loc, second, g_loc, g_second, rate)
            return lambda rate: (loc - rate * g_loc, second - rate * g_second)
        frame = second if self.framed else None
        with torch.no_grad():
            if dense:
                hess = energy_hessian(second, g_second)
                unit = curvature_step(hess, 1.0, frame=frame, iters=self.iters)
            else:
                unit = curvature_step_diag(energy_hessian_diag(second, g_second), 1.0, frame)

        def forward_backward(rate: float) -> tuple[Tensor, Tensor] | None:
            h = rate * unit  # rate / ρ(FᵀĤF), or (rate / maxᵢ |fᵢ²Ĥᵢᵢ|)·fᵢ²
            if not bool((torch.isfinite(h) & (h > 0)).all()):
                return None
            if dense:
                return forward_backward_step(loc, second, g_loc, hess, h, frame=frame)
            return forward_backward_step_diag(loc, second, g_loc, g_second, h)

        return forward_backward


@dataclass
class MetricSolve:
    """A linear step θ − ρ(G + λI)⁻¹∇θL with a W₂ metric G of the group's sites; its length
    is the larger of the metric's model ½ρ²dᵀGd and the length measured along the
    reparameterization coupling (:func:`_coupled_length`), or, in q's frame, the exact KL
    (module docstring).

    :param framed: an AutoLowRankMultivariateNormal group (``form`` None or ``"cg"``) steps in
        q's frame (module docstring), and the pushforward metric and its measured length are
        taken in q's frame, per element of the draws (a dimensionless rate); False: the plain
        Bures and pushforward metrics.
    :param relative_damping: the framed solve's metric also gets ``relative_damping``·tr F / dim θ
        (as :class:`~pyro_natgrad.optim.fisher_solve.FisherSolve`'s).
    :param form: ``"dense"``, ``"diag"`` or ``"cg"``; default dense up to ``dense_max`` params,
        except that an AutoLowRankMultivariateNormal group (``None`` or ``"cg"``) is solved by
        preconditioned CG, in q's frame or (``framed=False``) with its Bures metric in closed form
        (:class:`~pyro_natgrad.wasserstein.ScaledLowRankBures`).
    :param damping: λ.
    :param cg_rtol: CG's relative residual tolerance (as FisherSolve's; kept at 10⁻⁶ here,
        where the natural step's 10⁻⁴ has not been measured).
    :param gauge: a :class:`~pyro_natgrad.optim.transforms.GaugeProjection` of the gradient
        before a Bures solve (the metric is blind to a low-rank factor's rotations), or None.
    """

    form: Literal["dense", "diag", "cg"] | None = None
    damping: float = 1e-6
    num_samples: int = 64
    dense_max: int = 2000
    cg_iters: int = 50
    cg_rtol: float = 1e-6
    gauge: GaugeProjection | None = field(default_factory=GaugeProjection)
    framed: bool = True
    relative_damping: float = 1e-2

    def __post_init__(self) -> None:
        if self.form is not None and self.form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS} or None, got {self.form!r}")
        if not isinstance(self.framed, bool):
            raise ValueError(f"framed must be True or False, got {self.framed!r}")
        require_numbers(self, ("damping", "relative_damping", "cg_rtol"))
        require_counts(self, ("num_samples", "dense_max", "cg_iters"))

    def propose(self, key: tuple[str, ...], group: Group, leaves: dict[str, Tensor],
                grads: dict[str, Tensor], metric: Literal["bures", "pushforward"]) -> Proposal:
        if metric == "bures" and self.framed and self.form in (None, "cg") \
                and scaled_low_rank_coordinates(group, leaves) is not None:
            return self._framed(key, group, leaves, grads)
        theta = [leaves[n] for n in key]
        structured = None
        if metric == "bures":
            gauged = self.gauge is not None
            g = flat(self.gauge.apply(group, leaves, grads) if gauged
                     else [grads[n] for n in key])
            if self.form in (None, "cg"):
                structured = _low_rank_bures(group, leaves, gauged)
            built = structured or BuresMetric(
                [(*_loc_cov(s), s.multiplicity) for s in group.sites], theta)
        else:
            g = flat([grads[n] for n in key])
            built = PushforwardMetric([(s.fn, s.scale) for s in group.sites], theta,
                                      self.num_samples, framed=self.framed)
        form = self.form or ("cg" if structured is not None
                             else "dense" if g.numel() <= self.dense_max else "cg")
        direction = solve_metric(built, g, form, self.damping, self.cg_iters, self.cg_rtol)
        step = linear_proposal(f"{metric}_metric" if metric == "bures" else metric, key, theta,
                               direction, float(direction @ built.mvp(direction)))
        length = _coupled_length(group, self.num_samples,
                                 built.frames if isinstance(built, PushforwardMetric) else None)
        # held to its exact KL both ways too, as a closed-form Bures step is: a Bures step
        # pulled back through a map the reader does not know sees little of a falling scale
        kl = kl_both_ways(group) if metric == "bures" else None

        def measured(trace: poutine.Trace, model: float) -> float:
            value = max(model, length(trace))  # never below the model
            return value if kl is None else max(value, kl(trace))

        def candidate(rate: float) -> Candidate:
            c = step.candidate(rate)
            c.measure = lambda trace, model=c.kl: measured(trace, model)
            return c

        return Proposal(step.method, candidate, exact=False)

    def _framed(self, key: tuple[str, ...], group: Group, leaves: dict[str, Tensor],
                grads: dict[str, Tensor]) -> Proposal:
        """The step in q's frame, F⁻¹(g_m, 2g_Σ) (module docstring)."""
        loc = group.sites[0].parameterization.param_names[0]
        doubled = {n: grads[n] if n == loc else 2 * grads[n] for n in key}
        solve = FisherSolve(form="cg", damping=self.damping,
                            relative_damping=self.relative_damping, cg_iters=self.cg_iters,
                            cg_rtol=self.cg_rtol, gauge=self.gauge)
        step = solve.propose(key, group, leaves, doubled, monte_carlo=False)
        return Proposal("bures_framed", step.candidate, exact=False)


def _coupled_length(group: Group, num_samples: int, frames: list[Tensor] | None = None,
                    seed: int = 0) -> Callable[[poutine.Trace], float]:
    """½ Σ_sites scale·E|F⁻¹(T_θ'(ε) − T_θ(ε))|² with the same draws ε for q and the re-built q'
    (``rsample`` under one fixed seed, the global RNG state restored): the squared length of a
    step along the reparameterization coupling, an upper bound on ½W₂²(q, q') whose quadratic
    model is ½ρ²dᵀGd with the pushforward metric G = E[JᵀF⁻²J] (F: each site's ``frames``,
    per-element standard deviations; 1 without). Unlike the model it sees a scale written
    through exp grow exponentially with its unconstrained step. A site of independent univariate
    elements, or a Dirichlet, pairs its draws sorted per element (the quantile coupling of each
    marginal: optimal in one dimension, so exact for a product of univariates, and never longer
    than the pairing by seed): torch's Gamma, Beta and Dirichlet samplers draw by rejection, so
    one seed does not couple two nearby q's, while their implicit reparameterization gradients
    are the quantile coupling's. Other multivariate sites (Gaussians, flows) keep the pairing by
    seed, a smooth map of the noise: their marginals would miss a rotation."""
    def draws(fn, quantile: bool) -> Tensor:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            z = fn.rsample((num_samples,))
        return z.sort(0).values if quantile else z

    frames = frames or [1.0] * len(group.sites)
    current = []
    for site, frame in zip(group.sites, frames, strict=True):
        quantile = site.base.event_shape == torch.Size() or isinstance(site.base, Dirichlet)
        current.append((site.name, site.scale, quantile, draws(site.fn, quantile), frame))

    def length(trace: poutine.Trace) -> float:
        total = sum(scale * float(((draws(trace.nodes[name]["fn"], quantile) - z) / frame)
                                  .square().sum()) for name, scale, quantile, z, frame in current)
        return 0.5 * total / num_samples

    return length


def _loc_cov(site: Site) -> tuple[Tensor, Tensor]:
    """(m, Σ) of a Gaussian site's base distribution, a Normal's as 1 × 1 covariances, on the live
    graph from the params."""
    base = site.base
    if site.family.name == "Normal":
        return base.loc[..., None], base.variance[..., None, None]
    return base.loc, base.covariance_matrix


def _low_rank_bures(group: Group, leaves: dict[str, Tensor],
                    gauge_free: bool) -> ScaledLowRankBures | None:
    """The closed-form Bures metric of a one-site group of AutoLowRankMultivariateNormal
    (unbatched, loc and factor unconstrained), for a preconditioned conjugate-gradient solve;
    else None. Also None where (d − r)² < d + r (Ledermann's bound of factor analysis: the
    params (s, P) outnumber what Σ = diag(s)(I + PPᵀ)diag(s) determines up to P's rotations, so
    the metric is blind to more than the rotations the gauge projection removes, and a damped
    CG solve would step along that noise as 1/λ; the dense solve drops every null direction).
    ``gauge_free``: the gradient's rotation component was removed."""
    coords = scaled_low_rank_coordinates(group, leaves)
    if coords is None:
        return None
    d, r = coords.p.shape
    if (d - r) ** 2 < d + r:
        return None
    return ScaledLowRankBures(coords, group.sites[0].multiplicity, gauge_free)
