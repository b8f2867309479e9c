"""The Bures–Wasserstein geometry of Gaussians.

On N(m, Σ) the Wasserstein-2 distance is W₂² = |m − m'|² + tr(Σ + Σ' − 2(Σ^½Σ'Σ^½)^½); its
Riemannian gradient of a function L(m, Σ) is the affine map x ↦ ∇ₘL + 2 ∇_ΣL (x − m), and
following it for time h gives m' = m − h ∇ₘL, Σ' = (I − hM) Σ (I − hM) with M = 2 sym(∇_ΣL)
(Lambert, Chewi, Bach, Bonnabel & Rigollet 2022, "Variational inference via Wasserstein gradient
flows", NeurIPS; Diao, Balasubramanian, Chewi & Salim 2023, "Forward-backward Gaussian
variational inference via JKO in the Bures–Wasserstein space", ICML). Σ' is positive
semidefinite for every h and definite while I − hM is invertible; it is computed on Cholesky
factors. For a 1-D Gaussian the metric is Euclidean in (m, σ) and the step is σ' = σ − h ∂L/∂σ.

The metric itself, for Gaussians N(m(θ), Σ(θ)) whose params cannot be stepped in (m, Σ) directly
(low-rank covariances, shared or amortized params), is pulled back to θ by :class:`BuresMetric`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from ..fisher.autodiff import jacobian, jvp, vjp


def bures_step(loc: Tensor, scale_tril: Tensor, grad_loc: Tensor, grad_cov: Tensor,
               h: float) -> tuple[Tensor, Tensor]:
    """(m − h∇ₘL, L') with L'L'ᵀ = (I − hM) LLᵀ (I − hM), M = ∇_ΣL + ∇_ΣLᵀ, batched.

    L' = :func:`tril_of_root` ((I − hM)L), so Σ is never formed (this matters in float32). A zero
    on the diagonal of L' means I − hM is singular and Σ' only semidefinite.
    """
    eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=loc.device)
    a = eye - h * (grad_cov + grad_cov.mT)
    return loc - h * grad_loc, tril_of_root(a @ scale_tril)


def tril_of_root(root: Tensor) -> Tensor:
    """The lower Cholesky factor L of B Bᵀ for a square B (batched), from the QR decomposition
    Bᵀ = QR: L = Rᵀ diag(sign Rᵢᵢ). B Bᵀ is never formed, so B's condition number, not its square,
    limits the precision; a zero on L's diagonal means B is singular."""
    r = torch.linalg.qr(root.mT, mode="r")[1]
    return r.mT * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)


def gaussian_vi_flow(log_density: Callable[[Tensor], Tensor], loc: Tensor, cov: Tensor,
                     h: float, num_steps: int, num_samples: int = 64,
                     hessian: str = "exact",
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Gaussian VI of an unnormalized density p as the Bures–Wasserstein gradient flow of
    KL(q ‖ p) (Lambert et al. 2022, their Bures–Wasserstein SGD with the expectations taken
    by Monte Carlo): with z ~ N(m, Σ),
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
    chol = torch.linalg.cholesky(cov)
    for step in range(num_steps):
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
        loc, chol = bures_step(loc, chol, -grad.detach().mean(0),
                               -0.5 * (expected_hessian + precision), h)
        diagonal = chol.diagonal(dim1=-2, dim2=-1)
        if not (torch.isfinite(loc).all() and torch.isfinite(chol).all() and (diagonal > 0).all()):
            raise FloatingPointError(
                f"gaussian_vi_flow: step {step + 1} of {num_steps} with h = {h} gave a non-finite "
                "mean or a singular covariance (the explicit step is unstable when h exceeds "
                "~1/curvature of −log p); use a smaller h")
    return loc, chol @ chol.mT


def lyapunov_solve(cov: Tensor, rhs: Tensor) -> Tensor:
    """S with SΣ + ΣS = rhs for symmetric positive definite Σ (batched): with Σ = U diag(λ) Uᵀ,
    S = U [(Uᵀ rhs U)ᵢⱼ / (λᵢ + λⱼ)] Uᵀ."""
    return _lyapunov_eigh(torch.linalg.eigh(cov), rhs)


def _lyapunov_eigh(eig: tuple[Tensor, Tensor], rhs: Tensor) -> Tensor:
    evals, evecs = eig
    inner = evecs.mT @ rhs @ evecs / (evals[..., :, None] + evals[..., None, :])
    return evecs @ inner @ evecs.mT


class BuresMetric:
    """The Bures–Wasserstein metric of Gaussians N(m(θ), Σ(θ)) pulled back to the params θ:

    δθᵀ G δθ = |δm|² + tr(S Σ S) = |δm|² + ½⟨L_Σ(δΣ), δΣ⟩,  L_Σ(δΣ) = S: SΣ + ΣS = δΣ,

    with δm = J_m δθ, δΣ = J_Σ δθ, so G = J_mᵀJ_m + J_Σᵀ ½L_Σ J_Σ, the exact W₂ metric of the
    submanifold of Gaussians the params reach (Takatsu 2011, "Wasserstein geometry of Gaussian
    measures", Osaka J. Math.; Bhatia, Jain & Lim 2019, "On the Bures–Wasserstein distance between
    positive definite matrices", Expo. Math.). In one dimension G is Euclidean in (m, σ).

    ``gaussians``: (m, Σ, weight) per site, m of shape batch + (d,) and Σ batch + (d, d), built
    from ``leaves`` on a live graph; each site's term is multiplied by its weight (copies × ELBO
    scale: the W₂ metric of a product of independent copies is the sum of theirs).
    """

    def __init__(self, gaussians: Sequence[tuple[Tensor, Tensor, float]],
                 leaves: Sequence[Tensor]):
        self.leaves = list(leaves)
        # (output, its metric as a map on output perturbations, weight); constant outputs dropped
        self._terms: list[tuple[Tensor, Callable[[Tensor], Tensor], float]] = []
        for loc, cov, weight in gaussians:
            half_lyapunov = partial(_half_lyapunov, torch.linalg.eigh(cov.detach()))
            for out, lift in ((loc, _identity), (cov, half_lyapunov)):
                if out.requires_grad:
                    self._terms.append((out, lift, weight))

    def mvp(self, v: Tensor) -> Tensor:
        """G v = J_mᵀ(J_m v) + J_Σᵀ ½L_Σ(J_Σ v): forward products by the double-backward trick,
        one backward pass each for the transposes; O(d³) per site, no Jacobian formed."""
        total = torch.zeros_like(v)
        for out, lift, weight in self._terms:
            total = total + weight * vjp(out, self.leaves,
                                         lift(jvp(out, self.leaves, v).reshape(out.shape)))
        return total

    def dense(self) -> Tensor:
        """The matrix G from the Jacobians of m and Σ (small groups only)."""
        size = sum(x.numel() for x in self.leaves)
        total = self.leaves[0].new_zeros(size, size)
        for out, lift, weight in self._terms:
            j = jacobian(out, self.leaves)
            lifted = lift(j.T.reshape((-1,) + out.shape))  # one perturbation per param
            total = total + weight * lifted.reshape(j.shape[1], -1) @ j
        return 0.5 * (total + total.T)

    def diag(self) -> Tensor:
        return self.dense().diagonal()


def _identity(x: Tensor) -> Tensor:
    return x


def _half_lyapunov(eig: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
    return 0.5 * _lyapunov_eigh(eig, x)


class LowRankBures:
    """The Bures–Wasserstein metric of N(loc, WWᵀ + diag D) in its arguments (loc, W, D), as a
    product v ↦ G·v at fixed arguments, in closed form (the :class:`BuresMetric` of this family
    without autograd). With δΣ = VWᵀ + WVᵀ + diag(v_D) and S = L_Σ⁻¹(δΣ), SΣ + ΣS = δΣ,

        vᵀGv = |v_loc|² + ½⟨S, δΣ⟩,   G·v = (v_loc, S W, ½ diag S),

    (Takatsu 2011; Bhatia, Jain & Lim 2019). S is solved in Σ's eigenbasis, Σ = U diag(λ) Uᵀ
    (one eigh, O(d³), here): S = U [(UᵀδΣU)ᵢⱼ / (λᵢ + λⱼ)] Uᵀ, its low-rank part from UᵀV and
    UᵀW in O(d²r). Unlike the Fisher, whose Σ⁻¹ has a Woodbury form, L_Σ⁻¹ of a diagonal-plus-
    low-rank Σ has none: the diagonal perturbation diag(v_D) costs two d × d × d products per
    call (Uᵀ diag(v_D) U and diag S). Tangents ``v`` may carry extra leading dimensions (a batch
    of tangents), which broadcast against the arguments.
    """

    def __init__(self, args: Sequence[Tensor]):
        _, w, cov_diag = (a.detach() for a in args)
        cov = w @ w.mT + torch.diag_embed(cov_diag)
        self.evals, self.evecs = torch.linalg.eigh(cov)
        self.w, self.w_eig = w, self.evecs.mT @ w  # W and UᵀW
        self.inv_sum = (self.evals[..., :, None] + self.evals[..., None, :]).reciprocal()

    def __call__(self, v: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        v_loc, v_w, v_d = v
        u = self.evecs
        low = (u.mT @ v_w) @ self.w_eig.mT  # Uᵀ V Wᵀ U
        diagonal = u.mT @ (v_d.unsqueeze(-1) * u)  # Uᵀ diag(v_D) U
        inner = (low + low.mT + diagonal) * self.inv_sum  # UᵀSU
        return (v_loc, u @ (inner @ self.w_eig),
                0.5 * ((u @ inner) * u).sum(-1))
