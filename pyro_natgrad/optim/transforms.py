"""Transforms of a step: momentum, domain repairs of a natural step, the gauge projection of a
gradient and the variance adaptation of a parameter-space direction. Each is a small object with
its own state (where it has any); the optimizer leaves a transform out when its option is None."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..families import ExponentialFamily
from ..families.gaussian_step import (
    GaussianDirection,
    GaussianStep,
    natural_step,
    ritz_pairs,
)
from ..fisher.autodiff import jvp
from ..fisher.linalg import without_rotations
from ..guides import Group, Site
from .options import require_counts
from .proposal import Candidate

__all__ = ["HeavyBall", "Velocity", "PrecisionShortening", "Retraction", "GaugeProjection",
           "VarianceAdaptation"]

Key = tuple[str, ...]
Eta = tuple[Tensor, ...]
# a full-covariance Gaussian's natural step at a rate, repaired where it leaves the domain, with
# its note; None when no repair keeps it in the domain
GaussianRepair = Callable[[float], "tuple[GaussianStep, str] | None"]


@dataclass(frozen=True)
class Velocity:
    """The heavy ball's momentum for one step of a group: ``per_rate`` β(m − m_prev)/ρ_prev,
    the shift of the mean per unit rate; ``move`` u = m − m_prev, the last accepted move; and
    ``reach`` 2t*, the coefficient of u from m beyond which the secant model of the loss along
    u rises above its value at m (:meth:`HeavyBall.velocity`), or None where the two gradients
    show no curvature."""

    per_rate: Tensor
    move: Tensor
    reach: float | None


@dataclass
class HeavyBall:
    """Heavy-ball momentum on the mean of a Gaussian site's natural step,
    m ← m' + ρβ(m − m_prev)/ρ_prev with m' the natural step's mean (Polyak 1964; on the natural
    step's mean as in Khan et al. 2018, "Fast and scalable Bayesian deep learning by
    weight-perturbation in Adam", ICML), dropped whenever the last move went uphill by the new
    gradient, ∇ₘL·(m − m_prev) ≥ 0 (the gradient restart of O'Donoghue & Candès 2015, which also
    switches it off where Monte Carlo noise decides the gradient's sign).

    The shift never carries the mean to where the loss along the last move u = m − m_prev rises
    above its value at m, by the secant model of the loss on that line: φ(t) = L(m + tu) has
    φ'(0) = ∇ₘL·u and, from the gradient g_prev at m_prev, φ'(0) − φ'(−1) = (∇ₘL − g_prev)·u
    (the secant condition of quasi-Newton methods; Nocedal & Wright 2006, §6.1), so where that
    curvature is positive the model's minimum is at t* = −∇ₘL·u / (∇ₘL − g_prev)·u and
    φ(2t*) = φ(0). The new mean's coordinate along u (q's metric) is held to 2t*: a heavy ball
    may pass the line's minimum, as its iterates do on an ill-conditioned quadratic, but not
    into the rise beyond, where a step that is Newton's already (a conjugate model, at lr < 1)
    was carried by the momentum of its own first move; where the posterior's correlations slow
    a factorized step, t* is far and the shift stands.

    :param beta: β in [0, 1), or ``"auto"``: 0.9 for factorized (mean-field) sites, 0 for
        full-covariance ones. A full-covariance natural step is already a Newton step for the
        mean; a factorized one is a Jacobi step, slowed by the posterior's correlations.
    :param cap: the momentum's shift s is scaled down, where needed, to
        |s|_Λ ≤ ``cap``·|m' − m|_Λ, the natural step's own move, both in q's metric Λ (σ⁻² per
        coordinate; L⁻ᵀL⁻¹ for a full covariance), over the group. Travelling at a steady
        natural move δ, the heavy ball's shift tends to β/(1 − β)·δ (9δ at β = 0.9), far inside
        the default cap; where the natural move collapses (an exact step reached the optimum:
        the gradient is zero to rounding, and so is the restart test's verdict) the last move's
        momentum no longer carries q past it. None: uncapped.
    :param secant: hold the shift to the secant model's 2t* (above); False leaves it out.

    State: per group, the mean its last accepted step was built at, the gradient ∇ₘL there and
    that step's rate (set only when a candidate is accepted, so the order of tried candidates
    does not matter).
    """

    beta: float | str = "auto"
    cap: float | None = 100.0
    secant: bool = True
    last: dict[Key, tuple[Tensor, Tensor, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.beta != "auto" and not (isinstance(self.beta, int | float)
                                        and 0 <= self.beta < 1):
            raise ValueError(f"momentum must be in [0, 1) or 'auto', got {self.beta!r}")
        if self.cap is not None and not (isinstance(self.cap, int | float) and self.cap > 0
                                         and math.isfinite(self.cap)):
            raise ValueError(f"HeavyBall cap must be a finite number > 0 or None, "
                             f"got {self.cap!r}")

    def shift(self, velocity: Velocity, rate: float, move: Tensor,
              whiten: Callable[[Tensor], Tensor]) -> Tensor:
        """The mean's shift at ``rate`` after the natural step's own ``move`` m' − m: ρ·per_rate,
        scaled down to |s|_Λ ≤ cap·|m' − m|_Λ and to a coordinate along u of at most
        2t* − ⟨m' − m, u⟩_Λ/|u|²_Λ (never below 0), W = ``whiten`` (q's metric as a map,
        |x|_Λ = |Wx|), norms and inner products over the group."""
        shift = rate * velocity.per_rate
        factor = torch.ones((), dtype=shift.dtype, device=shift.device)
        held = self.secant and velocity.reach is not None
        if self.cap is None and not held:
            return shift
        white_shift, white_move = whiten(shift), whiten(move)  # once, for both bounds
        tiny = torch.finfo(shift.dtype).tiny
        if self.cap is not None:
            size = torch.linalg.vector_norm(white_shift)
            limit = self.cap * torch.linalg.vector_norm(white_move)
            factor = torch.where(size > limit, limit / size.clamp_min(tiny), factor)
        if held:
            line = whiten(velocity.move)
            length = line.square().sum().clamp_min(tiny)
            along = (white_shift * line).sum() / length  # the shift's coefficient on u
            room = (velocity.reach - (white_move * line).sum() / length).clamp_min(0)
            factor = torch.minimum(factor, room / along.clamp_min(tiny))
        return shift * factor

    def velocity(self, key: Key, family: ExponentialFamily, loc: Tensor,
                 d_loc: Tensor | None) -> Velocity | None:
        """The momentum at mean ``loc`` with gradient ``d_loc`` = ∇ₘL, or None (no momentum, no
        previous step, or a restart)."""
        beta = self.beta
        if beta == "auto":
            beta = 0.9 if family.event_rank() == 0 else 0.0
        last = self.last.get(key)
        if not beta or d_loc is None or last is None or last[0].shape != loc.shape:
            return None
        anchor, gradient, rate = last
        moved = loc.detach() - anchor
        slope = float((d_loc * moved).sum())
        if not slope < 0:
            return None
        curvature = float(((d_loc - gradient) * moved).sum())
        reach = -2 * slope / curvature if curvature > 0 else None
        return Velocity(beta / rate * moved, moved, reach)

    def accept(self, key: Key, candidate: Candidate) -> None:
        if candidate.anchor is not None:
            self.last[key] = (*candidate.anchor, candidate.rate)

    def forget(self, key: Key) -> None:
        self.last.pop(key, None)

    def state_dict(self) -> dict:
        return {"last": {k: (m.clone(), g.clone(), r) for k, (m, g, r) in self.last.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.last = {tuple(k): (m.clone(), g.clone(), r)
                     for k, (m, g, r) in state["last"].items()}


@dataclass
class PrecisionShortening:
    """Repairs a Gaussian natural step whose precision left the domain at some batch elements:
    there the precision's rate ρ_Λ is halved (at most ``max_halvings`` times) until
    Λ' = Λ + 2ρ_Λ ∂L/∂Σ is positive definite, while the mean keeps its rate ρ,
    m' = m − ρ Λ'⁻¹ ∂L/∂m (the natural step written in (m, Λ); Khan & Rue 2023, "The Bayesian
    learning rule", §4.1): in η, δ₁ = −ρ_Λ ∂L/∂μ₁ − (ρ − ρ_Λ) ∂L/∂m, δ₂ = −ρ_Λ ∂L/∂μ₂. Each batch
    element (each coordinate of a mean-field Normal) is shortened on its own. Far from the
    optimum the Monte Carlo estimate of ∂L/∂Σ is the noisy part; the mean is not held back by it.
    Families without a location (not Gaussian) are not repaired. A step that stays in the domain
    at the full rate is not changed unless its group is marked noisy (``hold``, below): a
    conjugate model's exact step is kept.

    At the first positive-definite fraction Λ'Λ⁻¹ has an eigenvalue b in (0, ½] along the
    estimate's most negative direction: q widens by 1/b there, and KL(q ‖ q'), which the trust
    region bounds, charges only ½(b − 1 − log b) for it (1.8 nats at b = 0.01). Two bounds:

    * ``floor`` (full covariance, stepped in its Cholesky factor, where Λ'Λ⁻¹ is similar to
      B = I + ρ_Λ S): the directions where B falls below ``floor`` among the Ritz pairs (θᵢ, uᵢ)
      of S are lifted to it, B' = B + Σᵢ (floor − 1 − ρ_Λθᵢ)₊ uᵢuᵢᵀ (the
      eigenvalue modification of a Newton step, Nocedal & Wright 2006, §3.4): q widens at most
      1/floor along them, and every other direction keeps the shortened step.
    * ``margin`` (the natural-parameter path: scalar families, such as a mean-field Normal's
      coordinates): ``margin`` more halvings. Λ' is affine in ρ_Λ, so Λ'(2⁻ᵐf) =
      (1 − 2⁻ᵐ)Λ + 2⁻ᵐΛ'(f) ⪰ (1 − 2⁻ᵐ)Λ.
    * ``hold`` (full covariance): a group whose precision step has once left the domain is
      marked noisy: its precision target is a Monte Carlo estimate that has shown its noise.
      Every later step of it that stays in the domain is lifted the same way to ``hold``. Such
      a step can still be nearly singular along a noise direction, B = I + ρS with an
      eigenvalue near 0, which widens q many times in one step; the KL charges that little.
      ``hold`` < ``floor`` leaves room for the widening a fit far from its optimum needs, which
      is consistent from step to step: q widens at most 1/hold per step there. 0 leaves it out.
    * ``verify`` (full covariance): the lift covers the Ritz directions of S only, and B can be
      nearly singular along a direction they miss (q widening 10–25× in one step). A step
      held to a floor (shortened, or of a noisy group) is checked by ``verify`` steps of
      inverse iteration with B's factor
      (:meth:`~pyro_natgrad.families.gaussian_step.GaussianStep.least`, O(d²) each); where B
      falls below half its floor along the direction found, that direction is lifted to the
      floor too (one more Cholesky). 0 leaves it out.

    The full covariance's precision Λ' = L⁻ᵀ(I + ρ_Λ S)L⁻¹
    (:mod:`~pyro_natgrad.families.gaussian_step`): rates at which I + ρ_Λ S is indefinite by an
    upper bound θ ≥ λ_min(S) (ρ_Λ θ < −1) are skipped without a factorization; θ is the smaller
    of min Sᵢᵢ and the smallest Ritz value of ``lanczos_iters`` Lanczos steps, run once per
    direction before the first Cholesky where ρ_Λ|S|_F does not already rule out such rates
    and lifts (Ritz values never lie below λ_min; Golub & Van Loan 2013, §10.1). The first
    rate tried below the full one is aimed at with the estimate θ − r (r: the Ritz pair's
    residual norm); a Cholesky decides every rate it tries.

    State: the groups marked noisy (keyed by their param names)."""

    max_halvings: int = 20
    lanczos_iters: int = 10
    floor: float = 0.6
    margin: int = 0
    hold: float = 0.2
    verify: int = 3
    noisy: set[Key] = field(default_factory=set)

    def __post_init__(self) -> None:
        for name in ("floor", "hold"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < 1):
                raise ValueError(f"PrecisionShortening: {name} must be in [0, 1), got {value!r}")
        require_counts(self, ("max_halvings", "margin", "verify"), 0, "PrecisionShortening: ")
        require_counts(self, ("lanczos_iters",), 1, "PrecisionShortening: ")

    def repair(self, family: ExponentialFamily, eta: Eta, delta: Eta, dmu: Eta,
               d_loc: Tensor | None, rate: float, valid: Tensor) -> tuple[Eta, str] | None:
        if d_loc is None:
            return None

        def expand(f: Tensor, k: int) -> Tensor:
            return f.reshape(f.shape + (1,) * k)

        k1, k2 = family.event_dims

        def inside(fraction: Tensor) -> Tensor:
            return family.in_domain(eta[0], eta[1] - rate * expand(fraction, k2) * dmu[1])

        fraction = self._search(inside, torch.where(valid, 1.0, 0.5).to(eta[1].dtype))
        if fraction is None:
            return None
        fraction = _inset(fraction, self.margin)
        f1, f2 = expand(fraction, k1), expand(fraction, k2)
        new_eta = (eta[0] - rate * (f1 * dmu[0] + (1 - f1) * d_loc),
                   eta[1] - rate * f2 * dmu[1])
        return new_eta, _shortened(fraction)

    def gaussian(self, direction: GaussianDirection, key: Key | None = None) -> GaussianRepair:
        """The step of N(m, LLᵀ) along ``direction`` at each rate, shortened where it leaves the
        domain and lifted to the floor (to ``hold`` where it stays in the domain and the group
        ``key`` is marked noisy; a shortened step marks it): per rate, one Cholesky when the step
        stays in the domain or the estimate of λ_min(S) is right. Lanczos runs at most once per
        direction (O(d²) per iteration), and not at all while ρ_Λ|S|_F shows that no eigenvalue
        of ρ_Λ S reaches the floor − 1 (|λ| ≤ |S|_F): the Ritz pairs could change nothing."""
        held = self.hold if key in self.noisy else 0.0
        s = direction.whitened_cov
        diagonal = s.diagonal(dim1=-2, dim2=-1).amin(-1)  # eᵢᵀSeᵢ ≥ λ_min(S)
        limit = -(1 + torch.finfo(s.dtype).eps ** 0.5)
        smallest = 0.5 ** self.max_halvings
        halvings = 0.5 ** torch.arange(self.max_halvings + 2, dtype=torch.float64)
        spectrum: list[tuple[Tensor, Tensor, Tensor]] = []

        def ritz() -> tuple[Tensor, Tensor, Tensor]:
            """S's Ritz pairs, on first need: (θ, vectors, residual norms)."""
            if not spectrum:
                spectrum.append(ritz_pairs(s, self.lanczos_iters))
            return spectrum[0]

        def within(scaled: Tensor, room: Tensor | float) -> bool:
            """ρ_Λ λ ≥ −``room`` for every eigenvalue λ of S, by |λ| ≤ |S|_F (with a margin
            for rounding): then neither a Ritz value nor min Sᵢᵢ can change the step, and the
            Lanczos steps are not run."""
            return bool((scaled * direction.frobenius <= 0.999 * room).all())

        def skip(fraction: Tensor, rate: float) -> Tensor:
            """The first of fraction, ½·fraction, … (not below ``smallest``) at which
            I + rate·fraction·S is not indefinite by the bound, nor a shortened one by the
            estimate: every level tested at once (halving a power of two is exact)."""
            if not bool((fraction < 1).any()) and within(rate * fraction, 1.0):
                return fraction
            theta, _, residual = ritz()
            bound = torch.minimum(diagonal, theta[..., 0])[..., None]  # ≥ λ_min(S)
            estimate = torch.minimum(diagonal, theta[..., 0] - residual[..., 0])[..., None]
            levels = fraction[..., None] * halvings.to(fraction)  # (…, max_halvings + 2)
            out = ((rate * levels * bound < limit) | ((levels < 1) & (rate * levels * estimate
                                                                      <= -1)))
            out = out & (levels >= smallest)
            # the first level not out; every level out leaves the one below ``smallest``
            first = torch.where(out, len(halvings),
                                torch.arange(len(halvings), device=levels.device)).amin(-1)
            return levels.gather(-1, first.clamp_max(len(halvings) - 1)[..., None])[..., 0]

        def floor_of(fraction: Tensor) -> Tensor:
            """Per element, the floor B is held to: ``floor`` shortened, else ``held``."""
            return torch.where(fraction < 1, fraction.new_tensor(self.floor),
                               fraction.new_tensor(held))

        def lifted(fraction: Tensor, rate: float) -> tuple[Tensor, Tensor] | None:
            """(U, a) for ``natural_step``'s lift: B's Ritz directions below the floor (or
            ``hold``, unshortened)."""
            floor = floor_of(fraction)
            if not bool((floor > 0).any()) or within(rate * fraction, 1 - floor):
                return None
            theta, vectors, _ = ritz()
            lift = torch.where(floor[..., None] > 0, (floor[..., None] - 1 - (
                rate * fraction)[..., None] * theta).clamp_min(0), 0.0)
            active = (lift > 0).reshape(-1, lift.shape[-1]).any(0)  # pairs lifted anywhere
            if not bool(active.any()):
                return None
            return vectors[..., active], lift[..., active]

        def verified(found: GaussianStep, lift: tuple[Tensor, Tensor] | None, fraction: Tensor,
                     rate: float) -> tuple[GaussianStep, tuple[Tensor, Tensor] | None]:
            """The step with the direction where B is lowest also lifted to its floor, where
            inverse iteration finds B below half of it there (else the step as it is)."""
            floor = floor_of(fraction)
            if not bool((floor > 0).any()):
                return found, lift
            value, vector = found.least(self.verify)
            low = (floor > 0) & (value < 0.5 * floor)
            if not bool(low.any()):
                return found, lift
            amount = torch.where(low, floor - value, 0.0)
            more = (vector[..., None], amount[..., None])
            if lift is not None:
                more = (torch.cat([lift[0], more[0]], -1), torch.cat([lift[1], more[1]], -1))
            lifted_more = natural_step(direction, rate, rate * fraction, lift=more)
            return (lifted_more, more) if bool(lifted_more.ok.all()) else (found, lift)

        def step(rate: float) -> tuple[GaussianStep, str] | None:
            tried = []  # (step, its lift) per fraction tried

            def inside(fraction: Tensor) -> Tensor:
                lift = lifted(fraction, rate)
                tried.append((natural_step(direction, rate, rate * fraction, lift=lift), lift))
                return tried[-1][0].ok

            fraction = self._search(inside, s.new_ones(s.shape[:-2]),
                                    lambda f: skip(f, rate))
            if fraction is None:
                return None
            if key is not None and bool((fraction < 1).any()):
                self.noisy.add(key)
            found, lift = tried[-1]
            if self.verify:
                found, lift = verified(found, lift, fraction, rate)
            note = _shortened(fraction) or ("" if lift is None else
                                            f"precision held to {held:g} along "
                                            f"{lift[0].shape[-1]} direction(s) (noisy group)")
            return found, note

        return step

    def forget(self, key: Key) -> None:
        self.noisy.discard(key)

    def state_dict(self) -> dict:
        return {"noisy": sorted(self.noisy)}

    def load_state_dict(self, state: dict) -> None:
        self.noisy = {tuple(k) for k in state["noisy"]}

    def _search(self, inside: Callable[[Tensor], Tensor], fraction: Tensor,
                skip: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
        """Per batch element, the first of ``fraction``, ½·fraction, … (down to
        ½^max_halvings) at which ``inside`` holds, ``skip`` moving a tried fraction past levels
        known to fail; None when some element has none. ``inside`` is called on the whole batch
        and last on the fraction returned."""
        floor = 0.5 ** self.max_halvings
        skip = skip or (lambda f: f)
        fraction = skip(fraction)
        while not bool((fraction < floor).any()):
            ok = inside(fraction)
            if bool(ok.all()):
                return fraction
            fraction = torch.where(ok, fraction, skip(0.5 * fraction))
        return None


def _inset(fraction: Tensor, margin: int) -> Tensor:
    """``margin`` more halvings where the step was shortened."""
    return torch.where(fraction < 1, fraction * 0.5 ** margin, fraction)


def _shortened(fraction: Tensor) -> str:
    """The note of a precision-shortened step (empty when no element was shortened)."""
    shortened = int((fraction < 1).sum())
    if not shortened:
        return ""
    return (f"precision step shortened to {float(fraction.min()):.3g} of the mean's at "
            f"{shortened} of {fraction.numel()} elements")


@dataclass
class Retraction:
    """Repairs a natural step that left the domain by the family's retraction at the elements
    that left it (Gaussians: Λ' = Λ + δΛ + ½ δΛ Λ⁻¹ δΛ, positive definite for any δΛ; Lin,
    Schmidt & Khan 2020, "Handling the positive-definite constraint in the Bayesian learning
    rule", ICML); the other elements step plainly. Measured slower than
    :class:`PrecisionShortening` with noisy gradients far from the optimum."""

    def repair(self, family: ExponentialFamily, eta: Eta, delta: Eta, dmu: Eta,
               d_loc: Tensor | None, rate: float, valid: Tensor) -> tuple[Eta, str] | None:
        retracted = family.retract(eta, delta)
        if retracted is None:
            return None
        plain = tuple(e + d for e, d in zip(eta, delta, strict=True))
        new_eta = tuple(torch.where(valid.reshape(valid.shape + (1,) * k), x, y)
                        for x, y, k in zip(plain, retracted, family.event_dims, strict=True))
        return new_eta, _retracted(valid)

    def gaussian(self, direction: GaussianDirection, key: Key | None = None) -> GaussianRepair:
        """The step of N(m, LLᵀ) along ``direction`` at each rate, retracted
        (``natural_step(..., retract=True)``) at the elements where it leaves the domain; S² is
        formed once, at the first such step."""
        retracting: list[GaussianDirection] = []

        def step(rate: float) -> tuple[GaussianStep, str] | None:
            plain = natural_step(direction, rate)
            if bool(plain.ok.all()):
                return plain, ""
            if not retracting:
                s = direction.whitened_cov
                retracting.append(replace(direction, whitened_cov_square=s @ s))
            other = natural_step(retracting[0], rate, retract=True)
            valid = plain.ok
            merged = GaussianStep(
                torch.where(valid, plain.kl, other.kl), None, valid | other.ok,
                lambda: (torch.where(valid[..., None], plain.loc, other.loc),
                         torch.where(valid[..., None, None], plain.scale_tril,
                                     other.scale_tril)))
            return (merged, _retracted(valid)) if bool(merged.ok.all()) else None

        return step


def _retracted(valid: Tensor) -> str:
    return f"retraction at {int((~valid).sum())} of {valid.numel()} elements"


@dataclass
class GaugeProjection:
    """Removes a gradient's component along directions that move no distribution. A low-rank
    Gaussian's factor W enters only through WWᵀ, so the exact gradient is orthogonal to every
    rotation direction WA (A antisymmetric); a Monte Carlo estimate is not, and a damped solve
    steps along that noise as 1/λ. The param P of a one-site group that its parameterization
    declares (:meth:`~pyro_natgrad.guides.Parameterization.rotation_gauge`) is projected; for a
    site without a known parameterization (a custom guide), each param P found by a probe:
    rotating it rotates the factor, ∂W/∂P·(PA) = WA for one random antisymmetric A."""

    def apply(self, group: Group, leaves: dict[str, Tensor], grads: dict[str, Tensor]
              ) -> list[Tensor]:
        out = [grads[n] for n in group.param_names]
        site = group.sites[0]
        if len(group.sites) != 1 or site.family is None or site.family.rotation_gauge is None:
            return out
        if site.parameterization is not None:
            gauged = site.parameterization.rotation_gauge(site.family)
            factors = () if gauged is None else (gauged,)
        else:
            factors = _probe_rotation_gauge(site, group.param_names, leaves)
        for i, name in enumerate(group.param_names):
            if name in factors:
                out[i] = without_rotations(leaves[name].detach(), out[i])
        return out


@dataclass
class VarianceAdaptation:
    """Caps each param's rate in a parameter-space step at its block's estimated signal fraction,
    θ_b ← θ_b − min(ρ, φ_b)·δ_b with φ_b = |s_b|² / (|s_b|² + σ_b²). Along a direction δ = s + n
    with noise n of variance σ² and unit curvature (the metric's, which a natural step presumes)
    the expected change of the loss at step w is −w|s|² + ½w²(|s|² + σ²), least at w = φ and
    falling in w below it: so min(ρ, φ) is the better of the two (the variance adaptation of
    Balles & Hennig 2018, "Dissecting Adam: the sign, magnitude and variance of stochastic
    gradients", ICML, §3; here per param and in the metric's inner product
    ⟨g, δ⟩ = gᵀ(F + λI)⁻¹g).

    The optimizer sees one averaged gradient per step, not the particles', so φ is read from the
    group's successive directions, as the cosine c_t = g_tᵀδ_{t−1} / (g_tᵀδ_t · g_{t−1}ᵀδ_{t−1})^½
    over the block, averaged over steps with weight ``decay`` (cosines, not their terms, are
    averaged: the terms shrink by orders of magnitude as a fit converges). With fresh noise each
    step, E[g_tᵀδ_t] = |s|² + σ², and on a quadratic of curvature a along the block (in the
    metric) the step ρ_b taken between the readings turns the signal, E[g_tᵀδ_{t−1}] =
    (1 − ρ_b a)|s|² − ρ_b a σ², so E[c] ≈ φ − ρ_b a and the cap settles at φ/(1 + a): the best
    step φ/a for a stiff block, half of it at a = 1, short by 1/a on a flat one. An overshoot
    reads as c ≤ 0 (the block's rate is capped at ``floor``); so does a signal turned by the
    other blocks' moves (the metric's coupling between blocks is left out). A group's first step
    is not capped.

    State: per group, its last direction and gradient, and each block's average cosine.
    """

    decay: float = 0.8
    floor: float = 0.01
    last: dict[Key, tuple[Tensor, Tensor]] = field(default_factory=dict)
    averages: dict[Key, list[float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (0 <= self.decay < 1 and 0 < self.floor <= 1):
            raise ValueError(f"VarianceAdaptation needs 0 <= decay < 1 and 0 < floor <= 1, "
                             f"got {self!r}")

    def caps(self, key: Key, sizes: Sequence[int], g: Tensor, direction: Tensor) -> list[float]:
        """Reads the direction ``direction`` = (F + λI)⁻¹``g`` (flat, blocks of ``sizes``) and
        returns each block's rate cap, clip(φ_b, floor, 1) (1: not capped). Where a block's
        gradient is zero in some coordinates (the params of latents outside a subsampled plate's
        batch), the cosine is read over the coordinates both steps moved: successive batches'
        directions are orthogonal elsewhere whatever their signal."""
        sizes = list(sizes)
        previous = self.last.get(key)
        self.last[key] = (direction.detach().clone(), g.detach().clone())
        if previous is None or previous[0].shape != direction.shape:
            self.averages[key] = [None] * len(sizes)
            return [1.0] * len(sizes)
        averages = self.averages[key]
        for b, (gb, db, old, old_g) in enumerate(zip(
                g.split(sizes), direction.split(sizes), previous[0].split(sizes),
                previous[1].split(sizes), strict=True)):
            both = (gb != 0) & (old != 0)
            if bool(both.all()):
                cross, scale = float(gb @ old), float(gb @ db) * float(old_g @ old)
            else:
                cross = float(gb[both] @ old[both])
                scale = float((gb * db)[both].sum()) * float((old_g * old)[both].sum())
            if not (scale > 0 and math.isfinite(scale)):
                continue  # a block the metric's coupling turns uphill, or a zero block: no reading
            cosine = min(1.0, max(-1.0, cross / math.sqrt(scale)))
            mean = cosine if averages[b] is None else averages[b]
            averages[b] = self.decay * mean + (1 - self.decay) * cosine
        return self.current(key)

    def current(self, key: Key) -> list[float]:
        """Each block's current cap (1 where nothing was read yet)."""
        return [1.0 if a is None else min(1.0, max(self.floor, a))
                for a in self.averages.get(key, ())]

    def forget(self, key: Key) -> None:
        self.last.pop(key, None)
        self.averages.pop(key, None)

    def state_dict(self) -> dict:
        return {"last": {k: (d.clone(), g.clone()) for k, (d, g) in self.last.items()},
                "averages": {k: list(a) for k, a in self.averages.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.last = {tuple(k): (d.clone(), g.clone()) for k, (d, g) in state["last"].items()}
        self.averages = {tuple(k): list(v) for k, v in state["averages"].items()}


def _probe_rotation_gauge(site: Site, names: tuple[str, ...], leaves: dict[str, Tensor]
                          ) -> tuple[str, ...]:
    """The params P among ``names`` shaped like the site's low-rank factor W for which
    ∂W/∂P·(PA) = WA, one forward product each (A random antisymmetric, seeded)."""
    factor = site.family.args(site.base)[site.family.rotation_gauge]
    if not factor.requires_grad:
        return ()
    found = []
    for name in names:
        param = leaves[name]
        if param.shape != factor.shape:
            continue
        r = param.shape[-1]
        a = torch.randn(r, r, generator=torch.Generator().manual_seed(0), dtype=param.dtype)
        a = (a - a.T).to(param.device)
        moved = jvp(factor, [param], (param.detach() @ a).reshape(-1))
        expected = factor.detach() @ a
        if torch.allclose(moved, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max())):
            found.append(name)
    return tuple(found)
