"""Reading a Pyro guide: which params feed which sample site's distribution, and how.

The reader runs the guide once under :func:`pyro.poutine.trace` (on the arguments of its last call
and the subsample indices its plates drew then, with the global RNG state restored afterwards),
and for every latent sample site finds the unconstrained param-store leaves its distribution
depends on (by autograd), the exponential family of its distribution (if any), and, where the
map is invertible, a :class:`Parameterization`: how to write a new value of the distribution's
arguments back into the guide's own params, and which param's rotations leave it unchanged.
Nothing here knows about optimizers or the chain rule (:mod:`pyro_natgrad.pullback`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import (
    AutoGuide,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
)
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor
from torch.distributions import Distribution, transform_to
from torch.distributions.multivariate_normal import _precision_to_scale_tril

from .families import ExponentialFamily, family_of, mask_multiplicity, unwrap
from .fisher.monte_carlo import draw, log_density

__all__ = ["GuideReader", "Site", "Group", "Parameterization", "record_args"]


def record_args(guide: Callable) -> Callable:
    """Wraps a plain-function guide so the optimizers can re-run it with its last arguments.

    The one extra line a plain-function guide needs (``nn.Module`` guides, including every AutoGuide
    and ``PyroModule``, are recorded automatically)::

        guide = pyro_natgrad.record_args(guide)
    """

    @functools.wraps(guide)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _SubsampleRecorder() as drawn:
            out = guide(*args, **kwargs)
        wrapper.last_call = (args, kwargs, drawn.values)
        _keep_batch(wrapper, drawn.values)
        return out

    wrapper.last_call = None
    return wrapper


class Parameterization:
    """An invertible map from a family's constructor arguments to unconstrained params."""

    param_names: tuple[str, ...]

    def args(self, values: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """The distribution's arguments from unconstrained param values (differentiable)."""
        raise NotImplementedError

    def unconstrained(self, args: Sequence[Tensor]) -> dict[str, Tensor]:
        """The unconstrained param values that produce ``args`` (differentiable)."""
        raise NotImplementedError

    def rotation_gauge(self, family: ExponentialFamily) -> str | None:
        """The name of the param P whose rotations P ↦ PR (R orthogonal) leave the distribution
        unchanged, because they rotate the family's low-rank factor W ↦ WR
        (:attr:`~pyro_natgrad.families.ExponentialFamily.rotation_gauge`); None when there is
        none."""
        raise NotImplementedError


@dataclass
class Direct(Parameterization):
    """Each argument is one param's constrained value: ``arg_i = transform_to(c_i)(u_i)``."""

    param_names: tuple[str, ...]
    constraints: tuple[constraints.Constraint, ...]

    def args(self, values: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return tuple(transform_to(c)(values[n])
                     for n, c in zip(self.param_names, self.constraints, strict=True))

    def unconstrained(self, args: Sequence[Tensor]) -> dict[str, Tensor]:
        return {n: transform_to(c).inv(a)
                for n, c, a in zip(self.param_names, self.constraints, args, strict=True)}

    def rotation_gauge(self, family: ExponentialFamily) -> str | None:
        """The param that is the family's factor, where its constraint is the real line."""
        index = family.rotation_gauge
        if index is None or not is_real(self.constraints[index]):
            return None
        return self.param_names[index]


@dataclass
class Gathered(Direct):
    """:class:`Direct` on the entries a subsampling plate selects: Pyro indexes a param read
    inside the plate, ``arg_i = transform_to(c_i)(u_i)`` taken at ``index`` along axis
    ``dims[i]`` of u_i. The inverse writes the arguments into those entries of the params'
    current values (``leaves``, read when called) and leaves the others as they are."""

    dims: tuple[int, ...] = ()
    index: Tensor | None = None
    leaves: dict[str, Tensor] = field(default_factory=dict)

    def args(self, values: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return tuple(transform_to(c)(values[n]).index_select(d, self.index)
                     for n, c, d in zip(self.param_names, self.constraints, self.dims,
                                        strict=True))

    def unconstrained(self, args: Sequence[Tensor]) -> dict[str, Tensor]:
        return {n: self.leaves[n].detach().index_copy(d, self.index, transform_to(c).inv(a))
                for n, c, d, a in zip(self.param_names, self.constraints, self.dims, args,
                                      strict=True)}


@dataclass
class CholeskyOf(Direct):
    """:class:`Direct` for ``MultivariateNormal(loc, covariance_matrix=C)`` or
    ``(loc, precision_matrix=P)`` with C or P a param's constrained value: the family's argument
    ``scale_tril`` is L = chol(C), or torch's factor of P⁻¹ (``precision``); the inverse writes
    C = LLᵀ, or P = L⁻ᵀL⁻¹, through the param's constraint."""

    precision: bool = False

    def args(self, values: dict[str, Tensor]) -> tuple[Tensor, ...]:
        loc, matrix = super().args(values)
        return loc, _scale_tril(matrix, self.precision)

    def unconstrained(self, args: Sequence[Tensor]) -> dict[str, Tensor]:
        loc, tril = args
        matrix = torch.cholesky_inverse(tril) if self.precision else tril @ tril.mT
        return super().unconstrained((loc, matrix))


def _scale_tril(matrix: Tensor, precision: bool) -> Tensor:
    """The factor torch's MultivariateNormal takes from a covariance or precision ``matrix``."""
    return _precision_to_scale_tril(matrix) if precision else torch.linalg.cholesky(matrix)


def _reads(leaf: Tensor, constraint: constraints.Constraint, form: bool | None, arg: Tensor,
           vjp: Tensor) -> bool:
    """Whether ``arg`` is y = transform_to(constraint)(leaf) (``form`` None), or torch's factor
    of y read as a covariance (False) or a precision (True): equal in value, and in the
    vector-Jacobian product ``vjp`` of the ramp cotangent (:func:`_ramp`) that the guide's
    own graph gave."""
    with torch.enable_grad():
        x = leaf.detach().requires_grad_()
        y = transform_to(constraint)(x)
        if y.shape != arg.shape or (form is not None and y.dim() < 2):
            return False
        try:
            y = y if form is None else _scale_tril(y, form)
        except (torch.linalg.LinAlgError, RuntimeError):
            return False
        if not torch.equal(y.detach(), arg):
            return False
        (mine,) = torch.autograd.grad(y, x, _ramp(y), allow_unused=True)
    mine = torch.zeros_like(x) if mine is None else mine
    return mine.shape == vjp.shape and bool(torch.allclose(mine, vjp, rtol=1e-5, atol=1e-8 * (
        1 + float(vjp.abs().max()))))


@dataclass
class ScaledUnitCholesky(Parameterization):
    """AutoMultivariateNormal: ``loc``, and ``scale_tril = diag(scale) · U`` with U unit-lower.

    Inverse: ``scale = diag(L)``, ``U = L / scale[..., None]`` (Pyro's ``AutoMultivariateNormal``).
    """

    param_names: tuple[str, ...]  # (loc, scale, scale_tril)
    constraints: tuple[constraints.Constraint, ...]

    def args(self, values: dict[str, Tensor]) -> tuple[Tensor, ...]:
        if is_unit_lower_cholesky(self.constraints[2]):  # U = tril(u, −1) + I:
            loc, scale = (transform_to(c)(values[n])  # L = s·tril(u, −1) + diag(s), one pass
                          for n, c in zip(self.param_names[:2], self.constraints[:2],
                                          strict=True))
            tril = (values[self.param_names[2]] * scale[..., None]).tril_(-1)
            tril.diagonal(dim1=-2, dim2=-1).copy_(scale)
            return loc, tril
        loc, scale, unit = (transform_to(c)(values[n])
                            for n, c in zip(self.param_names, self.constraints, strict=True))
        return loc, scale[..., None] * unit

    def unconstrained(self, args: Sequence[Tensor]) -> dict[str, Tensor]:
        loc, tril = args
        scale = tril.diagonal(dim1=-2, dim2=-1)
        unit = tril / scale[..., None]
        return {n: transform_to(c).inv(v)
                for n, c, v in zip(self.param_names, self.constraints, (loc, scale, unit),
                                   strict=True)}

    def rotation_gauge(self, family: ExponentialFamily) -> str | None:
        return None  # L = diag(scale)·U is determined by Σ = LLᵀ


@dataclass
class ScaledLowRank(Parameterization):
    """AutoLowRankMultivariateNormal: ``loc``, ``cov_factor = diag(scale)·P`` and
    ``cov_diag = scale²`` from params (loc, scale, P) (Pyro's ``get_posterior``).

    Inverse: ``scale = √cov_diag``, ``P = cov_factor / scale[..., None]``.
    """

    param_names: tuple[str, ...]  # (loc, scale, cov_factor)
    constraints: tuple[constraints.Constraint, ...]

    def args(self, values: dict[str, Tensor]) -> tuple[Tensor, ...]:
        loc, scale, factor = (transform_to(c)(values[n])
                              for n, c in zip(self.param_names, self.constraints, strict=True))
        return loc, factor * scale.unsqueeze(-1), scale * scale

    def unconstrained(self, args: Sequence[Tensor]) -> dict[str, Tensor]:
        loc, cov_factor, cov_diag = args
        scale = cov_diag.sqrt()
        return {n: transform_to(c).inv(v)
                for n, c, v in zip(self.param_names, self.constraints,
                                   (loc, scale, cov_factor / scale.unsqueeze(-1)), strict=True)}

    def rotation_gauge(self, family: ExponentialFamily) -> str | None:
        """P, where unconstrained: diag(s)·PR = WR."""
        return self.param_names[2] if is_real(self.constraints[2]) else None


@dataclass
class Site:
    """One latent sample site of the guide, as read on the latest trace."""

    name: str
    fn: Distribution  # the distribution as traced (wrappers included), built from the leaves
    base: Distribution  # with Independent/Expanded/Masked wrappers removed
    family: ExponentialFamily | None
    multiplicity: float  # copies of each base element × the site's ELBO scale
    scale: float  # the site's ELBO scale (subsampling, poutine.scale)
    param_names: tuple[str, ...]  # unconstrained leaves the distribution depends on
    parameterization: Parameterization | None = None


@dataclass
class Group:
    """Sites that share params: their Fisher metric couples them, so they step together."""

    sites: list[Site]
    param_names: tuple[str, ...]

    @property
    def natural(self) -> bool:
        """True when the group can step in natural parameters (mirror descent)."""
        return (len(self.sites) == 1 and self.sites[0].parameterization is not None
                and self.sites[0].family is not None and self.sites[0].family.full_rank)


class GuideReader:
    """Finds the guide's latent sites and the param leaves behind each of them.

    An ``nn.Module`` guide gets a forward pre-hook and a forward hook, :func:`_record_call` and
    :func:`_end_call`, module-level functions that keep the arguments of the guide's last call and
    the subsample indices its plates drew in it in a weak-keyed map, so neither the guide nor the
    reader holds a trace or a tensor of the graph: both can be pickled, ``torch.save``-d and
    deep-copied after any step (the caches ``last_trace`` and the dependency structure are
    dropped, and rebuilt on the next :meth:`read`). The re-run replays those indices: the sites
    read are the subsample the ELBO's gradient came from.
    """

    def __init__(self, guide: Callable):
        self.guide = guide
        self.last_trace: poutine.Trace | None = None
        self.reused = False  # the latest read returned the previous read's groups
        self._warned = False  # the warning of several batches per step was given
        self._warned_implicit = False  # the warning of an implicit part (AutoStructured) too
        self._structure: dict[tuple, tuple] = {}
        # (fingerprint, groups, the recorded call and the leaves: held so that no identity in
        # the fingerprint is reused)
        self._last_read: tuple[tuple, list[Group], Any, tuple] | None = None
        if not isinstance(guide, torch.nn.Module) and not hasattr(guide, "last_call"):
            _check_runs_without_arguments(guide)
        if isinstance(guide, torch.nn.Module) and not any(
                hook is _record_call for hook in guide._forward_pre_hooks.values()):
            guide.register_forward_pre_hook(_record_call, with_kwargs=True)
        if isinstance(guide, torch.nn.Module) and not any(
                hook is _end_call for hook in guide._forward_hooks.values()):
            guide.register_forward_hook(_end_call, with_kwargs=True, always_call=True)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "last_trace": None, "_structure": {}, "_last_read": None,
                "reused": False}

    def _recorded(self) -> tuple[tuple, dict, dict[str, Tensor]] | None:
        """(args, kwargs, subsample indices by plate) of the guide's last call, if recorded."""
        if isinstance(self.guide, torch.nn.Module):
            return _LAST_CALLS.get(self.guide)
        return getattr(self.guide, "last_call", None)

    def trace(self, replay: poutine.Trace | None = None) -> poutine.Trace:
        """Runs the guide on its last arguments; the global RNG state is left as it was.
        With ``replay``, every sample site takes its value from that trace (so a site that
        depends on an earlier site's sample is built at the same value); without, Pyro's
        validation of distribution arguments is off (the params are the ones SVI just ran)."""
        recorded = self._recorded()
        args, kwargs, drawn = recorded if recorded is not None else ((), {}, {})
        if replay is None:
            self._check_batches(_BATCHES.pop(self.guide, []))
        guide = (_SubsampleReplay(drawn)(self.guide) if replay is None
                 else poutine.replay(self.guide, trace=replay))
        # the current params' distributions were validated by the ELBO pass that gave the
        # gradients: their read skips Pyro's argument checks (a d×d pass or more per site);
        # a replay builds the guide at a candidate, which is checked
        validation = pyro.validation_enabled(False) if replay is None else nullcontext()
        with torch.random.fork_rng(devices=_devices()), torch.enable_grad(), validation:
            try:
                trace = poutine.trace(guide).get_trace(*args, **kwargs)
            except TypeError as e:
                if recorded is not None:
                    raise
                if isinstance(self.guide, torch.nn.Module):
                    raise ValueError(
                        f"the optimizer's guide {_name(self.guide)} (object at "
                        f"{id(self.guide):#x}) has not been called since the optimizer was "
                        "built and cannot run without arguments, so it is not the guide SVI "
                        "runs (a rebuilt copy, or the model); the optimizer needs the same guide "
                        "object as SVI: `SVI(model, guide, NaturalGradient(guide), loss)`") from e
                raise TypeError(
                    f"could not re-run {_name(self.guide)} without arguments: the optimizer "
                    "re-runs its guide on the arguments of the guide's last call, which it "
                    "records for nn.Module guides (every AutoGuide and PyroModule) and for "
                    "plain functions wrapped once with `guide = pyro_natgrad.record_args(guide)` "
                    "(then pass the wrapped guide to SVI and to the optimizer); if this is the "
                    "model, build the optimizer on the guide") from e
            finally:
                _BATCHES.pop(self.guide, None)  # this run's own (replayed) batch
        if replay is None:
            self.last_trace = trace
        return trace

    def _check_batches(self, batches: list[dict[str, Tensor]]) -> None:
        """Warns (once) when the guide's calls since the last read drew different batches: the
        gradient then sums several batches' terms, and the read sees the last one only."""
        if self._warned or len(batches) < 2:  # kept only where they differ
            return
        self._warned = True
        warnings.warn(
            f"guide {_name(self.guide)} drew different subsamples of plate(s) "
            f"{sorted(batches[-1])} since the optimizer last read it (unvectorized particles "
            "each draw their own batch): the gradient sums their terms, but the step reads the "
            "last batch only (the other batches' locals are left out of a mirror step, or "
            "stepped without their curvature in a parameter-space one); use "
            "Trace_ELBO(num_particles=..., vectorize_particles=True), or one particle",
            UserWarning, stacklevel=4)

    def read(self, leaves: dict[str, Tensor], *, reuse: bool = False) -> list[Group]:
        """Latent sites grouped by shared params; ``leaves`` are the params being optimized. A
        leaf with ``requires_grad=False`` (frozen) is no site's param: it is not stepped.

        ``reuse``: for a Pyro AutoGuide (not an ``AutoGuideList``, which may hold any callable),
        whose sites, families and plates are fixed by its prototype, the previous read's groups
        are returned without running the guide when nothing they were read from has changed
        (:meth:`_fingerprint`: the same argument objects, not modified in place, the same leaf
        tensors, and the same Pyro handlers around the call); ``reused`` says so. Their
        structure (names, families, parameterizations, multiplicities) holds, but each site's
        ``fn`` and ``base`` and ``last_trace`` are those of the previous read, built at its param
        values: a caller that reads distributions must read again without ``reuse``."""
        key = self._fingerprint(leaves) if reuse else None
        self.reused = key is not None and self._last_read is not None and self._last_read[0] == key
        if self.reused:
            return self._last_read[1]
        groups = self._read(leaves)
        self._last_read = (None if key is None else
                           (key, groups, self._recorded(), tuple(leaves.values())))
        return groups

    def _fingerprint(self, leaves: dict[str, Tensor]) -> tuple | None:
        """What a read of an AutoGuide depends on besides param values, comparable with ``==``:
        the recorded arguments (objects by identity, tensors also by their in-place version
        counter and shape, containers by content), every leaf (name, identity, shape,
        ``requires_grad``) and the identities of the Pyro handlers active around the call.
        None for other guides."""
        if not isinstance(self.guide, AutoGuide) or isinstance(self.guide, AutoGuideList):
            return None
        recorded = self._recorded()
        if recorded is None:
            return None
        handlers = tuple(id(h) for h in _PYRO_STACK)
        params = tuple((n, id(p), tuple(p.shape), p.requires_grad) for n, p in leaves.items())
        return _signature(recorded), params, handlers

    def _read(self, leaves: dict[str, Tensor]) -> list[Group]:
        frozen = [n for n, p in leaves.items() if not p.requires_grad]
        leaves = {n: p for n, p in leaves.items() if p.requires_grad}
        trace = self.trace()
        sites, deltas = [], []
        for name, node in trace.nodes.items():
            if node["type"] != "sample" or node["is_observed"]:
                continue
            fn = node["fn"]
            try:
                base, copies = unwrap(fn)
                if node.get("mask") is not None:  # poutine.mask: the ELBO masks log q with it
                    copies *= mask_multiplicity(node["mask"])
            except ValueError as e:
                raise ValueError(
                    f"guide site {name!r}: {e}; split the site so that each part's mask is one "
                    "value (the elements kept at one sample site, in the model and the guide, "
                    "the masked-out ones at another or at none), or fit this guide with a plain "
                    "Pyro optimizer such as pyro.optim.Adam") from e
            if type(base).__name__ == "Delta":
                deltas.append(name)
                continue
            site_scale = node.get("scale", 1.0)
            site_scale = float(site_scale) if not isinstance(site_scale, Tensor) else float(
                site_scale.mean())
            site = self._site(name, fn, base, copies, site_scale, leaves,
                              _batch(trace, node))
            if site is not None:
                sites.append(site)
        implicit = _implicit(trace, deltas, {s.name for s in sites})
        if not sites:
            raise ValueError(
                implicit + ", so a geometric optimizer cannot step it; use AutoNormal, "
                "AutoMultivariateNormal or AutoLowRankMultivariateNormal, or a plain Pyro "
                "optimizer such as pyro.optim.Adam" if implicit
                else self._nothing_to_step(trace, leaves, frozen))
        if implicit and not self._warned_implicit:
            self._warned_implicit = True
            warnings.warn(implicit + ", so its params are stepped by the base optimizer",
                          stacklevel=5)
        return _group(sites)

    def _nothing_to_step(self, trace: poutine.Trace, leaves: dict[str, Tensor],
                         frozen: list[str]) -> str:
        """Why a guide read gave no site to step: the model passed as the guide, a guide whose
        params are not the ones SVI optimizes (another object), or a guide without any."""
        observed = [n for n, node in trace.nodes.items()
                    if node["type"] == "sample" and node["is_observed"]]
        own = [n for n, node in trace.nodes.items() if node["type"] == "param"]
        if observed:
            return (f"{_name(self.guide)} has observed sample site(s) {observed[:3]} and no "
                    "latent site built from params: it looks like the model; build the "
                    "optimizer on the guide SVI runs: `SVI(model, guide, NaturalGradient(guide), "
                    "loss)`")
        if own and not set(own) & set(leaves) and set(own) & set(frozen):
            return (f"every param of guide {_name(self.guide)} that SVI optimizes is frozen "
                    f"(requires_grad=False: {sorted(set(own) & set(frozen))[:4]}), so a "
                    "geometric optimizer has nothing to step; unfreeze one, or use a plain Pyro "
                    "optimizer such as pyro.optim.Adam for the remaining params")
        if own and not set(own) & set(leaves):
            return (f"the params SVI optimizes ({sorted(leaves)[:4]}) include none of guide "
                    f"{_name(self.guide)}'s ({own[:4]}): the optimizer needs the same guide "
                    "object as SVI: `SVI(model, guide, NaturalGradient(guide), loss)`")
        return (f"guide {_name(self.guide)} has no latent sample site whose distribution depends "
                "on a continuous param (point masses such as AutoDelta's are not "
                "distributions), so a geometric optimizer has nothing to precondition; use a "
                "plain Pyro optimizer such as pyro.optim.Adam")

    def _site(self, name: str, fn: Distribution, base: Distribution, copies: float,
              scale: float, leaves: dict[str, Tensor], batch: Tensor | None) -> Site | None:
        family = family_of(base)
        key = (name, type(base), tuple(sorted(leaves)), batch is None)
        if key not in self._structure:
            self._structure[key] = self._dependencies(name, fn, base, family, leaves, batch)
        deps, param = self._structure[key]
        if not deps or copies * scale == 0:  # no params, or fully masked out: nothing to step
            return None
        if isinstance(param, Gathered):  # this read's batch, and the params to write it into
            param = replace(param, index=batch, leaves={n: leaves[n] for n in param.param_names})
        if family is not None and param is None:
            param = self._auto_parameterization(family, deps)
        return Site(name, fn, base, family, copies * scale, scale, deps, param)

    def _dependencies(self, name: str, fn: Distribution, base: Distribution,
                      family: ExponentialFamily | None, leaves: dict[str, Tensor],
                      batch: Tensor | None = None):
        names = list(leaves)
        store = pyro.get_param_store()
        if family is not None:
            outputs = [a for a in family.args(base) if isinstance(a, Tensor) and a.requires_grad]
        else:
            with torch.random.fork_rng(devices=_devices()):  # leave the global RNG as it was
                try:
                    log_q = log_density(name, fn, draw(fn)).sum()
                except ValueError:  # no log-density at a fresh draw: the samples tell
                    if not fn.has_rsample:
                        raise
                    log_q = None
                sample = fn.rsample() if fn.has_rsample else None
                # a log-density that drops the graph still has params if its samples depend on
                # them: keep the site, so the metric that needs the log-density can name it
                outputs = [log_q if log_q is not None and (log_q.requires_grad or sample is None)
                           else sample]
            outputs = [o for o in outputs if o.requires_grad]
        if not outputs:
            return (), None
        # a non-constant cotangent: Σ o would have a zero gradient for outputs that always sum to
        # a constant (a Categorical's probs on the simplex)
        grads = [torch.autograd.grad(o, [leaves[n] for n in names], _ramp(o), allow_unused=True,
                                     retain_graph=True) for o in outputs]
        deps = tuple(n for i, n in enumerate(names) if any(_touches(g[i]) for g in grads))
        if family is None and outputs[0] is log_q and sample is not None and sample.requires_grad:
            moved = torch.autograd.grad(sample, [leaves[n] for n in names], _ramp(sample),
                                        allow_unused=True, retain_graph=True)
            missing = [n for n, g in zip(names, moved, strict=True) if _touches(g)
                       and n not in deps]
            if missing:
                raise ValueError(
                    f"guide site {name!r}: log_prob of {type(fn).__name__} does not depend on "
                    f"param(s) {missing}, although its samples do, so the score ∇θ log q(z) "
                    "misses them; build its log-density from the params with differentiable "
                    "torch operations")
        if family is None or len(outputs) != len(family.arg_names):
            return deps, None
        # Direct: each argument depends on exactly one leaf and equals its constrained value
        # (Gathered: its entries at the site's subsample, along one axis, the same for all).
        # Direct is identified by the argument's value and its derivative (a value alone can
        # coincide: chol(I) = I); a MultivariateNormal's scale_tril may instead be the factor of
        # a param read as a covariance or a precision (CholeskyOf).
        direct, form = [], None
        for i, (arg, g) in enumerate(zip(family.args(base), grads, strict=True)):
            own = [(n, g[j]) for j, n in enumerate(names) if _touches(g[j])]
            if len(own) != 1:
                return deps, None
            (leaf_name, vjp), = own
            constraint = store._constraints[leaf_name]
            value = transform_to(constraint)(leaves[leaf_name]).detach()
            dim = None if value.shape == arg.shape else _gathered_axis(value, arg.detach(), batch)
            if dim is None:
                forms = ((None, False, True) if family.name == "MultivariateNormal" and i == 1
                         else (None,))
                found = next((f for f in forms
                              if _reads(leaves[leaf_name], constraint, f, arg.detach(), vjp)),
                             "none")
                if found == "none":
                    return deps, None
                if found is not None:
                    form = found
            direct.append((leaf_name, constraint, dim))
        if len({n for n, _, _ in direct}) != len(direct):
            return deps, None
        names_, constraints_, dims = zip(*direct, strict=True)
        if form is not None:
            return deps, (CholeskyOf(tuple(names_), tuple(constraints_), form)
                          if all(d is None for d in dims) else None)
        if all(d is None for d in dims):
            return deps, Direct(tuple(names_), tuple(constraints_))
        if any(d is None for d in dims):
            return deps, None
        return deps, Gathered(tuple(names_), tuple(constraints_), tuple(dims))

    def _auto_parameterization(self, family: ExponentialFamily,
                               deps: tuple[str, ...]) -> Parameterization | None:
        """The parameterization of an AutoGuide whose map from params to arguments is known
        (:data:`_AUTO_GUIDES`), when the site's family and params are the guide's own."""
        for guide_class, (family_name, roles, kind) in _AUTO_GUIDES.items():
            if not isinstance(self.guide, guide_class):
                continue
            names = tuple(self.guide._pyro_get_fullname(n) for n in roles)
            if family.name != family_name or set(names) != set(deps):
                return None
            store = pyro.get_param_store()
            return kind(names, tuple(store._constraints[n] for n in names))
        return None


# AutoGuides read with their own parameterization: (family, the params' roles, the map)
_AUTO_GUIDES: dict[type, tuple[str, tuple[str, ...], type[Parameterization]]] = {
    AutoMultivariateNormal: ("MultivariateNormal", ("loc", "scale", "scale_tril"),
                             ScaledUnitCholesky),
    AutoLowRankMultivariateNormal: ("LowRankMultivariateNormal", ("loc", "scale", "cov_factor"),
                                    ScaledLowRank),
}

# per guide: its last call's (args, kwargs, indices by plate); the differing batches drawn since
# the reader's last run; and, during a module guide's call, its recorder and arguments
_LAST_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RECORDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _SubsampleRecorder(Messenger):
    """Keeps the indices each subsampling plate draws inside it, by plate name."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, Tensor] = {}

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and isinstance(msg["fn"], _Subsample):
            self.values[msg["name"]] = msg["value"]


class _SubsampleReplay(Messenger):
    """Gives each subsampling plate named in ``values`` those indices instead of a new draw."""

    def __init__(self, values: dict[str, Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: dict) -> None:
        if isinstance(msg["fn"], _Subsample) and msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True


def _record_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """The forward pre-hook of an ``nn.Module`` guide: starts recording the call's subsample
    indices (:func:`_end_call` keeps them with the call's arguments; module-level functions and
    weak-keyed maps, so the guide stays picklable)."""
    recorder = _SubsampleRecorder()
    recorder.__enter__()
    _RECORDERS[module] = (recorder, args, kwargs)


def _end_call(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """The forward hook (run also when the call raised): the arguments and subsample indices of
    the guide's last call, kept in a weak-keyed map."""
    recorder, args, kwargs = _RECORDERS.pop(module)
    if _PYRO_STACK and _PYRO_STACK[-1] is recorder:
        recorder.__exit__(None, None, None)
    else:  # the call raised past handlers it entered: remove the recorder and what is above it
        recorder.__exit__(RuntimeError, None, None)
    _LAST_CALLS[module] = (args, kwargs, recorder.values)
    _keep_batch(module, recorder.values)


def _keep_batch(guide: Callable, drawn: dict[str, Tensor]) -> None:
    """Keeps a call's subsample indices where they differ from the last kept since the reader
    last ran the guide (at most two: whether several batches were drawn is all that is read,
    and a guide called many times between steps, by ``Predictive``, holds no more)."""
    if not drawn:
        return
    kept = _BATCHES.setdefault(guide, [])
    if not kept or not _same_batch(kept[-1], drawn):
        kept.append(drawn)
        del kept[:-2]


def _same_batch(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def named_params(params: Iterable[Tensor]) -> list[tuple[str | None, Tensor]]:
    """Each param with its name in Pyro's param store (None if it is not there). A tensor the
    store holds under several names takes the greatest of them: an AutoNormalizingFlow keeps its
    first weight also as ``_prototype_tensor``, and which name ``store.param_name`` returns
    depends on the order they were registered in, which unpickling changes; optimizer state is
    keyed by the name (and ranks agree by it), so the name must depend on the names alone. (The
    greatest is the weight's own name, the one a guide built in this process reports.)"""
    store = pyro.get_param_store()
    greatest: dict[int, str] = {}
    for name, p in store.named_parameters():
        if id(p) not in greatest or name > greatest[id(p)]:
            greatest[id(p)] = name
    return [(greatest.get(id(p)), p) for p in params]


def is_real(constraint: constraints.Constraint) -> bool:
    """The constraint is the real line (or independent reals): its transform is the identity."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return _is(constraint, constraints.real)


def is_unit_lower_cholesky(constraint: constraints.Constraint) -> bool:
    """The constraint is Pyro's ``unit_lower_cholesky``: its transform is x ↦ tril(x, −1) + I."""
    return _is(constraint, constraints.unit_lower_cholesky)


def _is(constraint: constraints.Constraint, singleton: constraints.Constraint) -> bool:
    """``constraint`` is the parameterless ``singleton``, compared by class: a pickled, deep-copied
    or ``torch.load``-ed guide holds a new instance of it (``is`` would tell them apart, and an
    unpickled guide would take other code paths, with other round-off, than the original)."""
    return type(constraint) is type(singleton)


def _batch(trace: poutine.Trace, node: dict) -> Tensor | None:
    """The indices of the one subsampling plate around a site (None for none, or several)."""
    frames = [f for f in node["cond_indep_stack"]
              if f.vectorized and f.full_size is not None and f.size != f.full_size]
    if len(frames) != 1 or frames[0].name not in trace.nodes:
        return None
    return trace.nodes[frames[0].name]["value"]


def _gathered_axis(value: Tensor, arg: Tensor, batch: Tensor | None) -> int | None:
    """The axis (negative) along which ``arg`` is ``value`` taken at ``batch``, exactly."""
    if batch is None or value.dim() != arg.dim():
        return None
    for axis in range(value.dim()):
        others = value.shape[:axis] + value.shape[axis + 1:]
        if (value.shape[axis] != arg.shape[axis] and arg.shape[axis] == len(batch)
                and others == arg.shape[:axis] + arg.shape[axis + 1:]
                and torch.equal(value.index_select(axis, batch), arg)):
            return axis - value.dim()
    return None


def _signature(value: Any) -> Any:
    """``value`` as a comparable key for :meth:`GuideReader._fingerprint`: a tensor by identity,
    in-place version and shape, a list, tuple or dict by its items, anything else by identity
    (the reader holds the objects of the read it keeps, so no identity in it is reused)."""
    if isinstance(value, Tensor):
        return "tensor", id(value), value._version, tuple(value.shape)
    if isinstance(value, list | tuple):
        return type(value).__name__, tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return "dict", tuple((k, _signature(v)) for k, v in value.items())
    return "object", id(value)


def _check_runs_without_arguments(guide: Callable) -> None:
    """Raises at once for a plain callable guide (a function, or a bound method such as a
    VAE's ``vae.guide``) that needs arguments: nothing records them, so it could not be re-run."""
    try:
        signature = inspect.signature(guide)
    except (TypeError, ValueError):  # no signature to read: found at the first re-run instead
        return
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                        p.KEYWORD_ONLY)]
    if required:
        raise TypeError(
            f"guide {_name(guide)} takes arguments ({', '.join(required)}) that the optimizer "
            "could not record: it re-runs the guide on the arguments of its last call, which it "
            "records for nn.Module guides (every AutoGuide and PyroModule) and for callables "
            "wrapped once with `guide = pyro_natgrad.record_args(guide)` (a function or a bound "
            "method such as `vae.guide`); pass the wrapped guide to SVI and to the optimizer; "
            "if this is the model, build the optimizer on the guide")


def _name(guide: Callable) -> str:
    return repr(getattr(guide, "__name__", type(guide).__name__))


def _devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_initialized() else []


def _ramp(output: Tensor) -> Tensor:
    """1, 2, …, n in the shape of ``output`` (a fixed cotangent, no random numbers drawn)."""
    return torch.arange(1, output.numel() + 1, dtype=output.dtype,
                        device=output.device).reshape(output.shape)


def _implicit(trace: poutine.Trace, deltas: list[str], read: set[str]) -> str:
    """Where latent sites are point masses whose values are built from auxiliary draws that are
    not distributions with params (AutoStructured: ``<site>_aux`` ~ N(0, 1) through the params'
    shears and scales), the statement that q is implicit there; else empty."""
    if not deltas:
        return ""
    auxiliary = {n for n, node in trace.nodes.items() if node["type"] == "sample"
                 and node["infer"].get("is_auxiliary") and n not in read}
    deltas = [n for n in deltas if f"{n}_aux" in auxiliary]  # AutoStructured's naming
    if not deltas:
        return ""
    return (f"guide site(s) {deltas[:4]} are point masses whose values are built from the "
            f"auxiliary draws {[f'{n}_aux' for n in deltas[:4]]} (as in AutoStructured): their "
            "q is implicit, not a distribution with params")


def _touches(grad: Tensor | None) -> bool:
    """A leaf feeds an output when the output's gradient w.r.t. it is not identically zero (a
    param stacked or indexed into the arguments gets an all-zero gradient for the others)."""
    return grad is not None and bool(grad.ne(0).any())


def _group(sites: list[Site]) -> list[Group]:
    """Union of sites that share any param (connected components)."""
    groups: list[Group] = []
    for site in sites:
        touching = [g for g in groups if set(g.param_names) & set(site.param_names)]
        merged_sites = [site] + [s for g in touching for s in g.sites]
        names = tuple(dict.fromkeys(n for s in merged_sites for n in s.param_names))
        groups = [g for g in groups if g not in touching] + [Group(merged_sites, names)]
    return groups
