"""ArviZ view of a fitted guide: draws z ~ q as InferenceData, and the PSIS check that VI worked.

Both functions rest on one set of draws: z_s ~ q(z), and for each draw the model run on it, giving
log p(x, z_s), log q(z_s), the pointwise log-likelihoods log p(y_i | z_s) and replicated data
y_rep ~ p(y | z_s). The draws are taken in one vectorized pass (an outer ``pyro.plate`` left of
the model's plates, as ``pyro.infer.Predictive(parallel=True)`` does); a model or guide that
cannot run vectorized is drawn one sample at a time, with a warning. Everything runs under
``torch.no_grad`` and only reads the param store (an AutoGuide that was never called creates its
initial params on the first call, as it would in ``svi.step``).

A latent of the model that the guide does not sample (a discrete site hidden from an AutoGuide and
enumerated in ``TraceEnum_ELBO``) is summed out of log p(x, z) by enumeration, Σ_d p(x, z, d)
(Pyro's tensor contraction, as ``TraceEnum_ELBO`` does), and its draws are taken from its exact
conditional posterior d ~ p(d | z, x) (``infer_discrete``), so that (z, d) ~ q(z) p(d | z, x). A
hidden latent without finite support cannot be summed out: both functions refuse it by name.
The pointwise log-likelihood log p(y_i | z) sums it out observation by observation, which needs
it in exactly the observation's plates and no other observation depending on it (a mixture's
assignment); ``to_inference_data`` refuses any other by name. A plate that subsamples its data
(``subsample_size``) would give each draw another subsample: both functions refuse it by name.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer import infer_discrete
from pyro.infer.util import plate_log_prob_sum
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import prune_subsample_sites
from scipy.special import logsumexp

from . import _arviz_compat

_DRAW_PLATE = "_pyro_natgrad_draws"


def _is_observation(site: Message) -> bool:
    """Observed data: not a latent, a ``pyro.deterministic`` or a ``pyro.factor`` site."""
    infer = site["infer"] or {}
    return site["is_observed"] and not infer.get("_deterministic") and not infer.get("is_auxiliary")


def _is_latent(site: Message) -> bool:
    """What the posterior group holds: sampled latents and ``pyro.deterministic`` values."""
    return not site["is_observed"] or bool((site["infer"] or {}).get("_deterministic"))


def _sample_sites(trace: Trace, keep: Callable[[Message], bool]) -> dict[str, Message]:
    return {
        name: site for name, site in trace.nodes.items() if site["type"] == "sample" and keep(site)
    }


def _observed_mask(site: Message) -> torch.Tensor:
    """Which entries of an observation's log density count, in its shape: the mask of
    ``poutine.mask`` (``obs_mask``'s ``<name>_observed`` site too) and of ``Distribution.mask``."""
    log_prob = site["unscaled_log_prob"]
    keep = torch.ones(log_prob.shape, dtype=torch.bool, device=log_prob.device)
    fn_mask = site["fn"]._mask if isinstance(site["fn"], MaskedDistribution) else None
    for mask in (site["mask"], fn_mask):
        if mask is not None:
            keep = keep & torch.as_tensor(mask, dtype=torch.bool, device=log_prob.device)
    return keep


def _refuse_subsampling(*traces: Trace) -> None:
    """ValueError naming a plate that subsamples its data (each run draws another subsample)."""
    for trace in traces:
        for site in _sample_sites(trace, lambda site: True).values():
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.size != frame.full_size:
                    raise ValueError(
                        f"plate '{frame.name}' subsamples {frame.size} of its {frame.full_size} "
                        "entries: each draw would see another subsample, and the diagnostics "
                        "need the full data; run them without subsample_size"
                    )


class _NotPointwise(ValueError):
    """The draws do not give an observation's pointwise log-likelihood log p(y_i | z)."""


def _marginal_log_lik(
    joint_trace: Trace, hidden: frozenset[str], enum_dim: int
) -> dict[str, torch.Tensor]:
    """log p(y_i | z) of each observation that depends on a latent hidden from the guide, from an
    enumerated trace (enumeration dims from ``enum_dim`` leftwards): the latents it depends on
    (and theirs) summed out entry by entry. _NotPointwise naming them unless each lies in exactly
    the observation's plates and no other observation depends on it."""

    def enum_dims(site: Message) -> set[int]:
        log_prob = site["unscaled_log_prob"]
        return {d for d in range(-log_prob.dim(), enum_dim + 1) if log_prob.shape[d] > 1}

    def plates(site: Message) -> frozenset[str]:
        return frozenset(frame.name for frame in site["cond_indep_stack"] if frame.vectorized)

    latent = {name: joint_trace.nodes[name] for name in hidden}
    own = {name: cast(dict, site["infer"])["_enumerate_dim"] for name, site in latent.items()}
    observed = _sample_sites(joint_trace, _is_observation)
    marginals = {}
    for name, site in observed.items():
        dims, needed = enum_dims(site), set[str]()
        while new := {h for h in latent if own[h] in dims} - needed:
            needed |= new
            dims |= set().union(*(enum_dims(latent[h]) for h in new))
        if not needed:
            continue
        shared = [o for o in observed if o != name and enum_dims(observed[o]) & dims]
        if shared or any(plates(latent[h]) != plates(site) for h in needed):
            raise _NotPointwise(
                f"site '{name}' depends on {', '.join(repr(h) for h in sorted(needed))}, latent "
                "of the model that the guide does not sample: its pointwise log-likelihood "
                "log p(y_i | z) needs them summed out for each observation alone, which holds only "
                "for latents in exactly the observation's plates that no other observation "
                "depends on"
                + (f" (so does {', '.join(repr(o) for o in shared)})" if shared else "")
            )
        total = site["unscaled_log_prob"]
        for h in needed:
            total = total + latent[h]["unscaled_log_prob"]
        marginals[name] = total.logsumexp(tuple(range(-total.dim(), enum_dim + 1)))
    return marginals


class _RedrawObservations(UnconditionMessenger):
    """``poutine.uncondition`` for observations only: ``pyro.deterministic`` sites keep their
    computed values (re-drawing one from its Delta would stack a second draw axis)."""

    def _pyro_sample(self, msg: Message) -> None:
        if _is_observation(msg):
            super()._pyro_sample(msg)


def _traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    wrap: Callable[[Callable], Callable],
    hidden: frozenset[str] = frozenset(),
    enum_dim: int = -1,
) -> tuple[Trace, Trace, Trace, Trace]:
    """Guide trace (z ~ q); model trace replayed on it (observations as given, the ``hidden``
    latents drawn from p(d | z, x)); a model trace with every latent replayed from it and the
    observations re-drawn; and the trace whose log densities give log p(x, z) (with ``hidden``
    enumerated from ``enum_dim`` leftwards; the model trace itself when none is hidden). Joint
    traces have their log densities computed."""
    guide_trace = poutine.trace(wrap(guide)).get_trace(*args, **kwargs)
    replayed = poutine.replay(wrap(model), trace=guide_trace)
    joint_trace = None
    if hidden:
        replayed = poutine.infer_config(
            replayed, lambda msg: {"enumerate": "parallel"} if msg["name"] in hidden else {}
        )
        joint_trace = poutine.trace(poutine.enum(replayed, first_available_dim=enum_dim)).get_trace(
            *args, **kwargs
        )
        replayed = infer_discrete(replayed, first_available_dim=enum_dim)
    model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
    replicate = _RedrawObservations()(poutine.replay(wrap(model), trace=model_trace))
    predictive_trace = poutine.trace(replicate).get_trace(*args, **kwargs)
    traces = [
        prune_subsample_sites(t)
        for t in (guide_trace, model_trace, predictive_trace, joint_trace or model_trace)
    ]
    for trace in (traces[0], traces[1], traces[3]):
        trace.compute_log_prob()
    return traces[0], traces[1], traces[2], traces[3]


def _hidden_latents(guide_trace: Trace, model_trace: Trace) -> frozenset[str]:
    """Latent sites of the model that the guide does not sample; each must have finite support
    (to be enumerated), else ValueError naming it."""
    latent = _sample_sites(model_trace, lambda site: not site["is_observed"])
    hidden = {name: site for name, site in latent.items() if name not in guide_trace.nodes}
    for name, site in hidden.items():
        if not getattr(site["fn"], "has_enumerate_support", False):
            raise ValueError(
                f"site '{name}' is a latent of the model that the guide does not sample, and its "
                f"{type(site['fn']).__name__} distribution has no finite support to sum it out "
                "over: the guide must sample every latent without finite support"
            )
    return frozenset(hidden)


def _log_joint(trace: Trace, keep: str | None = None) -> torch.Tensor:
    """log p(x, z) from a packed model trace, its enumerated sites summed out (Pyro's
    ``contract_to_tensor``); every plate is summed but the one of symbol ``keep``."""
    factors: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
    for site in _sample_sites(trace, lambda site: True).values():
        ordinal = frozenset(
            trace.plate_to_symbol[frame.name]
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        )
        factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    enum_symbols = set(trace.symbol_to_dim) - set(trace.plate_to_symbol.values())
    return contract_to_tensor(
        factors, enum_symbols, target_ordinal=frozenset([keep] if keep else [])
    )


@dataclass(frozen=True)
class _Draws:
    """S draws z ~ q, each site in the model's own shape behind a leading draw axis."""

    latent: dict[str, torch.Tensor]  # (S, *site shape), the model's constrained space
    predictive: dict[str, torch.Tensor]  # (S, *obs shape): y_rep ~ p(y | z)
    log_lik: dict[str, torch.Tensor]  # (S, *obs batch shape): log p(y_i | z), unscaled
    mask: dict[str, torch.Tensor]  # (S, *obs batch shape): which entries are observations
    log_joint: torch.Tensor  # (S,): log p(x, z)
    log_q: torch.Tensor  # (S,): log q(z)

    @staticmethod
    def cat(parts: list[_Draws]) -> _Draws:
        def join(values: list) -> Any:
            if isinstance(values[0], dict):
                return {name: torch.cat([v[name] for v in values]) for name in values[0]}
            return torch.cat(values)

        return _Draws(**{f.name: join([getattr(p, f.name) for p in parts]) for f in fields(_Draws)})


def _collect(
    traces: tuple[Trace, Trace, Trace, Trace],
    prototype: Trace,
    num: int,
    log_joint: torch.Tensor,
    log_q: torch.Tensor,
    marginals: Mapping[str, torch.Tensor],
) -> _Draws:
    """Read ``num`` draws off the traces, reshaped to the sites' shapes in ``prototype`` (a model
    trace of one draw); ``marginals`` replace the observations' log densities where given. A
    tensor whose size is not ``num`` times the prototype's is an error."""
    _, model_trace, predictive_trace, _ = traces

    def take(name: str, tensor: Any, key: Literal["value", "unscaled_log_prob"]) -> torch.Tensor:
        shape = cast(torch.Tensor, prototype.nodes[name][key]).shape
        if tensor.numel() != num * shape.numel():
            raise ValueError(
                f"site '{name}': {key} of shape {tuple(tensor.shape)} for {num} draws "
                f"does not match shape {tuple(shape)} of one draw"
            )
        return tensor.reshape(num, *shape)

    def log_lik(name: str) -> torch.Tensor:
        log_prob = model_trace.nodes[name]["unscaled_log_prob"]
        if name in marginals:  # to the observation's shape, as its log density
            marginal = marginals[name]
            marginal = marginal.reshape(marginal.shape[max(marginal.dim() - log_prob.dim(), 0) :])
            log_prob = marginal.expand(log_prob.shape)
        return take(name, log_prob, "unscaled_log_prob")

    observed = _sample_sites(prototype, _is_observation)
    return _Draws(
        latent={
            name: take(name, model_trace.nodes[name]["value"], "value")
            for name in _sample_sites(prototype, _is_latent)
        },
        predictive={
            name: take(name, predictive_trace.nodes[name]["value"], "value") for name in observed
        },
        log_lik={name: log_lik(name) for name in observed},
        mask={
            name: take(name, _observed_mask(model_trace.nodes[name]), "unscaled_log_prob")
            for name in observed
        },
        log_joint=log_joint.reshape(num),
        log_q=log_q.reshape(num),
    )


def _max_plate_nesting(*traces: Trace) -> int:
    dims = [
        frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return -min(dims, default=0)


def _draw_vectorized(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    prototype: tuple[Trace, ...],
    hidden: frozenset[str],
    num_samples: int,
    pointwise: bool,
) -> _Draws:
    dim = -_max_plate_nesting(*prototype[:2]) - 1

    def wrap(fn):
        def vectorized(*args, **kwargs):
            with pyro.plate(_DRAW_PLATE, num_samples, dim=dim):
                return fn(*args, **kwargs)

        return vectorized

    traces = _traces(model, guide, args, kwargs, wrap, hidden, enum_dim=dim - 1)
    guide_trace, _, _, joint_trace = traces
    marginals = _marginal_log_lik(joint_trace, hidden, dim - 1) if pointwise and hidden else {}
    guide_trace.pack_tensors()
    joint_trace.pack_tensors(guide_trace.plate_to_symbol)
    symbol = guide_trace.plate_to_symbol[_DRAW_PLATE]
    return _collect(
        traces,
        prototype[1],
        num_samples,
        _log_joint(joint_trace, symbol),
        plate_log_prob_sum(guide_trace, symbol),
        marginals,
    )


def _draw_one(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    prototype: tuple[Trace, ...],
    hidden: frozenset[str],
    pointwise: bool,
) -> _Draws:
    enum_dim = -_max_plate_nesting(*prototype[:2]) - 1
    traces = _traces(model, guide, args, kwargs, lambda fn: fn, hidden, enum_dim)
    guide_trace, _, _, joint_trace = traces
    marginals = _marginal_log_lik(joint_trace, hidden, enum_dim) if pointwise and hidden else {}
    joint_trace.pack_tensors()
    return _collect(
        traces,
        prototype[1],
        1,
        _log_joint(joint_trace),
        torch.as_tensor(guide_trace.log_prob_sum()),
        marginals,
    )


def _reason(error: Exception, limit: int = 400) -> str:
    """An error on one line, less the table of trace shapes that Pyro appends, cut at ``limit``."""
    words = str(error).split("\nTrace Shapes:")[0].split()
    text = " ".join([f"{type(error).__name__}:", *words])
    return text if len(text) <= limit else text[: limit - 3] + "..."


@torch.no_grad()
def _draw(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    pointwise: bool = False,
) -> tuple[_Draws, Trace]:
    """``num_samples`` draws, and a model trace of one draw (site shapes, plates, observations).
    With ``pointwise``, the draws' ``log_lik`` is log p(y_i | z) with hidden latents summed out
    (else their log densities at the drawn hidden latents)."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    prototype = _traces(model, guide, args, kwargs, lambda fn: fn)
    _refuse_subsampling(*prototype[:2])
    hidden = _hidden_latents(*prototype[:2])
    try:
        draws = _draw_vectorized(
            model, guide, args, kwargs, prototype, hidden, num_samples, pointwise
        )
    except _NotPointwise:
        raise
    except Exception as error:  # whatever stops the vectorized pass, the loop may still work
        warnings.warn(
            f"model and guide could not be run vectorized over draws ({_reason(error)}); "
            f"drawing {num_samples} samples one at a time",
            stacklevel=3,
        )
        draws = _Draws.cat(
            [
                _draw_one(model, guide, args, kwargs, prototype, hidden, pointwise)
                for _ in range(num_samples)
            ]
        )
    return draws, prototype[1]


def _dim_names(name: str, site: Mapping[str, Any]) -> list[str]:
    """Axis names of a site's value: the plate's name for a plate's axis, else ``<site>_dim_<i>``
    (ArviZ's default). A ``pyro.deterministic`` value that is all event (Pyro's default
    ``event_dim``) has no batch axes: there a plate's dim, counted from the right of the value,
    is the plate's axis where its size is the plate's."""
    value = site["value"]
    names = [f"{name}_dim_{i}" for i in range(value.dim())]
    batch_dims = value.dim() - len(site["fn"].event_shape)
    all_event = batch_dims == 0 and bool((site["infer"] or {}).get("_deterministic"))
    for frame in site["cond_indep_stack"]:
        if not frame.vectorized:
            continue
        if 0 <= batch_dims + frame.dim:
            names[batch_dims + frame.dim] = frame.name
        elif all_event and -value.dim() <= frame.dim and value.shape[frame.dim] == frame.size:
            names[frame.dim] = frame.name
    return names


def _tensor_arguments(model: Callable, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The model's tensor arguments by parameter name (``arg_<i>`` where the signature does not
    tell)."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        signature = inspect.signature(fn)
        bound = signature.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {**{f"arg_{i}": a for i, a in enumerate(args)}, **kwargs}
        signature = None
    named = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind if signature else None
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named.update({f"{name}_{i}": v for i, v in enumerate(value)})
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return {name: value for name, value in named.items() if torch.is_tensor(value)}


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _observed_entries(name: str, mask: torch.Tensor) -> np.ndarray | None:
    """Which entries of an observation (S, *batch shape) count, the same in every draw; None
    where all do. ValueError naming the site where they differ between draws."""
    if mask.all():
        return None
    if not (mask == mask[:1]).all():
        raise ValueError(
            f"site '{name}': which of its entries are masked differs between draws (the mask "
            "depends on a latent), so it has no pointwise log-likelihood"
        )
    return _numpy(mask[0])


def to_inference_data(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 1000, **kwargs: Any
) -> Any:
    """ArviZ InferenceData (a DataTree under ArviZ 1.x) of ``num_samples`` ≥ 2 draws z ~ q, one
    chain.

    Groups: ``posterior`` (every latent site of the model, and ``pyro.deterministic`` sites, in the
    model's constrained space and the model's shapes), ``posterior_predictive`` (each observed site
    re-drawn, y_rep ~ p(y | z)), ``log_likelihood`` (log p(y_i | z) per observation, unscaled, for
    ``az.loo``; Vehtari, Gelman & Gabry 2017), ``observed_data`` and ``constant_data`` (the model's
    tensor arguments, less those passed as observations). An axis that a vectorized
    ``pyro.plate`` indexes is named after the plate. ``args``/``kwargs`` go to model and guide.

    Masked observations (``poutine.mask``, ``obs_mask``, ``Distribution.mask``) are not
    observations: a site with masked entries keeps only its unmasked ones in
    ``posterior_predictive``, ``log_likelihood`` and ``observed_data``, along one axis
    ``<site>_unmasked`` labelled by their flat index in the site's batch shape (the row, for one
    plate); a site masked entirely is left out. A mask that differs between draws is refused.
    A latent hidden from the guide (module docstring) is summed out of log p(y_i | z); one that
    does not lie in exactly the observation's plates, or that another observation also depends
    on, is refused, as is a subsampled plate.
    """
    draws, prototype = _draw(model, guide, args, kwargs, num_samples, pointwise=True)
    observed = _sample_sites(prototype, _is_observation)
    named = {**_sample_sites(prototype, _is_latent), **observed}
    dims = {name: _dim_names(name, site) for name, site in named.items()}
    observed_ids = {id(site["value"]) for site in observed.values()}
    groups = {
        "posterior": {name: _numpy(v)[None] for name, v in draws.latent.items()},
        "posterior_predictive": {name: _numpy(v)[None] for name, v in draws.predictive.items()},
        "log_likelihood": {name: _numpy(v)[None] for name, v in draws.log_lik.items()},
        "observed_data": {name: _numpy(site["value"]) for name, site in observed.items()},
        "constant_data": {
            name: _numpy(v)
            for name, v in _tensor_arguments(model, args, kwargs).items()
            if id(v) not in observed_ids
        },
    }
    coords = {}
    for name, mask in draws.mask.items():
        keep = _observed_entries(name, mask)
        if keep is None:
            continue
        for group, lead in (
            ("posterior_predictive", 2),
            ("log_likelihood", 2),
            ("observed_data", 0),
        ):
            if keep.any():  # index the batch axes, after (chain, draw) in the sample groups
                groups[group][name] = groups[group][name][(slice(None),) * lead + (keep,)]
            else:  # masked entirely: not an observation
                del groups[group][name]
        dims[name] = [f"{name}_unmasked", *dims[name][keep.ndim :]]
        coords[f"{name}_unmasked"] = np.flatnonzero(keep)
    return _arviz_compat.from_dict({g: v for g, v in groups.items() if v}, dims=dims, coords=coords)


_K_GOOD, _K_OK = 0.5, 0.7


@dataclass(frozen=True)
class VIDiagnostics:
    """Pareto-smoothed importance sampling check of a guide q against the posterior p(z | x).

    Yao, Vehtari, Simpson & Gelman (2018), "Yes, but did it work?: Evaluating variational
    inference", ICML: with log ratios r_s = log p(x, z_s) − log q(z_s), z_s ~ q, the Pareto shape
    k̂ fitted to the largest ratios says how far q is from the posterior: k̂ ≤ 0.5 good, k̂ ≤ 0.7
    usable with importance weighting, else unreliable. ``means`` are the self-normalized PSIS
    estimates Σ_s w̃_s z_s, withheld above k̂ = 0.7 (Vehtari, Simpson, Gelman, Yao & Gabry 2024,
    §3: the estimate then needs impractically many draws); ``ess`` = 1 / Σ_s w̃_s² (Kong 1992) of
    the normalized smoothed weights. Latents the guide does not sample are summed out of p(x, z)
    and drawn from p(d | z, x) (module docstring).

    k̂ = −∞ says the weights are bounded and there is no Pareto tail to fit: the ratios are flat,
    or their largest values are tied and every latent has a finite support, so the ratios take
    finitely many values (a discrete guide); the ESS then says how efficient the weights are.
    k̂ = NaN: the largest ratios are tied but a support is infinite (no fit, and no bound known).
    """

    pareto_k: float
    ess: float
    log_ratios: np.ndarray  # (S,) raw log p(x, z_s) − log q(z_s)
    log_weights: np.ndarray  # (S,) Pareto-smoothed, normalized: log w̃_s
    guide_means: dict[str, np.ndarray]  # plain means of the same draws
    _weighted_means: dict[str, np.ndarray] = field(repr=False)

    @property
    def num_samples(self) -> int:
        return len(self.log_ratios)

    @property
    def verdict(self) -> str:
        """ "good" (k̂ ≤ 0.5), "ok" (k̂ ≤ 0.7) or "unreliable" (larger, or NaN: no tail fit)."""
        if self.pareto_k <= _K_GOOD:
            return "good"
        return "ok" if self.pareto_k <= _K_OK else "unreliable"

    @property
    def means(self) -> dict[str, np.ndarray]:
        """PSIS-weighted posterior means per latent site; ValueError when the verdict is
        "unreliable"."""
        if self.verdict == "unreliable":
            raise ValueError(
                f"PSIS-weighted means withheld: Pareto k-hat = {self.pareto_k:.3g} "
                f"is above {_K_OK}, where importance weighting does not correct the "
                "guide; guide_means are the guide's own"
            )
        return self._weighted_means

    @property
    def log_evidence(self) -> float:
        """Importance-sampling estimate log (1/S Σ_s exp r_s) of log p(x) (raw ratios)."""
        return float(logsumexp(self.log_ratios) - np.log(self.num_samples))

    def __str__(self) -> str:
        meaning = {
            "good": "q is close to the posterior",
            "ok": "usable, better with the PSIS-weighted estimates below",
            "unreliable": "q is far from the posterior; do not trust its estimates",
        }
        if self.pareto_k == -np.inf:
            meaning["good"] = "bounded weights, no Pareto tail to fit; the ESS says how efficient"
        if np.isnan(self.pareto_k):
            meaning["unreliable"] = (
                "no Pareto fit to the largest ratios, which are tied, and no bound on the "
                "weights: a latent's support is infinite"
            )
        lines = [
            f"VI diagnostics: PSIS on {self.num_samples} draws from the guide",
            f"  Pareto k-hat = {self.pareto_k:.3f}: {self.verdict} ({meaning[self.verdict]})",
            f"  ESS of the importance weights = {self.ess:.1f} "
            f"({100 * self.ess / self.num_samples:.0f}% of the draws)",
            f"  log evidence (IS estimate) = {self.log_evidence:.4g}",
        ]

        def show(array: np.ndarray) -> str:
            return np.array2string(array, precision=4, threshold=8, edgeitems=3)

        if self.verdict == "unreliable":
            lines.append(
                f"  posterior means under the guide (PSIS-weighted withheld: k-hat not <= {_K_OK}):"
            )
            lines += [f"    {name}: {show(mean)}" for name, mean in self.guide_means.items()]
        else:
            lines.append("  posterior means, guide -> PSIS-weighted:")
            lines += [
                f"    {name}: {show(self.guide_means[name])} -> {show(mean)}"
                for name, mean in self.means.items()
            ]
        return "\n".join(lines)


def _is_discrete(fn: Any) -> bool:
    try:
        return bool(fn.support.is_discrete)
    except NotImplementedError:  # a dependent support that does not say
        return False


def vi_diagnostics(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 1000, **kwargs: Any
) -> VIDiagnostics:
    """PSIS diagnostic of ``guide`` for ``model`` (see :class:`VIDiagnostics`) from
    ``num_samples`` draws z ~ q; draws are independent, so the relative efficiency r_eff = 1.
    A continuous latent whose draws are all equal (a point-mass guide such as AutoDelta, which
    has no density against p(x, z)) is refused by name."""
    draws, prototype = _draw(model, guide, args, kwargs, num_samples)
    latent_sites = _sample_sites(prototype, lambda site: not site["is_observed"])
    for name, site in latent_sites.items():
        value = draws.latent[name]
        if not _is_discrete(site["fn"]) and (value == value[0]).all():
            raise ValueError(
                f"all {num_samples} draws of site '{name}' are equal: a point-mass "
                "guide (such as AutoDelta) has no density to weigh against p(x, z)"
            )
    log_ratios = _numpy(draws.log_joint - draws.log_q).astype(np.float64)
    if not np.isfinite(log_ratios).all():
        bad = int((~np.isfinite(log_ratios)).sum())
        raise ValueError(
            f"{bad} of {num_samples} draws from the guide have a non-finite "
            "log p(x, z) - log q(z): the guide puts mass where the model has none, "
            "or the model's log density is not a number there"
        )
    log_weights, k_hat = _arviz_compat.psislw(log_ratios)
    finite = all(getattr(s["fn"], "has_enumerate_support", False) for s in latent_sites.values())
    if np.isnan(k_hat) and finite:  # a tied tail of finitely many ratio values: bounded weights
        k_hat = -np.inf
    weights = np.exp(log_weights)
    latent = {name: _numpy(v).astype(np.float64) for name, v in draws.latent.items()}
    return VIDiagnostics(
        pareto_k=k_hat,
        ess=float(1.0 / np.sum(weights**2)),
        log_ratios=log_ratios,
        log_weights=log_weights,
        guide_means={name: v.mean(0) for name, v in latent.items()},
        _weighted_means={name: np.tensordot(weights, v, axes=1) for name, v in latent.items()},
    )
