"""The Bures–Wasserstein geometry of Gaussians.

On N(m, Σ) the Wasserstein-2 distance is W₂² = |m − m'|² + tr(Σ + Σ' − 2(Σ^½Σ'Σ^½)^½); its
Riemannian gradient of a function L(m, Σ) is the affine map x ↦ ∇ₘL + 2 ∇_ΣL (x − m), and
following it for time h gives m' = m − h ∇ₘL, Σ' = (I − hM) Σ (I − hM) with M = 2 sym(∇_ΣL)
(Lambert, Chewi, Bach, Bonnabel & Rigollet 2022, "Variational inference via Wasserstein gradient
flows", NeurIPS, §3; Diao, Balasubramanian, Chewi & Salim 2023, "Forward-backward Gaussian
variational inference via JKO in the Bures–Wasserstein space", ICML, eq. 3). Σ' is positive
semidefinite for every h and definite while I − hM is invertible. For a 1-D Gaussian the metric
is Euclidean in (m, σ) and the step is σ' = σ − h ∂L/∂σ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def bures_step(loc: Tensor, cov: Tensor, grad_loc: Tensor, grad_cov: Tensor,
               h: float) -> tuple[Tensor, Tensor]:
    """(m − h∇ₘL, (I − hM)Σ(I − hM)) with M = ∇_ΣL + ∇_ΣLᵀ, batched over leading dims."""
    eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=loc.device)
    a = eye - h * (grad_cov + grad_cov.mT)
    return loc - h * grad_loc, a @ cov @ a.mT


def gaussian_vi_flow(log_density: Callable[[Tensor], Tensor], loc: Tensor, cov: Tensor,
                     h: float, num_steps: int, num_samples: int = 64,
                     hessian: str = "exact",
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Gaussian VI of an unnormalized density p as the Bures–Wasserstein gradient flow of
    KL(q ‖ p) (Lambert et al. 2022, Algorithm 1): with z ~ N(m, Σ),
    m ← m + h E[∇log p(z)],  Σ ← (I − hM)Σ(I − hM),  M = −E[∇²log p(z)] − Σ⁻¹.

    ``hessian="exact"`` differentiates ∇log p; ``"stein"`` uses only gradients, by Stein's
    lemma E[∇²log p(z)] = Σ⁻¹ E[(z − m)∇log p(z)ᵀ] (symmetrized). ``log_density`` maps a batch
    (S, d) to (S,).
    """
    if hessian not in ("exact", "stein"):
        raise ValueError(f"hessian must be 'exact' or 'stein', got {hessian!r}")
    if not (h > 0 and num_steps >= 0 and num_samples >= 1):
        raise ValueError(f"need h > 0, num_steps >= 0, num_samples >= 1; got {h}, {num_steps}, "
                         f"{num_samples}")
    d = loc.shape[-1]
    for _ in range(num_steps):
        chol = torch.linalg.cholesky(cov)
        eps = torch.randn(num_samples, d, dtype=loc.dtype, device=loc.device,
                          generator=generator)
        z = (loc + eps @ chol.mT).detach().requires_grad_()
        with torch.enable_grad():
            grad = torch.autograd.grad(log_density(z).sum(), z, create_graph=hessian == "exact")[0]
            if hessian == "exact":
                rows = [torch.autograd.grad(grad[:, i].sum(), z, retain_graph=True)[0]
                        for i in range(d)]
                expected_hessian = torch.stack(rows, 1).mean(0)
            else:
                outer = (z - loc).mT @ grad / num_samples
                expected_hessian = torch.cholesky_solve(outer, chol)
        expected_hessian = 0.5 * (expected_hessian + expected_hessian.mT).detach()
        precision = torch.cholesky_inverse(chol)
        # bures_step with ∇ₘL = −E[∇log p] and 2∇_ΣL = M
        loc, cov = bures_step(loc, cov, -grad.detach().mean(0),
                              -0.5 * (expected_hessian + precision), h)
    return loc, cov
