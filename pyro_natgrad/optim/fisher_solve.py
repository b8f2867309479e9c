"""The parameter-space natural-gradient direction, θ ← θ − ρ (F + λI)⁻¹ ∇θL (the seed's Theorem
3.1), with F the closed-form Fisher pulled back through the guide (exponential-family sites, any
parameterization) or a Monte Carlo estimate E_q[∇log q ∇log qᵀ] (any other distribution)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from pyro import poutine
from torch import Tensor

from ..families import unwrap
from ..families.multivariate_normal import scaled_low_rank_kl
from ..fisher.closed_form import PulledBackFisher
from ..fisher.linalg import flat, solve_metric
from ..fisher.low_rank import ScaledLowRankFisher
from ..fisher.monte_carlo import MonteCarloFisher
from ..guides import Group
from ..pullback import scaled_low_rank_coordinates
from .mirror import float64, kl64
from .options import require_counts, require_numbers
from .proposal import Candidate, Proposal, linear_proposal
from .transforms import GaugeProjection, VarianceAdaptation

__all__ = ["FisherSolve", "FisherAverage"]

Form = Literal["dense", "diag", "cg"]
_FORMS = ("dense", "diag", "cg")
_DEFAULT_DRAWS = 64  # Monte Carlo Fisher draws per site of a large group


@dataclass
class FisherAverage:
    """A running average of a group's dense or diagonal Fisher across steps,
    G ← decay·G_prev + (1 − decay)·G (for a noisy Monte Carlo F̂)."""

    decay: float = 0.9
    matrices: dict[tuple[str, ...], Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"FisherAverage decay must be in [0, 1), got {self.decay!r}")

    def __call__(self, key: tuple[str, ...], matrix: Tensor) -> Tensor:
        previous = self.matrices.get(key)
        if previous is not None and previous.shape == matrix.shape:
            matrix = self.decay * previous + (1 - self.decay) * matrix
        self.matrices[key] = matrix.detach()
        return matrix

    def forget(self, key: tuple[str, ...]) -> None:
        self.matrices.pop(key, None)

    def state_dict(self) -> dict:
        return {"matrices": {k: v.clone() for k, v in self.matrices.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.matrices = {tuple(k): v.clone() for k, v in state["matrices"].items()}


@dataclass
class FisherSolve:
    """How a parameter-space step solves its metric.

    :param form: ``"dense"``, ``"diag"`` or ``"cg"`` (matrix-free conjugate gradient); default:
        dense up to ``dense_max`` params, else CG (also for a closed-form metric whose sites'
        arguments have more than 2·``cg_iters`` entries, an amortized guide's: the dense Jacobian
        would cost a backward pass per entry), except that a Monte Carlo F̂ with fewer draws
        than params (rank ≤ S per site) is solved by its diagonal, which every draw informs, and
        that an AutoLowRankMultivariateNormal group (``None`` or ``"cg"``) is solved by CG
        preconditioned in closed form, with its products and exact trace in O(d r²)
        (:class:`~pyro_natgrad.fisher.low_rank.ScaledLowRankFisher`).
    :param damping: λ added to the metric, (F + λI)⁻¹.
    :param relative_damping: λ also includes ``relative_damping``·tr F / dim θ
        (Levenberg–Marquardt damping scaled to the metric; Martens & Grosse 2015, K-FAC, §6): a
        Monte Carlo F̂ is rank-deficient, and a closed-form F is singular where the guide's
        parameterization is (a low-rank factor's rotations).
    :param num_samples: Monte Carlo Fisher draws per site; default: enough for a full-rank dense
        F̂ of a group of n ≤ ``full_rank_max`` params, S·K ≥ 2n over its K sites (at least 64 per
        site: for Gaussian scores E[F̂⁻¹] = S/(S−n−1)·F⁻¹, so 2n draws bound that inflation by
        ≈ 2), and 64 for larger groups or an explicit ``"diag"``/``"cg"`` form.
    :param sampled_kl: a Monte Carlo step's KL is also measured by the Fisher's own draws,
        KL(q‖q') ≈ mean_s[log q(z_s) − log q'(z_s)], and the larger of that and the quadratic
        model is held to the trust region (far from where F̂ was taken the model can under-state
        the KL by many orders of magnitude). Closed-form steps are always measured by their exact
        KL both ways.
    :param cg_iters: at most this many metric products per CG solve.
    :param cg_rtol: CG stops once the residual |g − (F + λI)d| ≤ ``cg_rtol``·|g|. The gradient
        it solves for is a Monte Carlo estimate whose relative error is O(S^−½) for S particles,
        and the trust region measures every candidate's KL again; CG resolves the Fisher's
        smallest directions last, so the tolerance is kept well below that noise (a conjugate
        model's exact step, solved in closed form, does not pass through CG).
    :param average: a :class:`FisherAverage` of dense/diagonal metrics across steps, or None.
    :param gauge: a :class:`~pyro_natgrad.optim.transforms.GaugeProjection` of the gradient
        before the solve, or None.
    :param adaptation: a :class:`~pyro_natgrad.optim.transforms.VarianceAdaptation` of a
        closed-form step (each param's rate capped at its block's estimated signal fraction), or
        None. A Monte Carlo step is not capped: its metric F̂ is drawn afresh each step, so
        successive directions also differ by F̂'s noise, and the caps' Gram matrix would cost a
        metric product per param through the sampled scores.
    """

    form: Form | None = None
    damping: float = 1e-6
    relative_damping: float = 1e-2
    num_samples: int | None = None
    full_rank_max: int = 256
    dense_max: int = 2000
    cg_iters: int = 50
    cg_rtol: float = 1e-4
    sampled_kl: bool = True
    average: FisherAverage | None = None
    gauge: GaugeProjection | None = field(default_factory=GaugeProjection)
    adaptation: VarianceAdaptation | None = field(default_factory=VarianceAdaptation)

    def __post_init__(self) -> None:
        if self.form is not None and self.form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS} or None, got {self.form!r}")
        require_numbers(self, ("damping", "relative_damping", "cg_rtol"))
        require_counts(self, ("full_rank_max", "dense_max", "cg_iters"))
        if self.num_samples is not None:
            require_counts(self, ("num_samples",))

    def draws(self, n: int, k: int) -> int:
        """Monte Carlo Fisher draws per site for a group of n params over k sites."""
        if self.num_samples is not None:
            return self.num_samples
        if n > self.full_rank_max or self.form in ("diag", "cg"):
            return _DEFAULT_DRAWS
        return max(_DEFAULT_DRAWS, math.ceil(2 * n / k))

    def propose(self, key: tuple[str, ...], group: Group, leaves: dict[str, Tensor],
                grads: dict[str, Tensor], monte_carlo: bool) -> Proposal:
        theta = [leaves[n] for n in key]
        g = flat(self.gauge.apply(group, leaves, grads) if self.gauge is not None
                 else [grads[n] for n in key])
        draws = self.draws(g.numel(), len(group.sites))
        if monte_carlo:
            metric = MonteCarloFisher([(s.name, s.fn, s.scale) for s in group.sites], theta,
                                      draws)
            measure = _sampled_kl(group, metric) if self.sampled_kl else None
            structured = None
        else:
            structured = (_low_rank_fisher(group, leaves, self.gauge is not None)
                          if self.form in (None, "cg") else None)
            metric = structured or PulledBackFisher(
                [(s.family, s.family.args(s.base), s.multiplicity) for s in group.sites], theta)
            measure = kl_both_ways(group) if structured is None else None
        outputs = None if monte_carlo else sum(
            a.numel() for s in group.sites for a in s.family.args(s.base))
        form = self.form or ("cg" if structured is not None else _default_form(
            g.numel(), self.dense_max, monte_carlo and draws * len(group.sites) < g.numel(),
            outputs, self.cg_iters))
        if monte_carlo and form != "cg":
            metric.scores()  # formed for the solve anyway: the trace below is then exact
        if self.average is not None and form != "cg":
            metric = _Fixed(self.average(key, metric.diag() if form == "diag"
                                         else metric.dense()))
        damping = self.damping
        if self.relative_damping:
            damping += self.relative_damping * float(metric.trace()) / g.numel()
        direction = solve_metric(metric, g, form, damping, self.cg_iters, self.cg_rtol)
        sizes = [t.numel() for t in theta]
        caps = (None if self.adaptation is None or monte_carlo
                else self.adaptation.caps(key, sizes, g, direction))
        method = "monte_carlo" if monte_carlo else "closed_form"
        if caps is None or min(caps) == 1.0:
            curvature = direction @ (metric.mvp(direction) + damping * direction)
            step = linear_proposal(method, key, theta, direction, float(curvature))
        else:
            step = linear_proposal(method, key, theta, direction,
                                   _block_gram(metric, damping, direction, sizes), caps)

        closed = None if structured is None else _coordinates_kl(structured)

        def candidate(rate: float) -> Candidate:
            c = step.candidate(rate)
            model = c.kl if monte_carlo else None  # a sampled KL is noisy: never below the model
            if measure is not None:
                c.measure = measure if model is None else (lambda t: max(model, measure(t)))
            c.closed_form_kl = closed
            return c

        return Proposal(method, candidate, exact=False, max_rate=step.max_rate)


def _block_gram(metric, damping: float, direction: Tensor, sizes: list[int]) -> Tensor:
    """Mᵢⱼ = dᵢᵀ(F + λI)dⱼ (float64) for the blocks dᵢ of ``direction`` (zero outside block i):
    one metric product per block."""
    blocks = torch.block_diag(*direction.split(sizes))  # row i: dᵢ in place, zeros elsewhere
    products = torch.stack([metric.mvp(b) + damping * b for b in blocks])
    return (blocks @ products.T).to(torch.float64)


class _Fixed:
    """A metric given by its dense or diagonal matrix (an averaged Fisher)."""

    def __init__(self, matrix: Tensor):
        self.matrix = matrix

    def dense(self) -> Tensor:
        return self.matrix if self.matrix.dim() == 2 else torch.diag(self.matrix)

    def diag(self) -> Tensor:
        return self.matrix if self.matrix.dim() == 1 else self.matrix.diagonal()

    def mvp(self, v: Tensor) -> Tensor:
        return self.matrix * v if self.matrix.dim() == 1 else self.matrix @ v

    def trace(self) -> Tensor:
        return self.diag().sum()


def _sampled_kl(group: Group, metric: MonteCarloFisher) -> Callable[[poutine.Trace], float]:
    """KL(q ‖ q') from the Monte Carlo Fisher's own draws z ∼ q, mean_s[log q(z_s) −
    log q'(z_s)], with q' the guide re-built at a candidate (its trace)."""
    def kl(trace: poutine.Trace) -> float:
        return metric.sampled_kl({s.name: trace.nodes[s.name]["fn"] for s in group.sites})
    return kl


def kl_both_ways(group: Group) -> Callable[[poutine.Trace], float]:
    """max(KL(q ‖ q'), KL(q' ‖ q)) of exponential-family sites, q' re-built at a candidate (the
    second grows with a q' much wider than q, whose draws the next ELBO evaluates; the Fisher's
    quadratic model misses both where the parameterization is degenerate, e.g. the ΔWΔWᵀ term of
    a low-rank factor near W = 0)."""
    with torch.no_grad():  # q in float64, built once for every candidate's two KLs
        current = [(s.name, s.family, float64(s.family, s.base), s.multiplicity)
                   for s in group.sites]

    def kl(trace: poutine.Trace) -> float:
        total = 0.0
        with torch.no_grad():
            for name, family, q, multiplicity in current:
                new = float64(family, unwrap(trace.nodes[name]["fn"])[0])
                total += max(kl64(family, q, new), kl64(family, new, q)) * multiplicity
        return total

    return kl


def _coordinates_kl(fisher: ScaledLowRankFisher) -> Callable[[Mapping[str, Tensor]], float]:
    """:func:`kl_both_ways` of an AutoLowRankMultivariateNormal site from its params' values, in
    float64 and closed form (:func:`~pyro_natgrad.families.multivariate_normal.scaled_low_rank_kl`),
    the guide not re-built."""
    coords = fisher.coords
    current = tuple(t.to(torch.float64) for t in (coords.loc, coords.s, coords.p))

    def kl(values: Mapping[str, Tensor]) -> float:
        new = tuple(t.to(torch.float64) for t in coords.scaled(values))
        forward, backward = scaled_low_rank_kl(current, new)
        return max(float(forward), float(backward)) * fisher.multiplicity

    return kl


def _low_rank_fisher(group: Group, leaves: dict[str, Tensor],
                     gauge_free: bool) -> ScaledLowRankFisher | None:
    """The closed-form Fisher of a one-site group of AutoLowRankMultivariateNormal (unbatched,
    loc and factor unconstrained), solved by preconditioned conjugate gradients; else None.
    ``gauge_free``: the gradient's rotation component was removed."""
    coords = scaled_low_rank_coordinates(group, leaves)
    if coords is None:
        return None
    return ScaledLowRankFisher(coords, group.sites[0].multiplicity, gauge_free)


def _default_form(n: int, dense_max: int, rank_deficient: bool, outputs: int | None,
                  cg_iters: int) -> Form:
    """Dense up to ``dense_max`` params, but for a closed-form metric whose sites have more
    argument entries than CG takes passes (a dense Jacobian costs one backward pass per entry, a
    CG solve at most two per iteration: an amortized guide's encoder, batch × outputs entries);
    diagonal for a rank-deficient Monte Carlo F̂."""
    if rank_deficient:
        return "diag"
    if outputs is not None and outputs > 2 * cg_iters:
        return "cg"
    return "dense" if n <= dense_max else "cg"
