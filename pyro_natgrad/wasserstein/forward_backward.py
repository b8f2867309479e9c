"""Forward–backward Gaussian VI: a gradient step on the energy, an exact proximal (JKO) step on the
entropy, in the Bures–Wasserstein space.

Split the loss of a Gaussian q = N(m, Σ) (per unit weight) as L(q) = KL(q ‖ p) + const
= E_q[V] − H(q), V = −log p̃, H(q) = ½ log det Σ + const. Diao, Balasubramanian, Chewi & Salim
(2023, "Forward-backward Gaussian variational inference via JKO in the Bures-Wasserstein space",
ICML, Algorithm 1) step

    forward:   m' = m − h E_q[∇V],   Σ½ = (I − hĤ) Σ (I − hĤ),   Ĥ = E_q[∇²V],
    backward:  Σ' = ½ (Σ½ + 2hI + [Σ½ (Σ½ + 4hI)]^½),

the backward step being argmin over Gaussians of −H(q) + W₂²(q, q½) / 2h in closed form; its
eigenvalues ((s + √(s² + 4h)) / 2)², s² an eigenvalue of Σ½, are ≥ h, so Σ' ≻ 0 for every h > 0.
For V convex and L-smooth the scheme needs h ≤ 1/L; its fixed point is the Gaussian VI optimum
(E_q[∇V] = 0, Σ⁻¹ = Ĥ) while I − hĤ ⪰ 0 there, i.e. h λ_max(Ĥ) ≤ 1.

From SVI's gradients: H does not depend on m, so E_q[∇V] = ∇ₘL; ∂H/∂Σ = ½Σ⁻¹ and
∂E_q[V]/∂Σ = ½E_q[∇²V] (Price's theorem; Opper & Archambeau 2009, "The variational Gaussian
approximation revisited", Neural Comput.), so Ĥ = 2 ∂L/∂Σ + Σ⁻¹ (:func:`energy_hessian`). A
reparameterized estimate of L evaluates log q(m + Lε) = −½|ε|² − log |det L| + const, whose
gradient is the entropy's exactly, so Ĥ carries only the Monte Carlo noise of the energy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gaussian import tril_of_root


def energy_hessian(scale_tril: Tensor, grad_cov: Tensor) -> Tensor:
    """Ĥ = 2 sym(∂L/∂Σ) + Σ⁻¹, the estimate of E_q[∇²V] that a gradient of L = E_q[V] − H(q) in Σ
    carries (batched; ``grad_cov`` per unit weight, e.g. from
    :func:`~pyro_natgrad.wasserstein.cholesky_to_cov_gradient`)."""
    return grad_cov + grad_cov.mT + torch.cholesky_inverse(scale_tril)


def energy_hessian_diag(scale: Tensor, grad_scale: Tensor) -> Tensor:
    """diag E_q[∇²V] ≈ (∂L/∂σ + 1/σ) / σ for q = N(m, diag σ²): ∂E_q[V]/∂σᵢ = σᵢ E[∂ᵢ²V] and
    ∂H/∂σᵢ = 1/σᵢ (elementwise, per unit weight)."""
    return (grad_scale + scale.reciprocal()) / scale


def entropy_prox(s: Tensor, h: Tensor | float) -> Tensor:
    """argmin_{σ > 0} −log σ + (σ − s)² / 2h = ½(s + √(s² + 4h)) for real s and h > 0, computed
    without cancellation for s < 0 as 2h / (√(s² + 4h) − s). It is the backward step on one
    axis: a scale σ of a 1-D Gaussian moves in W₂ as a point of ℝ (W₂² = δm² + δσ²)."""
    root = torch.sqrt(s.square() + 4 * h)
    return torch.where(s >= 0, 0.5 * (s + root), 2 * h / (root - s))


def forward_backward_step(loc: Tensor, scale_tril: Tensor, grad_loc: Tensor, hess: Tensor,
                          h: Tensor | float, frame: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One forward–backward step (Diao et al. 2023) from q = N(m, LLᵀ): (m', L') with L' lower
    triangular, positive diagonal, L'L'ᵀ = Σ' of the module docstring. Batched over leading dims.

    ``grad_loc`` = E_q[∇V] (= ∇ₘL), ``hess`` = Ĥ symmetric (:func:`energy_hessian`), both per
    unit weight; ``h`` finite and > 0, a number or a tensor broadcasting against the batch shape.
    With an invertible ``frame`` F the step is taken in the coordinates y = F⁻¹x, i.e. in the W₂
    geometry of the cost |F⁻¹(x − x')|²: m' = m − h FFᵀ E[∇V], Ĥ read as FᵀĤF, the factor as
    F⁻¹L; the fixed point is unchanged (KL is invariant under affine maps). F = L takes it where q
    is standard normal. With (I − hĤ)L = U diag(s) Vᵀ (SVD), Σ½ = U diag(s²) Uᵀ and
    Σ' = U diag(σ')² Uᵀ, σ' = :func:`entropy_prox` (s, h): neither Σ nor a matrix square root is
    formed, and L' comes from the QR of (U diag σ')ᵀ.
    """
    h = torch.as_tensor(h, dtype=loc.dtype, device=loc.device)
    if not bool((torch.isfinite(h) & (h > 0)).all()):
        raise ValueError(f"forward_backward_step: h must be finite and > 0, got {h}")
    factor, grad = scale_tril, grad_loc.unsqueeze(-1)
    if frame is not None:
        grad, hess = frame.mT @ grad, frame.mT @ hess @ frame
        factor = torch.linalg.solve(frame, scale_tril)
    eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=loc.device)
    u, s, _ = torch.linalg.svd((eye - h[..., None, None] * hess) @ factor)
    root = u * entropy_prox(s, h[..., None]).unsqueeze(-2)
    step = h[..., None, None] * grad
    if frame is not None:
        root, step = frame @ root, frame @ step
    return loc - step.squeeze(-1), tril_of_root(root)


def forward_backward_step_diag(loc: Tensor, scale: Tensor, grad_loc: Tensor, grad_scale: Tensor,
                               h: Tensor | float) -> tuple[Tensor, Tensor]:
    """The forward–backward step for q = N(m, diag σ²), elementwise: with ∂E/∂σ = ∂L/∂σ + 1/σ,
    m' = m − h ∂L/∂m, σ' = :func:`entropy_prox` (σ − h ∂E/∂σ, h). ``h`` > 0 broadcasts against
    ``loc`` (a per-coordinate h is a diagonal metric). The forward σ½ = σ − h ∂E/∂σ keeps its sign
    (the proximal step in the Euclidean (m, σ) coordinates of diagonal Gaussians), so the fixed
    point ∂E/∂σ = 1/σ holds for every h, not only for h·E[∂ᵢ²V] ≤ 1 as with |σ½|."""
    h = torch.as_tensor(h, dtype=loc.dtype, device=loc.device)
    if not bool((torch.isfinite(h) & (h > 0)).all()):
        raise ValueError(f"forward_backward_step_diag: h must be finite and > 0, got {h}")
    half = scale - h * (grad_scale + scale.reciprocal())
    return loc - h * grad_loc, entropy_prox(half, h)
