"""A scale-free step size for the forward–backward Bures step: h from the curvature it sees.

The forward step (I − hĤ)Σ(I − hĤ) of :mod:`~pyro_natgrad.wasserstein.forward_backward` is
stable and keeps the Gaussian VI optimum as its fixed point while h λ_max(Ĥ) ≤ 1 (Diao,
Balasubramanian, Chewi & Salim 2023, ICML: h ≤ 1/L for an L-smooth potential), so the step

    h = c / ρ(FᵀĤF)

with a dimensionless factor c ≤ 1 has the units of 1 / curvature whatever the problem's scale;
ρ is the spectral radius, which also bounds the expansion |1 − hλ| ≤ 1 + c along directions
where the Monte Carlo estimate Ĥ (or the potential) has negative curvature. F is the frame of
the step (``frame`` of :func:`~pyro_natgrad.wasserstein.forward_backward_step`): F = I the
plain W₂ geometry, F = L (the guide's Cholesky factor) the coordinates where q is standard
normal, in which FᵀĤF = LᵀĤL ≈ I at the optimum (Ĥ = Σ⁻¹ there), so c is the fraction of the
full step in every direction at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..families.gaussian_step import smallest_eigenvalue


def spectral_radius(matrix: Tensor, iters: int = 10) -> Tensor:
    """An estimate from above of max |λ| of a symmetric ``matrix`` (…, d, d), per batch element:
    max(r₊ − θ₊, r₋ − θ₋) from ``iters`` Lanczos steps on −A and on A
    (:func:`~pyro_natgrad.families.gaussian_step.smallest_eigenvalue`: Ritz value θ, residual r),
    exact once ``iters`` ≥ d, O(iters·d²) otherwise."""
    top, top_residual = smallest_eigenvalue(-matrix, iters)
    bottom, bottom_residual = smallest_eigenvalue(matrix, iters)
    return torch.maximum(top_residual - top, bottom_residual - bottom)


def curvature_step(hess: Tensor, factor: float = 1.0, frame: Tensor | None = None,
                   iters: int = 10) -> Tensor:
    """h = ``factor`` / ρ(FᵀĤF) per batch element of ``hess`` Ĥ (…, d, d), F = ``frame`` or I
    (module docstring). A zero Ĥ (no curvature seen) gives h = +inf: the caller must bound it."""
    if not factor > 0:
        raise ValueError(f"curvature_step: factor must be > 0, got {factor!r}")
    if frame is not None:
        hess = frame.mT @ hess @ frame
    return factor / spectral_radius(hess, iters)


def curvature_step_diag(hess_diag: Tensor, factor: float = 1.0,
                        frame: Tensor | None = None) -> Tensor:
    """h = ``factor`` / maxᵢ |fᵢ²Ĥᵢᵢ| over all elements of a mean-field site's diagonal curvature
    (:func:`~pyro_natgrad.wasserstein.forward_backward.energy_hessian_diag`), one h per site in
    the coordinates yᵢ = xᵢ / fᵢ of a diagonal ``frame`` f (None: f = 1), returned in x's
    coordinates as the per-coordinate hᵢ = h fᵢ² (the diagonal step with these hᵢ is the step
    with h in the frame's coordinates). With f = σ (q's frame) hᵢ → c/Ĥᵢᵢ at the mean-field
    optimum, where σᵢ²Ĥᵢᵢ = 1: a Jacobi step, which a correlated target can make overshoot, as it
    does the mean-field natural step (a mean-field guide sees only diag Ĥ, and λ_max(Ĥ) ≥
    maxᵢ Ĥᵢᵢ); the step-size policy is what catches it."""
    if not factor > 0:
        raise ValueError(f"curvature_step_diag: factor must be > 0, got {factor!r}")
    if frame is None:
        return factor / hess_diag.abs().max()
    weight = frame.square()
    return factor / (weight * hess_diag).abs().max() * weight
