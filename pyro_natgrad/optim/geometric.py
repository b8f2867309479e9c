"""The Pyro adapter shared by the geometry-aware optimizers: names and partitions the params SVI
hands it, runs the step pipeline on each group of coupled guide sites, hands every other param
(model params, AutoDelta values, network weights) to a plain base optimizer, and collects the
pieces' state.

One call, in order (each piece is left out when its option is None):

1. drop the state of groups whose params changed outside the optimizer (a new fit);
2. refuse the whole call when any gradient is non-finite (params kept; ``on_nonfinite``);
3. judge the previous step from the new gradient (:func:`~.step_size.judge`): the step-size
   policy (:class:`~.step_size.BoldDriver`) undoes a rejected step, the ceiling
   (:class:`~.step_size.PflugCeiling`) and the trust region (:class:`~.trust_region.KLTrustRegion`)
   update from the judgement;
4. the base optimizer steps the other params;
5. per group: the direction builds a proposal ``rate -> candidate`` (its transforms: momentum,
   domain repair, gauge projection); each candidate is checked (finite, in the params' support,
   the guide re-built at it with its measured KL for steps in the guide's own parameters) and
   held to the trust region; a failing candidate is shortened, and the group's step refused
   after ``max_backtracks`` tries.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Literal

import pyro
import torch
from pyro.optim import PyroOptim
from torch import Tensor

from ..guides import Group, GuideReader, named_params
from .checks import all_finite, closed_form, finite, in_support, rebuild
from .proposal import Candidate, Proposal
from .step_size import BoldDriver, Judgement, PflugCeiling, Step, judge
from .transforms import HeavyBall
from .trust_region import KLAim, KLTrustRegion, rate_for_kl

__all__ = ["GeometricOptim", "StepRefusedWarning"]

STATE_VERSION = 6  # 6: PflugCeiling keeps its window's sum of squares (5: KLTrustRegion keeps
# each group's last accepted KL; 4: HeavyBall keeps the gradient at its anchor; 3:
# VarianceAdaptation)
_PIECES = ("step_size", "stationarity", "trust_region", "aim", "momentum")
_LIVE: weakref.WeakSet = weakref.WeakSet()  # the optimizers whose pieces are claimed
_CORRELATED = ("MultivariateNormal", "LowRankMultivariateNormal")  # families with a covariance
# get_state's entries besides "version", with their types
_ENTRIES: dict[str, tuple[type, ...]] = {
    "base": (dict,), "num_steps": (int,), "pending": (dict, type(None)), "after": (dict,),
    "nonfinite_streak": (int,), "pieces": (dict,)}


STILL = 1e-12  # KL(q ‖ q') in nats of a step at rate 1 below which q is at its optimum
STUCK = 20  # steps in a row at the step size's floor rejected as too long, warned of


class StepRefusedWarning(UserWarning):
    """A step was refused (non-finite gradient, or no valid step was found) or undone."""


class GeometricOptim(PyroOptim):
    """Base class; subclasses provide :meth:`_propose` (a group's direction) and :meth:`_method`.

    :param guide: the guide object passed to SVI (read for its structure; the same object).
    :param lr: the largest step; assigning ``opt.lr`` later rescales the step-size pieces.
    :param trust_region: a :class:`~.trust_region.KLTrustRegion` (or None: no bound).
    :param aim: a :class:`~.trust_region.KLAim` (or None: a bounded step starts at the step
        size's rate).
    :param step_size: a :class:`~.step_size.BoldDriver` (or None: every step is kept).
    :param stationarity: a :class:`~.step_size.PflugCeiling` (or None: the ceiling stays lr).
    :param momentum: a :class:`~.transforms.HeavyBall` (or None).
    :param base_optim: torch optimizer class for the params that are not a guide distribution's
        arguments; ``base_args`` its arguments (default ``{"lr": 0.01}``).
    :param on_nonfinite: ``"warn"`` (refuse the step, warn, keep the params) or ``"raise"``.
    :param max_backtracks: shortenings tried before a group's step is refused.
    """

    def __init__(self, guide: Callable, lr: float, *, trust_region: KLTrustRegion | None,
                 step_size: BoldDriver | None, stationarity: PflugCeiling | None,
                 momentum: HeavyBall | None = None, aim: KLAim | None = None,
                 base_optim: type[torch.optim.Optimizer] = torch.optim.Adam,
                 base_args: dict | None = None,
                 on_nonfinite: Literal["warn", "raise"] = "warn", max_backtracks: int = 20):
        if isinstance(guide, Iterable) and not callable(guide):
            raise TypeError(
                f"{type(self).__name__} takes the guide as its first argument and is passed to "
                "SVI as it is; it cannot be built by pyro.optim's scheduler wrappers (which pass "
                "params): assign `opt.lr = ...` between steps to schedule it")
        if not callable(guide):
            raise TypeError(f"guide must be the callable guide passed to SVI, got {guide!r}")
        _check_lr(lr)
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        if not (isinstance(base_optim, type) and issubclass(base_optim, torch.optim.Optimizer)):
            raise TypeError(f"base_optim must be a torch.optim.Optimizer class, such as "
                            f"torch.optim.Adam, got {base_optim!r}")
        if base_args is not None and not isinstance(base_args, dict):
            raise TypeError(f"base_args must be a dict of {base_optim.__name__}'s arguments, "
                            f"got {base_args!r}")
        if not (isinstance(max_backtracks, int) and max_backtracks >= 1):
            raise ValueError(f"max_backtracks must be an integer >= 1, got {max_backtracks!r}")
        _check_piece("trust_region", trust_region, KLTrustRegion)
        _check_piece("step_size", step_size, BoldDriver)
        _check_piece("stationarity", stationarity, PflugCeiling)
        _check_piece("momentum", momentum, HeavyBall)
        _check_piece("aim", aim, KLAim)
        super().__init__(base_optim, dict(base_args or {"lr": 1e-2}))
        self.guide = guide
        self._lr = float(lr)
        self.trust_region, self.step_size = trust_region, step_size
        self.stationarity, self.momentum, self.aim = stationarity, momentum, aim
        for piece in (step_size, stationarity):
            if piece is not None:
                piece.start(self._lr)
        self.on_nonfinite = on_nonfinite
        self.max_backtracks = max_backtracks
        self.reader = GuideReader(guide)
        self.num_steps = 0
        self.last_step: dict[str, dict] = {}
        self._groups: list[Group] = []
        self._frozen: list[str] = []
        self._pending: dict | None = None
        self._after: dict[str, Tensor] = {}
        self._left: dict[str, Tensor] = {}  # this call's accepted values, kept as _after
        self._nonfinite_streak = 0
        self._still = False  # the latest step would move q by < STILL nats even at rate 1

    # ----- what subclasses provide --------------------------------------------------------------
    def _propose(self, key: tuple[str, ...], group: Group, leaves: dict[str, Tensor],
                 grads: dict[str, Tensor]) -> Proposal:
        raise NotImplementedError

    def _method(self, group: Group) -> str:
        raise NotImplementedError

    def _invariant(self, group: Group) -> bool:
        """Whether the group's step is affine invariant, for the stationarity test's window
        (:class:`~.step_size.PflugCeiling`'s ``invariant_window``)."""
        return False

    def _reads_distributions(self, group: Group) -> bool:
        """Whether the group's step reads its sites' distributions (``Site.fn``, ``Site.base``,
        the reader's trace), not only their structure and the params: then the guide is re-run
        every call (:meth:`~pyro_natgrad.guides.GuideReader.read`)."""
        return True

    def _stateful(self) -> dict[str, object]:
        """Pieces with per-group state, by name (subclasses add theirs)."""
        return {name: getattr(self, name) for name in _PIECES}

    def _claim_pieces(self) -> None:
        """Called at the end of a subclass's ``__init__``: a stateful piece object may belong to
        one live optimizer only (two sharing a PflugCeiling would share its ceiling, two sharing
        a KLTrustRegion its radii)."""
        mine = {id(p): name for name, p in self._stateful().items() if p is not None}
        for other in list(_LIVE):
            for name, piece in other._stateful().items():
                if piece is not None and id(piece) in mine:
                    raise ValueError(
                        f"the {type(piece).__name__} given as this {type(self).__name__}'s "
                        f"{mine[id(piece)]} is also the {name} of another "
                        f"{type(other).__name__}: pieces hold state, so each optimizer needs "
                        f"its own (build a new {type(piece).__name__} for each)")
        _LIVE.add(self)

    # ----- the learning rate ----------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The largest step. Assigning it rescales the current rate and ceiling by the same factor
        (a schedule: ``opt.lr *= 0.5``)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        _check_lr(value)
        factor = float(value) / self._lr
        for piece in (self.step_size, self.stationarity):
            if piece is not None:
                piece.rescale(factor)
        self._lr = float(value)

    def _rate(self) -> float:
        if self.step_size is not None:
            return self.step_size.rate
        return self.stationarity.ceiling if self.stationarity is not None else self._lr

    # ----- the step -----------------------------------------------------------------------------
    def __call__(self, params: Iterable[Tensor], *args, **kwargs) -> None:
        # SVI passes a set: order the params by name, so that a run does not depend on hashing
        leaves = dict(sorted(named_params(params)))
        grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for n, p in leaves.items()}
        self._groups = groups = self._read(leaves)
        owned = {n for g in groups for n in g.param_names}
        self.num_steps += 1
        kept = self._forget_stale(groups, leaves)
        self._left = {}  # (empty unless a previous call raised mid-step)
        if self._refuse_nonfinite(groups, leaves, grads):
            return
        rejected = self._judge_pending(leaves, grads)
        self._frozen = sorted(n for n, p in leaves.items() if not p.requires_grad)
        others = [p for n, p in leaves.items() if n not in owned and p.requires_grad]
        if others:
            super().__call__(others, *args, **kwargs)
        if rejected:
            self.last_step = {s.name: {"method": "undone", "note": "previous step rejected"}
                              for g in groups for s in g.sites}
        else:
            self._step_groups(groups, leaves, grads, kept)
        # the values left: a stepped param's is recorded by _accept; an unstepped one whose value
        # was verified equal to what this optimizer left is that value (a restored one's too:
        # _restore sets it); only an edited one needs a copy
        self._after = {n: self._left[n] if n in self._left
                       else self._after[n] if n in kept else leaves[n].detach().clone()
                       for n in owned}
        self._left = {}

    def _read(self, leaves: dict[str, Tensor]) -> list[Group]:
        """The guide's groups, re-using the previous read's where the reader can vouch for their
        structure and no group's step reads distributions (one guide run saved per call)."""
        groups = self.reader.read(leaves, reuse=True)
        if self.reader.reused and any(self._reads_distributions(g) for g in groups):
            groups = self.reader.read(leaves)
        return groups

    def _step_groups(self, groups: list[Group], leaves: dict[str, Tensor],
                     grads: dict[str, Tensor], kept: set[str]) -> None:
        self.last_step = {}
        rate = self._rate()
        # θ₀ for undo: the value this optimizer left where the leaf was verified equal to it
        before = {n: self._after[n] if n in kept else leaves[n].detach().clone()
                  for g in groups for n in g.param_names}
        stepped, taken, invariant, at_unit_rate, accepted_groups = set(), {}, True, [], 0
        for group in groups:
            accepted = self._step_group(group, leaves, grads, rate)
            if accepted is not None:
                accepted_groups += 1
                stepped.update(group.param_names)
                invariant = invariant and self._invariant(group)
                if accepted.kl is not None:
                    taken[group.param_names] = accepted.kl
                    if accepted.rate > 0:
                        at_unit_rate.append(accepted.kl / accepted.rate ** 2)
        if at_unit_rate:
            self._still = max(at_unit_rate) < STILL
        if stepped and (self.step_size is not None or self.stationarity is not None):
            # a step that moved no group's q (exact KL < STILL·rate²) is not judged: the
            # gradients at its ends differ by rounding, and would decide at random
            still = len(at_unit_rate) == accepted_groups and self._still
            self._pending = None if still else {
                "theta": {n: before[n] for n in stepped}, "grad": {n: grads[n] for n in stepped},
                "kl": taken, "invariant": invariant}

    def _refuse_nonfinite(self, groups: list[Group], leaves: dict[str, Tensor],
                          grads: dict[str, Tensor]) -> bool:
        """Refuses the whole call when a gradient is non-finite: nothing is judged or stepped. A
        step still pending after two such calls in a row is undone (the gradient at its end
        stays non-finite)."""
        if all_finite(grads.values()):
            self._nonfinite_streak = 0
            return False
        bad = [n for n, g in grads.items() if not all_finite([g])]
        self._nonfinite_streak += 1
        where = {n: [s.name for g in groups for s in g.sites if n in g.param_names]
                 for n in bad}
        named = "; ".join(f"param {n!r}" + (f" (guide site(s) {', '.join(w)})" if w else
                                            " (base optimizer)") for n, w in where.items())
        message = f"non-finite gradient of {named}; step refused, params unchanged"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        if self._nonfinite_streak >= 2 and self.undo("the gradient at its end is non-finite"):
            message += "; the previous step, whose end gives non-finite gradients, was undone"
        self.last_step = {s.name: {"method": "refused", "note": message}
                          for g in groups for s in g.sites}
        warnings.warn(message, StepRefusedWarning, stacklevel=3)
        return True

    def _forget_stale(self, groups: list[Group], leaves: dict[str, Tensor]) -> set[str]:
        """Drops the state of every group whose params are not the values this optimizer left
        (a new guide or a cleared param store, or params edited by hand): state belongs to the
        params it was built on. Returns the names of the params found equal to those values."""
        kept: set[str] = set()
        for group in groups:
            key = group.param_names
            if all(n in self._after and self._after[n].shape == leaves[n].shape
                   and torch.equal(self._after[n], leaves[n].detach()) for n in key):
                kept.update(key)
                continue
            for piece in self._stateful().values():
                if piece is not None and hasattr(piece, "forget"):
                    piece.forget(key)
            if self._pending is not None and set(key) & set(self._pending["theta"]):
                self._pending = None
        return kept

    def _judge_pending(self, leaves: dict[str, Tensor], grads: dict[str, Tensor]) -> bool:
        """Judges the previous step; a rejected one is undone (params back to θ₀) and no new step
        is taken: the next call brings a fresh gradient at θ₀, because retrying with a stale,
        noisy g₀ would repeat a direction it may have got wrong."""
        pending, self._pending = self._pending, None
        if pending is None or not set(pending["theta"]) <= set(leaves):
            return False
        theta1 = {n: leaves[n].detach() for n in pending["theta"]}
        tolerance = self.step_size.tolerance if self.step_size is not None else 0.0
        judgement = judge(pending["theta"], theta1, pending["grad"], grads, tolerance)
        if self.step_size is None:  # nothing is undone: the judgement only informs the ceiling
            judgement = Judgement(judgement.descent, judgement.change, judgement.ratio, True)
        self._update(judgement, pending, leaves,
                     Step(pending["theta"], theta1, pending["grad"], grads))
        if judgement.accepted:
            return False
        self._restore(pending["theta"], leaves)
        if isinstance(self.step_size, BoldDriver) and self.step_size.stuck == STUCK:
            warnings.warn(
                f"{STUCK} steps in a row at the step size's floor (BoldDriver.min_lr × lr = "
                f"{self.step_size.min_lr:g} × {self._lr:g}) were rejected and undone: the "
                "gradients at their ends say each went four times past the minimum along it, "
                "and no shorter step is tried, so the fit is not moving: lr is too large for "
                "this problem (try a smaller lr)", StepRefusedWarning, stacklevel=3)
        return True

    def _update(self, judgement: Judgement, pending: dict, leaves: dict[str, Tensor],
                step: Step | None = None) -> None:
        if self.stationarity is not None:
            self.stationarity.update(judgement, self._lr, step,
                                     invariant=pending.get("invariant", False))
        if self.trust_region is not None:
            for key, kl in pending["kl"].items():
                self.trust_region.update(key, _count(key, leaves), kl, judgement)
        if self.step_size is not None:
            ceiling = self.stationarity.ceiling if self.stationarity is not None else self._lr
            self.step_size.update(judgement, self._lr, ceiling)

    def _restore(self, theta: dict[str, Tensor], leaves: dict[str, Tensor]) -> None:
        """Puts params back to ``theta``, as values this optimizer left."""
        with torch.no_grad():
            for n, t0 in theta.items():
                leaves[n].copy_(t0)
        self._after.update({n: t.detach().clone() for n, t in theta.items()})

    def _step_group(self, group: Group, leaves: dict[str, Tensor], grads: dict[str, Tensor],
                    rate: float) -> Candidate | None:
        """Steps one group in place; the accepted candidate, or None when the step was refused."""
        key = group.param_names
        site_names = ", ".join(s.name for s in group.sites)
        try:
            proposal = self._propose(key, group, leaves, grads)
        except torch.linalg.LinAlgError as e:
            self._refuse(group, f"the metric at guide site(s) {site_names} could not be "
                                f"factorized ({e}); step refused, params unchanged")
            return None
        tried, problems, bound, previous = rate, [], None, None
        if self.aim is not None and self.trust_region is not None \
                and self.trust_region.decided(key, proposal.exact):
            bound = self._bound(key, leaves, proposal.exact, None)
            first = self.aim.first(key, rate, proposal.model_kl, bound)
            tried = rate if first is None else first
        tried = min(tried, proposal.max_rate)
        for backtrack in range(self.max_backtracks + 1):
            try:
                candidate = proposal.candidate(tried)
            except torch.linalg.LinAlgError:
                candidate = None  # e.g. a covariance that is not positive definite
            if bound is None:  # set by the step at the full rate
                bound = self._bound(key, leaves, proposal.exact, candidate)
            problem = self._check(proposal, candidate, bound, leaves)
            problems.append(problem)
            if problem is None:
                self._accept(group, candidate, leaves, proposal.method, backtrack)
                if self.aim is not None and proposal.model_kl is not None:
                    self.aim.record(key, candidate.kl, proposal.model_kl(candidate.rate))
                return candidate
            if problem in ("kl", "measured kl"):
                # past half the tries, a KL that does not fall as the rate's square has a
                # part held fixed: halve (rate_for_kl)
                late = backtrack >= self.max_backtracks // 2
                shorter = rate_for_kl(tried, candidate.kl, bound, problem == "kl",
                                      previous if late else None)
                previous, tried = (tried, candidate.kl), shorter
            else:
                tried *= 0.5
        reasons = ", ".join(sorted(set(problems)))
        self._refuse(group, f"no valid step at guide site(s) {site_names} after "
                            f"{self.max_backtracks} shortenings (last lr {tried:.3g}; "
                            f"problems: {reasons}); step refused, params unchanged")
        return None

    def _bound(self, key: tuple[str, ...], leaves: dict[str, Tensor], exact: bool,
               candidate: Candidate | None) -> float:
        """The trust region's bound for this step: a clean exact step (one that needed no domain
        repair at the full rate) may be unbounded."""
        if self.trust_region is None:
            return math.inf
        clean = candidate is not None and not candidate.repaired
        return self.trust_region.bound(key, _count(key, leaves), exact, clean)

    def _check(self, proposal: Proposal, candidate: Candidate | None, bound: float,
               leaves: dict[str, Tensor]) -> str | None:
        if proposal.exact and candidate is not None and _beyond(candidate.kl, bound) \
                and math.isfinite(candidate.kl):
            return "kl"  # before its values are read: an exact step forms them only if it fits
        problem = finite(candidate) or in_support(candidate)
        if problem is None and _beyond(candidate.kl, bound):
            return "kl"
        if problem is None and not proposal.exact:
            problem = (rebuild(candidate, leaves, self.reader) if candidate.closed_form_kl is None
                       else closed_form(candidate))
            if problem is None and _beyond(candidate.kl, bound):
                problem = "measured kl"
        return problem

    def _accept(self, group: Group, candidate: Candidate, leaves: dict[str, Tensor],
                method: str, backtracks: int) -> None:
        with torch.no_grad():
            for n, v in candidate.values.items():
                leaves[n].copy_(v)
                # the value left: the candidate's own tensor where it is an exact private copy
                self._left[n] = v if _own_copy(v, leaves[n]) else leaves[n].detach().clone()
        if self.momentum is not None:
            self.momentum.accept(group.param_names, candidate)
        for s in group.sites:
            self.last_step[s.name] = {"method": method, "lr": candidate.rate, "kl": candidate.kl,
                                      "backtracks": backtracks, "note": candidate.note}

    def _refuse(self, group: Group, message: str) -> None:
        for s in group.sites:
            self.last_step[s.name] = {"method": "refused", "note": message}
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, StepRefusedWarning, stacklevel=4)

    # ----- ending and repairing a run -------------------------------------------------------------
    def undo(self, reason: str = "") -> bool:
        """Undoes the last step if it has not been judged yet (params back to where it started,
        the step size and trust radius shrunk as for a rejected step), e.g. when the model itself
        fails at the new params. True when there was such a step."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        leaves = _stored_leaves(pending["theta"])
        rejected = Judgement(descent=False, change=math.inf, ratio=math.inf, accepted=False)
        self._update(rejected, pending, leaves)
        self._restore(pending["theta"], leaves)
        note = "step undone" + (f": {reason}" if reason else "")
        self.last_step = {name: {"method": "undone", "note": note} for name in self.last_step}
        return True

    def finalize(self) -> bool:
        """Ends a run on a judged step: the pending step is judged with the params' current
        ``.grad`` (compute it first, e.g. with ``svi.loss_and_grads``) and undone when rejected,
        or when a gradient is missing or non-finite. True when the params end on a kept step."""
        pending = self._pending
        if pending is None:
            return True
        leaves = _stored_leaves(pending["theta"])
        grads = {n: p.grad for n, p in leaves.items()}
        if any(g is None for g in grads.values()) or not all_finite(grads.values()):
            return not self.undo("it could not be judged (no finite gradient at its end)")
        if not any(bool(g.any()) for g in grads.values()):
            warnings.warn("finalize: every gradient of the last step's params is exactly zero, "
                          "so the step is judged as landing on an optimum; svi.step leaves its "
                          "params' .grad zeroed: compute the gradient at the final params first "
                          "(svi.loss_and_grads(svi.model, svi.guide, *args))", stacklevel=2)
        return not self._judge_pending(leaves, {n: g.detach() for n, g in grads.items()})

    def diagnose(self) -> list[str]:
        """What limits the fit now, in words, with the remedy (empty when nothing does). A fit
        whose latest step would move q by less than 10⁻¹² nats even at rate 1 (KL / rate², the
        gradient zero to rounding) is at its optimum: its step size says nothing then."""
        notes = []
        lowered = self.stationarity is not None and self.stationarity.ceiling < self._lr
        if lowered and not self._still:
            factorized, base = self._factorized(), self.base_params()
            remedies = ("more particles (Trace_ELBO(num_particles=...)), a full-covariance guide,"
                        if factorized else "more particles (Trace_ELBO(num_particles=...))")
            notes.append(
                f"the step size was lowered to {self.stationarity.ceiling:.3g} "
                f"({100 * self.stationarity.ceiling / self._lr:.2g}% of lr = {self._lr:g}) by "
                "the stationarity test, where successive moves disagree: so a noisy fit "
                "settles at its optimum, but Monte Carlo noise"
                + (" or the base optimizer's moves of "
                   f"{', '.join(base[:3])}{', …' if len(base) > 3 else ''} (the target of the "
                   "natural step moving under it)" if base else "")
                + " can also stop it short, and where the loss still falls it has"
                + (" (a factorized guide on a correlated posterior travels slowly)"
                   if factorized else "")
                + f"; {remedies} would fit closer; stationarity=PflugCeiling(growth=1.0) keeps "
                "a larger step over a long fit (closer where the guide still travels, noisier "
                "where noise dominates)")
        if (not self._still and self.step_size is not None
                and self.step_size.rate <= self.step_size.min_lr * self._lr):
            notes.append(
                f"the step size is at its floor ({self.step_size.rate:.3g}): steps keep being "
                "rejected; check the model for non-differentiable or noisy terms")
        refused = sorted(n for n, s in self.last_step.items() if s.get("method") == "refused")
        if refused:
            notes.append(f"the last step was refused at guide site(s) {', '.join(refused)}: "
                         f"{self.last_step[refused[0]]['note']}")
        return notes

    def _factorized(self) -> bool:
        """Whether the guide (as of the latest step) is factorized (mean-field): every site is of
        a known family without a covariance between latent variables, so neither a
        MultivariateNormal or LowRankMultivariateNormal nor a distribution of no known family
        (a normalizing flow)."""
        sites = [s for group in self._groups for s in group.sites]
        return bool(sites) and all(s.family is not None and s.family.name not in _CORRELATED
                                   for s in sites)

    # ----- what it does ---------------------------------------------------------------------------
    def base_params(self) -> list[str]:
        """The params the base optimizer steps (as of the latest step): those outside every guide
        distribution's arguments, such as model params or a GP's kernel hyperparameters."""
        owned = {n for group in self._groups for s in group.sites for n in s.param_names}
        return [n for n, _ in named_params(self.optim_objs) if n is not None and n not in owned]

    def summary(self) -> str:
        """Every param the optimizer has seen: the guide site it feeds and the method of its step
        (as of the latest step), the base optimizer that steps it, or that it is frozen."""
        rows = [("param", "site", "distribution", "method")]
        for group in self._groups:
            taken = self.last_step.get(group.sites[0].name, {}).get("method")
            method = (taken if taken not in (None, "undone", "refused")  # its proposal's name
                      else self._method(group))
            rows += [(n, s.name, type(s.base).__name__, method)
                     for s in group.sites for n in s.param_names]
        base = f"base: {self.pt_optim_constructor.__name__}({self.pt_optim_args})"
        rows += [(name, "-", "-", base) for name in self.base_params()]
        rows += [(name, "-", "-", "frozen (requires_grad=False): not stepped")
                 for name in self._frozen]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in rows)

    # ----- state --------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Pickling and deep copies drop the latest read of the guide (its distributions hold the
        autograd graph); the next step reads the guide again."""
        return {**self.__dict__, "_groups": []}

    def get_state(self) -> dict:
        """The base optimizer's state per param, and the geometric state: step count, pending
        step, the params this optimizer left, and each piece's own state."""
        return {"version": STATE_VERSION, "base": super().get_state(),
                "num_steps": self.num_steps, "pending": _clone(self._pending),
                "after": _clone(self._after), "nonfinite_streak": self._nonfinite_streak,
                "pieces": {name: piece.state_dict() for name, piece in self._stateful().items()
                           if piece is not None}}

    def set_state(self, state: dict) -> None:
        """Loads :meth:`get_state`'s output (:meth:`load`: :meth:`save`'s file); raises TypeError
        for anything but a dict, and ValueError naming what does not fit (not such a state, such
        as a plain Pyro optimizer's or the param store's; another version; a missing entry; a
        piece this optimizer lacks; params whose shapes differ from the store's)."""
        self._check_state(state)
        pieces = self._stateful()
        for name in state["pieces"]:
            if pieces.get(name) is None:
                raise ValueError(f"the state has a {name!r} piece, which this optimizer does "
                                 f"not have (it was built with {name}=None or another class)")
        _check_shapes(state)
        super().set_state(state["base"])
        self.num_steps = state["num_steps"]
        self._pending = _clone(state["pending"])
        self._after = _clone(state["after"])
        self._nonfinite_streak = state["nonfinite_streak"]
        for name, piece_state in state["pieces"].items():
            pieces[name].load_state_dict(piece_state)

    def _check_state(self, state: object) -> None:
        """Raises unless ``state`` is a dict of :meth:`get_state`'s version and entries."""
        cls = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{cls}.set_state takes the dict that get_state() returns, got "
                            f"{type(state).__name__}")
        if "version" not in state:
            if "geometry" in state:
                raise ValueError("this optimizer state was saved by an earlier version of "
                                 "pyro_natgrad and cannot be loaded")
            if set(state) == {"params", "constraints"}:
                what = "the param store's state: load it with pyro.get_param_store().load"
            elif state and all(isinstance(v, dict) and "state" in v for v in state.values()):
                what = ("a plain Pyro optimizer's state (param name -> torch optimizer state), "
                        "which does not carry this optimizer's step sizes, trust radii and "
                        "pending step")
            else:
                what = f"a dict of {sorted(map(str, state))[:4]}" if state else "empty"
            raise ValueError(f"not a {cls} state (no 'version' entry; it is {what}): set_state "
                             "takes what get_state() returned, load what save() wrote")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"optimizer state version {state['version']} is not "
                             f"{STATE_VERSION}")
        missing = sorted(set(_ENTRIES) - set(state))
        if missing:
            raise ValueError(f"the {cls} state lacks the entries {missing}")
        for key, kinds in _ENTRIES.items():
            if not isinstance(state[key], kinds):
                raise ValueError(f"the {cls} state's {key!r} is a {type(state[key]).__name__}; "
                                 f"get_state() gives {' or '.join(k.__name__ for k in kinds)}")


def _check_lr(lr: float) -> None:
    """A real number (a NumPy scalar or a one-element tensor too), finite and > 0."""
    if callable(lr):
        raise TypeError(f"lr must be a number, got the callable {lr!r}: the optimizer takes one "
                        "guide, the object passed to SVI")
    number = (isinstance(lr, numbers.Real) and not isinstance(lr, bool)
              or isinstance(lr, Tensor) and lr.numel() == 1 and lr.dtype != torch.bool)
    if not (number and math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


def _check_piece(name: str, piece: object, kind: type) -> None:
    if piece is not None and not isinstance(piece, kind):
        raise TypeError(f"{name} must be a {kind.__name__} or None, got {piece!r}")


def _check_shapes(state: dict) -> None:
    """Params named in the state must have the store's shapes, where the store has them."""
    store = pyro.get_param_store()
    named = dict(state["after"])
    if state["pending"] is not None:
        named.update(state["pending"]["theta"])
    for name, value in named.items():
        if name in store and store.get_param(name).unconstrained().shape != value.shape:
            raise ValueError(f"optimizer state for param {name!r} has shape "
                             f"{tuple(value.shape)}, the param store's is "
                             f"{tuple(store.get_param(name).unconstrained().shape)}")


def _own_copy(value: Tensor, leaf: Tensor) -> bool:
    """``value``, just copied into ``leaf``, equals it exactly and is a tensor of its own (same
    dtype, shape and device; no memory shared with the leaf)."""
    return (value.dtype == leaf.dtype and value.shape == leaf.shape
            and value.device == leaf.device
            and value.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr())


def _beyond(kl: float | None, bound: float) -> bool:
    return kl is not None and kl > bound * (1 + 1e-9)  # not round-off


def _stored_leaves(names: Iterable[str]) -> dict[str, Tensor]:
    """The param store's unconstrained leaves of ``names``."""
    store = pyro.get_param_store()
    return {n: store.get_param(n).unconstrained() for n in names}


def _count(names: tuple[str, ...], leaves: dict[str, Tensor]) -> int:
    """Number of scalar params in a group."""
    return sum(leaves[n].numel() for n in names)


def _clone(tree):
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree.detach().clone() if isinstance(tree, Tensor) else tree
