"""Natural-gradient descent on the ELBO (Amari 1998), as a drop-in Pyro optimizer.

Two forms of the step, per group of guide sites:

* ``space="natural"`` (mirror descent; Khan & Lin 2017, Hensman et al. 2013): for a site whose
  distribution is an exponential family written through an invertible parameterization,
  η ← η − ρ ∂L/∂μ, where ∂L/∂μ is obtained from the gradient SVI already computed by one
  vector-Jacobian product through μ ↦ args ↦ params (the trick of GPflow's ``NaturalGradient``).
  With exact gradients and ρ = 1 a conjugate model lands on its exact posterior in one step.
* ``space="parameter"``: θ ← θ − ρ F(θ)⁻¹ ∇θ L (the seed's Theorem 3.1), with F the closed-form
  Fisher pulled back through the guide (any exponential-family site, any parameterization), or a
  Monte Carlo estimate E_q[∇log q ∇log qᵀ] for any other distribution. Groups the natural form
  cannot serve (shared params, low-rank covariances, amortized guides) always use this form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..families import ExponentialFamily
from ..fisher.closed_form import PulledBackFisher
from ..fisher.linalg import conjugate_gradient, flat, solve_psd, unflat
from ..fisher.monte_carlo import MonteCarloFisher
from ..guides import Group, Parameterization
from .base import Candidate, GeometricOptim, StepFn

__all__ = ["NaturalGradient"]

_FISHERS = ("auto", "exact", "monte_carlo")
_SPACES = ("natural", "parameter")
_FORMS = ("dense", "diag", "cg")


class NaturalGradient(GeometricOptim):
    """Natural-gradient optimizer for :class:`pyro.infer.SVI`.

    >>> svi = SVI(model, guide, NaturalGradient(guide, lr=0.5), Trace_ELBO(num_particles=32))

    :param guide: the guide passed to SVI.
    :param lr: step size ρ; 1.0 is the full natural step (exact for conjugate models).
    :param fisher: ``"auto"`` (closed form for exponential families, Monte Carlo elsewhere),
        ``"exact"`` (closed form only: an error for other sites) or ``"monte_carlo"``.
    :param space: ``"natural"`` (mirror descent where possible) or ``"parameter"``.
    :param form: how a parameter-space metric is solved: ``"dense"``, ``"diag"`` or ``"cg"``
        (matrix-free conjugate gradient); default: dense up to ``dense_max`` params, else CG.
    :param damping: λ added to the parameter-space metric, (F + λI)⁻¹.
    :param num_samples: samples for the Monte Carlo Fisher.
    :param fisher_decay: running average of the Monte Carlo Fisher across steps (0: none).
    Remaining keywords go to :class:`~pyro_natgrad.optim.base.GeometricOptim` (``adaptive``,
    ``max_kl``, ``base_optim``, ...).
    """

    def __init__(self, guide: Callable, lr: float = 0.5, *, fisher: str = "auto",
                 space: str = "natural", form: str | None = None, damping: float = 1e-6,
                 num_samples: int = 64, fisher_decay: float = 0.0, dense_max: int = 2000,
                 cg_iters: int = 50, **kwargs):
        _check_choice("fisher", fisher, _FISHERS)
        _check_choice("space", space, _SPACES)
        if form is not None:
            _check_choice("form", form, _FORMS)
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if not (isinstance(num_samples, int) and num_samples > 0):
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not 0 <= fisher_decay < 1:
            raise ValueError(f"fisher_decay must be in [0, 1), got {fisher_decay!r}")
        super().__init__(guide, lr, **kwargs)
        self.fisher, self.space, self.form = fisher, space, form
        self.damping, self.num_samples, self.fisher_decay = damping, num_samples, fisher_decay
        self.dense_max, self.cg_iters = dense_max, cg_iters
        self._fisher_averages: dict[tuple[str, ...], Tensor] = {}

    def summary(self) -> str:
        """Which method each guide site uses (as of the latest step)."""
        rows = [("site", "distribution", "method", "params")]
        for group in self._groups:
            method = self._method(group)
            for s in group.sites:
                rows.append((s.name, type(s.base).__name__, method, ", ".join(s.param_names)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                         for r in rows)

    def _method(self, group: Group) -> str:
        exp_family = all(s.family is not None for s in group.sites)
        if self.fisher == "exact" and not exp_family:
            names = [s.name for s in group.sites if s.family is None]
            raise ValueError(f"fisher='exact' needs exponential-family sites; site(s) {names} "
                             "are not (use fisher='auto' or 'monte_carlo')")
        if self.fisher == "monte_carlo" or not exp_family:
            return "monte_carlo"
        if self.space == "natural" and group.natural:
            return "natural"
        return "closed_form"

    def _step_fn(self, group: Group, leaves: dict[str, Tensor],
                 grads: dict[str, Tensor]) -> tuple[StepFn, str]:
        method = self._method(group)
        if method == "natural":
            return self._mirror_step(group, leaves, grads), method
        return self._parameter_step(group, leaves, grads, method), method

    # ----- mirror descent in natural parameters -------------------------------------------------
    def _mirror_step(self, group: Group, leaves: dict[str, Tensor],
                     grads: dict[str, Tensor]) -> StepFn:
        site = group.sites[0]
        family, param = site.family, site.parameterization
        with torch.no_grad():
            args = param.args({n: leaves[n].detach() for n in param.param_names})
            eta = family.args_to_natural(*args)
        dmu = mean_gradient(family, param, args, [grads[n] for n in param.param_names])
        scale = 1.0 / site.multiplicity

        def step(rate: float) -> Candidate | None:
            with torch.no_grad():
                delta = tuple(-rate * scale * d for d in dmu)
                new_eta = tuple(e + d for e, d in zip(eta, delta, strict=True))
                valid = family.in_domain(*new_eta)
                note = ""
                if not bool(valid.all()):
                    # some elements of a batch left the domain: retract those (a shorter step
                    # for all would slow the rest); if every element left it, shorten the step,
                    # which measured better than a retraction that inflates the precision
                    retracted = family.retract(eta, delta) if bool(valid.any()) else None
                    if retracted is None:
                        return None
                    new_eta = _where(family, valid, new_eta, retracted)
                    note = f"retraction at {int((~valid).sum())} of {valid.numel()} elements"
                    if not bool(family.in_domain(*new_eta).all()):
                        return None
                values = param.unconstrained(family.natural_to_args(*new_eta))
                kl = float(family.kl(eta, new_eta).sum()) * site.multiplicity
            return Candidate(values, kl, note)

        return step

    # ----- θ ← θ − ρ F(θ)⁻¹ ∇θ L ------------------------------------------------------------------
    def _parameter_step(self, group: Group, leaves: dict[str, Tensor], grads: dict[str, Tensor],
                        method: str) -> StepFn:
        names = group.param_names
        theta = [leaves[n] for n in names]
        g = flat([grads[n] for n in names])
        if method == "monte_carlo":
            metric = MonteCarloFisher([(s.fn, s.scale) for s in group.sites], theta,
                                      self.num_samples)
        else:
            metric = PulledBackFisher([(s.family, s.family.args(s.base), s.multiplicity)
                                       for s in group.sites], theta)
        form = self.form or ("dense" if g.numel() <= self.dense_max else "cg")
        direction = self._solve(metric, g, form, names)
        curvature = float(direction @ metric.mvp(direction))
        current = [t.detach().clone() for t in theta]

        def step(rate: float) -> Candidate:
            values = {n: c - rate * d for n, c, d in
                      zip(names, current, unflat(direction, current), strict=True)}
            return Candidate(values, 0.5 * rate ** 2 * curvature)

        return step

    def _solve(self, metric, g: Tensor, form: str, names: tuple[str, ...]) -> Tensor:
        if form == "cg":
            return conjugate_gradient(metric.mvp, g, self.damping, self.cg_iters)
        matrix = metric.diag() if form == "diag" else metric.dense()
        if self.fisher_decay:
            previous = self._fisher_averages.get(names)
            if previous is not None and previous.shape == matrix.shape:
                matrix = self.fisher_decay * previous + (1 - self.fisher_decay) * matrix
            self._fisher_averages[names] = matrix.detach()
        if form == "diag":
            return g / (matrix + self.damping)
        return solve_psd(matrix, g, self.damping)

    def get_state(self) -> dict:
        state = super().get_state()
        state["geometry"]["fisher_averages"] = {
            "|".join(k): v.clone() for k, v in self._fisher_averages.items()}
        return state

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        averages = state.get("geometry", {}).get("fisher_averages", {})
        self._fisher_averages = {tuple(k.split("|")): v.clone() for k, v in averages.items()}


def mean_gradient(family: ExponentialFamily, param: Parameterization, args: tuple[Tensor, ...],
                  grads: list[Tensor]) -> tuple[Tensor, ...]:
    """∂L/∂μ from ∂L/∂θ: the vector-Jacobian product through μ ↦ args ↦ θ.

    Families whose μ ↦ args map is iterative (Gamma, Beta, Dirichlet) use the equivalent
    ∂L/∂μ = F(η)⁻¹ ∂L/∂η, with the closed-form Fisher, instead.
    """
    with torch.enable_grad():
        if getattr(family, "closed_form_mean_map", True):
            mu = [m.detach().requires_grad_() for m in family.args_to_mean(*args)]
            values = param.unconstrained(family.mean_to_args(*mu))
            outs = [values[n] for n in param.param_names]
            return _vjp(outs, mu, grads)
        eta = [e.detach().requires_grad_() for e in family.args_to_natural(*args)]
        values = param.unconstrained(family.natural_to_args(*eta))
        deta = _vjp([values[n] for n in param.param_names], eta, grads)
    flat_deta, batch_shape = family.flatten(deta)
    fisher = family.fisher(*(e.detach() for e in eta))
    dmu = torch.linalg.solve(fisher.expand(batch_shape + fisher.shape[-2:]), flat_deta)
    return family.unflatten(dmu)


def _where(family: ExponentialFamily, keep: Tensor, a: tuple[Tensor, ...],
           b: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Per batch element: ``a`` where ``keep``, else ``b``."""
    return tuple(torch.where(keep.reshape(keep.shape + (1,) * k), x, y)
                 for x, y, k in zip(a, b, family.event_dims, strict=True))


def _vjp(outputs: list[Tensor], inputs: list[Tensor], cotangents: list[Tensor]):
    grads = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs,
                                                                       strict=True))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
