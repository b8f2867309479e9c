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
from ..fisher.linalg import without_rotations
from ..pullback import ScaledLowRankCoordinates


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

    def _factor_part(self, v_w: Tensor) -> Tensor:
        """Uᵀ(VWᵀ + WVᵀ)U in O(d²r)."""
        low = (self.evecs.mT @ v_w) @ self.w_eig.mT
        return low + low.mT

    def factor_product(self, v_w: Tensor) -> Tensor:
        """S W for δΣ = VWᵀ + WVᵀ alone, in O(d²r): G·(0, V, 0)'s W part."""
        return self.evecs @ ((self._factor_part(v_w) * self.inv_sum) @ self.w_eig)

    def __call__(self, v: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        v_loc, v_w, v_d = v
        u = self.evecs
        diagonal = u.mT @ (v_d.unsqueeze(-1) * u)  # Uᵀ diag(v_D) U
        inner = (self._factor_part(v_w) + diagonal) * self.inv_sum  # UᵀSU
        return (v_loc, u @ (inner @ self.w_eig),
                0.5 * ((u @ inner) * u).sum(-1))


class ScaledLowRankBures:
    """m·G_θ, the Bures–Wasserstein metric of one unbatched AutoLowRankMultivariateNormal site
    pulled back to the guide's own params θ = (loc, u, P) (:class:`BuresMetric` of this site,
    without autograd), on flat vectors in the coordinates' order, with a preconditioner.

    With Σ = diag(s) C diag(s), C = I + PPᵀ (:class:`~pyro_natgrad.pullback.
    ScaledLowRankCoordinates`), a change v_u of the scale's params is a congruence,
    δΣ_u = diag(a)Σ + Σdiag(a) with a = (s'/s)∘v_u, so its Lyapunov solution is S_u = diag(a) in
    closed form; a change v_P of the factor gives δΣ_P = ṼWᵀ + WṼᵀ, Ṽ = diag(s)v_P, solved by
    :class:`LowRankBures` in Σ's eigenbasis (O(d²r)). By the chain rule and vᵀGv = ½⟨S, δΣ⟩ with
    S = S_u + S_P (Takatsu 2011; Bhatia, Jain & Lim 2019):

        (G v)_loc = v_loc,   (G v)_P = diag(s)(S_P W) + diag(s s' v_u) P,
        (G v)_u = ½ (s'/s) ∘ diag δΣ = s'²(1 + |Pᵢ|²) v_u + s s' ∘ rowsum(v_P ∘ P)

    (the u-row of G is ½⟨S_u(eᵢ), δΣ⟩ by symmetry, so diag S, a d × d × d product in (W, D)
    coordinates, is never needed). Set-up: one eigh of Σ, O(d³); each product O(d²r).

    :param gauge_free: right-hand sides carry no component along P's rotations (the metric's null
        space, removed by :class:`~pyro_natgrad.optim.transforms.GaugeProjection`); the
        preconditioner then projects them out of its output too.
    """

    def __init__(self, coords: ScaledLowRankCoordinates, multiplicity: float = 1.0,
                 gauge_free: bool = False):
        self.coords, self.multiplicity = coords, float(multiplicity)
        self.gauge_free = gauge_free
        loc, self.w, self.cov_diag = coords.args()
        self.operator = LowRankBures((loc, self.w, self.cov_diag))
        self.u_diag = coords.ds.square() * (1 + coords.p.square().sum(-1))  # G_uu / m

    def mvp(self, v: Tensor) -> Tensor:
        """m·G_θ v (class docstring; leading dimensions of ``v`` are a batch)."""
        v_loc, v_u, v_p = self.coords.split(v)
        s, ds, p = self.coords.s, self.coords.ds, self.coords.p
        s_w = self.operator.factor_product(s.unsqueeze(-1) * v_p)
        out_p = s.unsqueeze(-1) * s_w + (s * ds * v_u).unsqueeze(-1) * p
        out_u = self.u_diag * v_u + s * ds * (v_p * p).sum(-1)
        return self.multiplicity * self.coords.join(v_loc, out_u, out_p)

    def preconditioner(self, damping: float) -> Callable[[Tensor], Tensor]:
        """An approximate inverse v ↦ (m·G_θ + λI)⁻¹v, λ = ``damping`` > 0, symmetric positive
        definite, T M⁻¹ Tᵀ (μ = λ/m throughout). A change of the scale moves W's row too, nearly
        along P's row where |Pᵢ|² ≫ 1 (Dᵢ ≪ |Wᵢ|²); the change of coordinates
        T(v_loc, ν, v_P) = (v_loc, ν, v_P − diag((s'/s)∘ν)P) makes ν move D alone, by 2ss'ν, and
        M is block-diagonal in the new coordinates. Each block is exact for an isotropic
        diagonal D = cI, where Σ's eigenbasis follows from W's thin SVD W = Q diag(σ) Rᵀ
        (eigenvalues c + σ² on Q, c on its complement), here with λ_a = c_a + σ_a²,
        c_a = q_aᵀDq_a, and Dᵢ for c on row i: on loc 1 + μ (exact for any D); on ν the diagonal
        (2sᵢs'ᵢ)²·½(L_Σ⁻¹Eᵢ)ᵢᵢ + μ, with ½(L_Σ⁻¹Eᵢ)ᵢᵢ = ½[Σ_ab qᵢₐ²qᵢ_b²/(λ_a + λ_b)
        + 2ρᵢΣ_a qᵢₐ²/(λ_a + Dᵢ) + ρᵢ²/(2Dᵢ)], ρᵢ = 1 − |qᵢ|²; on P (the same block as in θ),
        in W = diag(s)P's coordinates, with X = diag(s)⁻¹v_P and XR = QỸ + Z (Z ⟂ Q), Z's row i
        and column b divided by σ_b²/(Dᵢ + λ_b) + μ/sᵢ², and each pair (Ỹ_ab, Ỹ_ba) by the
        2 × 2 block (σ_b, σ_a)(σ_b, σ_a)ᵀ/(λ_a + λ_b) + μ̄, μ̄ = μ·mean(1/s²), whose null vector
        (σ_a, −σ_b) is a rotation of W. Set-up and each application O(d r²)."""
        if not damping > 0:
            raise ValueError(f"ScaledLowRankBures.preconditioner: damping must be > 0, got "
                             f"{damping!r}")
        m = self.multiplicity
        mu = damping / m
        s, ds, p, cov_diag = self.coords.s, self.coords.ds, self.coords.p, self.cov_diag
        ratio = (ds / s).unsqueeze(-1)  # (s'/s) per row
        q, sigma, rt = torch.linalg.svd(self.w, full_matrices=False)  # W = Q diag(σ) Rᵀ
        gamma = sigma.square()
        lam = (q.square() * cov_diag.unsqueeze(-1)).sum(-2) + gamma  # λ_a = q_aᵀDq_a + σ_a²
        q2 = q.square()
        rest = 1 - q2.sum(-1)  # |eᵢ|² off Q's span
        half_lyapunov_diagonal = 0.5 * (  # ½(L_Σ̄ᵢ⁻¹Eᵢ)ᵢᵢ, Σ̄ᵢ: eigenvalues λ on Q, Dᵢ off it
            ((q2 @ (lam.unsqueeze(-1) + lam).reciprocal()) * q2).sum(-1)
            + 2 * rest * (q2 / (lam + cov_diag.unsqueeze(-1))).sum(-1)
            + rest.square() / (2 * cov_diag))
        nu_scale = ((2 * s * ds).square() * half_lyapunov_diagonal + mu).reciprocal()
        mu_s = mu / s.square()
        z_scale = (gamma / (cov_diag.unsqueeze(-1) + lam) + mu_s.unsqueeze(-1)).reciprocal()
        mu_y = mu_s.mean()
        norm = gamma.unsqueeze(-1) + gamma  # |(σ_b, σ_a)|²
        seen = norm > 0
        y_scale = (norm / (lam.unsqueeze(-1) + lam) + mu_y).reciprocal()
        keep_null = 0.0 if self.gauge_free else 1.0

        def factor_block(v_p: Tensor) -> Tensor:
            xr = (v_p / s.unsqueeze(-1)) @ rt.mT
            y = q.mT @ xr
            z = z_scale * (xr - q @ y)
            z = z - q @ (q.mT @ z)
            coefficient = (y * sigma + y.mT * sigma.unsqueeze(-1)) / torch.where(seen, norm, 1)
            along = torch.where(seen, coefficient * sigma, 0)  # the pair's part on (σ_b, σ_a)
            y = along * y_scale + keep_null * torch.where(seen, y - along, y) / mu_y
            return ((q @ y + z) @ rt) / s.unsqueeze(-1)

        def apply(v: Tensor) -> Tensor:
            v_loc, v_u, v_p = self.coords.split(v)
            x_nu = nu_scale * (v_u - ratio.squeeze(-1) * (v_p * p).sum(-1))  # Tᵀ, then M⁻¹
            x_p = factor_block(v_p) - ratio * x_nu.unsqueeze(-1) * p  # then T
            if self.gauge_free:
                x_p = without_rotations(p, x_p)
            return self.coords.join(v_loc / (1 + mu), x_nu, x_p) / m

        return apply
