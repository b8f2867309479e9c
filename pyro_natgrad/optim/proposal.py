"""What a direction hands the optimizer: a proposal ``rate -> Candidate`` for one group of sites."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from pyro import poutine
from torch import Tensor

from ..fisher.linalg import unflat

__all__ = ["Candidate", "Deferred", "Proposal", "linear_proposal"]


class Deferred(Mapping):
    """A candidate's values computed on first access by ``build`` (then kept): a candidate the
    trust region rejects by its KL alone never forms them (an exact step's new Cholesky factor is
    one O(d³) triangular solve)."""

    def __init__(self, build: Callable[[], dict[str, Tensor]]):
        self._build: Callable[[], dict[str, Tensor]] | None = build
        self._values: dict[str, Tensor] = {}

    def _get(self) -> dict[str, Tensor]:
        if self._build is not None:
            self._values, self._build = self._build(), None
        return self._values

    def __getitem__(self, name: str) -> Tensor:
        return self._get()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


@dataclass
class Candidate:
    """A proposed new value of a group's unconstrained params at a ``rate`` (``values``: a dict,
    or a :class:`Deferred` one).

    ``kl``: its KL from the current q (closed form for exact steps, the metric's quadratic model
    ½ rate² dᵀGd for linear ones); ``measure``: a better KL taken on the guide re-built at
    ``values`` (its trace), which replaces ``kl`` once ``kl`` fits the trust region;
    ``closed_form_kl``: that KL computed from ``values`` alone where the map from params to q
    is known, so that the guide is not re-built (it takes the place of ``measure``); ``anchor``:
    the mean the step was built at and the gradient ∇ₘL there (for momentum); ``note``: what a
    transform did to it; ``repaired``: a domain repair changed the step (it left the family's
    domain at this rate).
    """

    values: Mapping[str, Tensor]
    rate: float
    kl: float | None = None
    note: str = ""
    measure: Callable[[poutine.Trace], float] | None = None
    closed_form_kl: Callable[[Mapping[str, Tensor]], float] | None = None
    anchor: tuple[Tensor, Tensor] | None = None
    repaired: bool = False


@dataclass
class Proposal:
    """A group's step as a function of the rate, and how it is to be checked.

    ``exact``: the step is taken in a family's own coordinates, its domain and KL are checked as
    it is built, so the guide need not be re-built at the candidate. ``model_kl``: where the
    proposal has one, a model of a candidate's KL at a rate that costs no candidate (for
    :class:`~pyro_natgrad.optim.trust_region.KLAim`). ``max_rate``: every rate above it gives
    the candidate it gives (a linear step whose params are all capped below the rate), so no
    higher rate is tried.
    """

    method: str
    candidate: Callable[[float], Candidate | None]
    exact: bool
    model_kl: Callable[[float], float] | None = None
    max_rate: float = math.inf


def linear_proposal(method: str, names: tuple[str, ...], theta: list[Tensor], direction: Tensor,
                    curvature: float | Tensor, caps: list[float] | None = None) -> Proposal:
    """θ − rate·d, with the metric's quadratic model ½ rate² dᵀGd as its KL. With ``caps`` (one
    per param), param i moves min(rate, capᵢ)·dᵢ and ``curvature`` is the Gram matrix
    Mᵢⱼ = dᵢᵀGdⱼ of the params' blocks: KL model ½ wᵀMw, wᵢ = min(rate, capᵢ)."""
    current = [t.detach().clone() for t in theta]
    blocks = unflat(direction, current)

    def candidate(rate: float) -> Candidate:
        if caps is None:
            steps = [rate] * len(blocks)
            kl = 0.5 * rate ** 2 * float(curvature)
        else:
            steps = [min(rate, cap) for cap in caps]
            w = torch.tensor(steps, dtype=curvature.dtype, device=curvature.device)
            kl = 0.5 * float(w @ curvature @ w)
        values = {n: c - s * d for n, c, d, s in zip(names, current, blocks, steps, strict=True)}
        return Candidate(values, rate, kl)

    return Proposal(method, candidate, exact=False,
                    max_rate=math.inf if caps is None else max(caps))
