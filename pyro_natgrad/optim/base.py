"""The machinery shared by every geometry-aware optimizer: a :class:`pyro.optim.PyroOptim` that
steps the guide's distribution params together, one group of coupled sites at a time, and hands
every other param (model params, AutoDelta values, network weights) to a plain base optimizer.

Subclasses say how to turn one group's gradient into a step (``_step_fn``); this class owns
reading the guide, safety (non-finite gradients, steps that leave the domain, the KL trust region),
the adaptive step size, diagnostics, and ``get_state``/``set_state``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.optim import PyroOptim
from torch import Tensor
from torch.distributions import constraints, transform_to

from ..fisher.linalg import unflat
from ..guides import Group, GuideReader
from .schedule import AdaptiveStep

__all__ = ["GeometricOptim", "Candidate", "StepRefusedWarning", "linear_step"]

# methods whose steps are checked against the family's own domain as they are built
_SELF_CHECKED = ("natural", "bures")


class StepRefusedWarning(UserWarning):
    """A group's step was refused (non-finite gradient, or no valid step was found)."""


@dataclass
class Candidate:
    """A proposed new value of a group's unconstrained params, and its KL from the current q."""

    values: dict[str, Tensor]
    kl: float | None = None
    note: str = ""
    # the KL measured on the guide re-built at ``values`` (its trace), which replaces ``kl``
    # once ``kl`` fits the trust region: the quadratic model of a linear step can miss it
    measure: Callable[[poutine.Trace], float] | None = None


StepFn = Callable[[float], Candidate | None]


class GeometricOptim(PyroOptim):
    """Base class. ``lr`` is the largest step; ``adaptive`` lets the step shrink and grow back.

    :param guide: the guide passed to SVI (read for its structure, never called by the loss).
    :param lr: step size (> 0).
    :param adaptive: reject steps whose trapezoidal loss estimate rose and shrink the step.
    :param max_kl: trust region: scale a group's step so KL(q_old ‖ q_new) ≤ max_kl (the seed's
        constraint ½ δᵀFδ ≤ ε²); a number, None (no bound) or ``"auto"``: a radius per group that
        starts at ½√n (n = the group's param count), halves below the KL of a rejected step and
        doubles past the KL of an accepted one (a trust-region radius, Nocedal & Wright 2006,
        §4.1, in the units of KL). It is capped at ½n for first-order steps in the guide's own
        parameters, whose quadratic model is only locally right, and uncapped for steps taken in a
        family's own coordinates (natural parameters; Bures–Wasserstein (m, Σ)). Without
        ``adaptive`` the cap alone applies.
    :param max_backtracks: halvings tried before a step outside the domain is refused.
    :param stationarity_window: steps per window of Pflug's stationarity test, which lowers the
        largest step once Monte Carlo noise dominates (None: off); see
        :mod:`~pyro_natgrad.optim.schedule`.
    :param on_nonfinite: ``"warn"`` (refuse the step, warn, keep the params) or ``"raise"``.
    :param base_optim: torch optimizer class for params outside the guide's distributions.
    :param base_args: its arguments.
    """

    def __init__(self, guide: Callable, lr: float, *, adaptive: bool = True,
                 max_kl: float | str | None = "auto", max_backtracks: int = 20,
                 on_nonfinite: str = "warn", min_lr: float = 1e-4,
                 stationarity_window: int | None = 10,
                 base_optim: type[torch.optim.Optimizer] = torch.optim.Adam,
                 base_args: dict | None = None):
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if max_kl not in (None, "auto") and not (isinstance(max_kl, int | float) and max_kl > 0):
            raise ValueError(f"max_kl must be > 0, 'auto' or None, got {max_kl!r}")
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        if not callable(guide):
            raise TypeError(f"guide must be the callable guide passed to SVI, got {guide!r}")
        super().__init__(base_optim, dict(base_args or {"lr": 1e-2}))
        self.guide = guide
        self.lr = float(lr)
        self.max_kl = max_kl
        self.max_backtracks = int(max_backtracks)
        self.on_nonfinite = on_nonfinite
        self.schedule = (AdaptiveStep(self.lr, min_lr=min_lr, window=stationarity_window)
                         if adaptive else None)
        self.reader = GuideReader(guide)
        self.num_steps = 0
        self.last_step: dict[str, dict] = {}
        self._pending: dict | None = None
        self._groups: list[Group] = []
        self._radius: dict[tuple[str, ...], float] = {}

    # ----- what subclasses provide --------------------------------------------------------------
    def _step_fn(self, group: Group, leaves: dict[str, Tensor],
                 grads: dict[str, Tensor]) -> tuple[StepFn, str]:
        """Returns ``step(rate) -> Candidate | None`` for one group, and the method's name."""
        raise NotImplementedError

    def _method(self, group: Group) -> str:
        """The name of the method a group's step uses."""
        raise NotImplementedError

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

    # ----- the step -----------------------------------------------------------------------------
    def __call__(self, params: Iterable[Tensor], *args, **kwargs) -> None:
        store = pyro.get_param_store()
        # SVI passes a set: order the params by name, so that a run does not depend on hashing
        leaves = dict(sorted((store.param_name(p), p) for p in params))
        grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in leaves.items()}
        rejected = self._judge_previous(leaves, grads)
        self._groups = groups = self.reader.read(leaves)
        owned = {n for g in groups for n in g.param_names}
        others = [p for n, p in leaves.items() if n not in owned]
        if others:
            super().__call__(others, *args, **kwargs)
        self.num_steps += 1
        if rejected:
            self.last_step = {s.name: {"method": "undone", "note": "previous step rejected"}
                              for g in groups for s in g.sites}
            return
        self.last_step = {}
        rate = self.schedule.rate if self.schedule is not None else self.lr
        before = {n: leaves[n].detach().clone() for n in owned}
        stepped, taken = set(), {}
        for group in groups:
            accepted = self._step_group(group, leaves, grads, rate)
            if accepted is not None:
                stepped.update(group.param_names)
                if accepted.kl is not None and self.max_kl == "auto":
                    taken["|".join(group.param_names)] = accepted.kl
        if self.schedule is not None and stepped:
            self._pending = {"theta": {n: before[n] for n in stepped},
                             "grad": {n: grads[n] for n in stepped}, "kl": taken}

    def _judge_previous(self, leaves: dict[str, Tensor], grads: dict[str, Tensor]) -> bool:
        """Accepts or rejects the previous step. A rejected step is undone (params back to θ₀)
        and no new step is taken: the next call brings a fresh gradient at θ₀, because retrying
        with the stale g₀ would repeat a direction that a noisy g₀ may have got wrong."""
        pending, self._pending = self._pending, None
        if self.schedule is None or pending is None or not set(pending["theta"]) <= set(leaves):
            return False
        theta1 = {n: leaves[n].detach() for n in pending["theta"]}
        accepted = self.schedule.observe(pending["theta"], theta1, pending["grad"], grads)
        for key, kl in pending.get("kl", {}).items():
            names = tuple(key.split("|"))
            if names not in self._radius:
                continue
            if not accepted:
                floor = self.schedule.min_lr * _start_radius(_count(names, leaves))
                self._radius[names] = max(floor, 0.5 * kl)
            elif self.schedule.last_ratio <= 0:  # the gradient still agrees: no overshoot
                self._radius[names] = max(self._radius[names], 2.0 * kl)
        if accepted:
            return False
        with torch.no_grad():
            for n, t0 in pending["theta"].items():
                leaves[n].copy_(t0)
        return True

    def _step_group(self, group: Group, leaves: dict[str, Tensor], grads: dict[str, Tensor],
                    rate: float) -> Candidate | None:
        """Steps one group in place; the accepted candidate, or None when the step was refused."""
        site_names = ", ".join(s.name for s in group.sites)
        bad = [n for n in group.param_names if not torch.isfinite(grads[n]).all()]
        if bad:
            self._refuse(group, f"non-finite gradient of param(s) {bad} at guide site(s) "
                                f"{site_names}; step refused, params unchanged")
            return None
        try:
            step, method = self._step_fn(group, leaves, grads)
        except torch.linalg.LinAlgError as e:
            self._refuse(group, f"the metric at guide site(s) {site_names} could not be "
                                f"factorized ({e}); step refused, params unchanged")
            return None
        max_kl = self._max_kl(group, leaves, method)
        rebuild = method not in _SELF_CHECKED  # linear steps: re-build the guide to check them
        tried = rate

        def attempt(rate_: float) -> tuple[Candidate | None, str | None]:
            try:
                candidate_ = step(rate_)
            except torch.linalg.LinAlgError:
                return None, "domain"  # e.g. a covariance that is not positive definite
            problem_ = self._problem(candidate_)
            if problem_ is None and self._beyond(candidate_.kl, max_kl):
                return candidate_, "kl"
            if problem_ is None and rebuild:
                problem_ = self._rebuild(candidate_, leaves)
                if problem_ is None and self._beyond(candidate_.kl, max_kl):
                    problem_ = "measured kl"
            return candidate_, problem_

        for backtrack in range(self.max_backtracks + 1):
            candidate, problem = attempt(tried)
            if problem == "kl":  # the quadratic model: KL ∝ rate²
                tried *= max(0.01, min(0.9, math.sqrt(max_kl / candidate.kl)))
                continue
            if problem == "measured kl":  # need not scale as rate²: at most halve
                tried *= min(0.9, max(0.5, math.sqrt(max_kl / candidate.kl)))
                continue
            if problem is not None:
                tried *= 0.5
                continue
            with torch.no_grad():
                for n, v in candidate.values.items():
                    leaves[n].copy_(v)
            for s in group.sites:
                self.last_step[s.name] = {"method": method, "lr": tried, "kl": candidate.kl,
                                          "backtracks": backtrack, "note": candidate.note}
            return candidate
        self._refuse(group, f"no valid step at guide site(s) {site_names} after "
                            f"{self.max_backtracks} halvings (last lr {tried:.3g}); "
                            "step refused, params unchanged")
        return None

    @staticmethod
    def _beyond(kl: float | None, max_kl: float | None) -> bool:
        return max_kl is not None and kl is not None and kl > max_kl * (1 + 1e-9)  # not round-off

    def _rebuild(self, candidate: Candidate, leaves: dict[str, Tensor]) -> str | None:
        """Re-builds the guide at a linear step's values, every sample site replayed from the
        trace the step was read from (a step in the guide's own parameters can pass every
        elementwise check and still give, e.g., a LowRankMultivariateNormal whose capacitance
        matrix fails its Cholesky), and replaces the candidate's KL by its ``measure``. The
        params are left as they were; returns the problem found, or None."""
        with torch.no_grad():
            current = {n: leaves[n].detach().clone() for n in candidate.values}
            for n, v in candidate.values.items():
                leaves[n].copy_(v)
        try:
            trace = self.reader.trace(replay=self.reader.last_trace)
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

    def _max_kl(self, group: Group, leaves: dict[str, Tensor], method: str) -> float | None:
        if self.max_kl != "auto":
            return self.max_kl
        n = _count(group.param_names, leaves)
        cap = None if method in _SELF_CHECKED else 0.5 * n  # exact steps: no cap
        if self.schedule is None:
            return cap
        radius = self._radius.setdefault(group.param_names, _start_radius(n))
        return radius if cap is None else min(radius, cap)

    @staticmethod
    def _problem(candidate: Candidate | None) -> str | None:
        if candidate is None:
            return "domain"
        if not all(torch.isfinite(v).all() for v in candidate.values.values()):
            return "non-finite"
        if candidate.kl is not None and not math.isfinite(candidate.kl):
            return "non-finite"
        if not _in_support(candidate.values):
            return "domain"
        return None

    def _refuse(self, group: Group, message: str) -> None:
        for s in group.sites:
            self.last_step[s.name] = {"method": "refused", "note": message}
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, StepRefusedWarning, stacklevel=3)

    # ----- state --------------------------------------------------------------------------------
    def get_state(self) -> dict:
        """Base-optimizer state per param, plus the step count, step size and pending step."""
        return {"base": super().get_state(),
                "geometry": {"num_steps": self.num_steps,
                             "schedule": self.schedule.state_dict() if self.schedule else None,
                             "pending": _clone(self._pending),
                             "radius": {"|".join(k): v for k, v in self._radius.items()}}}

    def set_state(self, state: dict) -> None:
        if "geometry" not in state:  # a plain PyroOptim state
            return super().set_state(state)
        super().set_state(state["base"])
        geometry = state["geometry"]
        self.num_steps = geometry["num_steps"]
        if self.schedule is not None and geometry["schedule"] is not None:
            self.schedule.load_state_dict(geometry["schedule"])
        self._pending = _clone(geometry["pending"])
        self._radius = {tuple(k.split("|")): v for k, v in geometry.get("radius", {}).items()}


def linear_step(names: tuple[str, ...], theta: list[Tensor], direction: Tensor,
                curvature: float) -> StepFn:
    """θ − rate·direction, with the metric's quadratic model ½ rate² dᵀGd as its KL."""
    current = [t.detach().clone() for t in theta]

    def step(rate: float) -> Candidate:
        values = {n: c - rate * d for n, c, d in
                  zip(names, current, unflat(direction, current), strict=True)}
        return Candidate(values, 0.5 * rate ** 2 * curvature)

    return step


def _count(names: tuple[str, ...], leaves: dict[str, Tensor]) -> int:
    """Number of scalar params in a group."""
    return sum(leaves[n].numel() for n in names)


def _start_radius(n: int) -> float:
    """The KL radius a group of n params starts from, ½√n."""
    return 0.5 * math.sqrt(n)


def _in_support(values: dict[str, Tensor]) -> bool:
    """Whether each unconstrained value maps to a finite value inside its param's constraint
    (a softplus or exp that underflows to 0 would leave a scale's support)."""
    constraints_ = getattr(pyro.get_param_store(), "_constraints", {})
    with torch.no_grad():
        for name, value in values.items():
            constraint = constraints_.get(name, constraints.real)
            if constraint is constraints.real:
                continue
            constrained = transform_to(constraint)(value)
            if not (torch.isfinite(constrained).all() and constraint.check(constrained).all()):
                return False
    return True


def _clone(tree):
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree.detach().clone() if isinstance(tree, Tensor) else tree
