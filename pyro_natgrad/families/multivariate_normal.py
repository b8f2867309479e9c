"""Multivariate normal N(m, Σ): T(z) = (z, zzᵀ), η = (Λm, -½Λ) with Λ = Σ⁻¹, μ = (m, Σ + mmᵀ),
A(η) = ½ mᵀΛm - ½ log|Λ| = -¼ η₁ᵀη₂⁻¹η₁ - ½ log|-2η₂| (Wainwright & Jordan 2008, Example 3.3).

η₂ is a full d×d matrix of which only the symmetric part matters (<η₂, zzᵀ> = <sym η₂, zzᵀ>):
every map symmetrizes it, and the Fisher over the d + d² flattened coordinates is singular along
antisymmetric directions. ``MultivariateNormal(loc, scale_tril)`` and
``LowRankMultivariateNormal(loc, cov_factor, cov_diag)`` share this geometry and differ only in
their arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributions import LowRankMultivariateNormal as _LowRankMultivariateNormal
from torch.distributions import MultivariateNormal as _MultivariateNormal

from .base import ExponentialFamily, Params


def _outer(a: Tensor, b: Tensor) -> Tensor:
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def _precision(eta2: Tensor) -> Tensor:
    """Λ = -2 sym(η₂) = -(η₂ + η₂ᵀ)."""
    return -(eta2 + eta2.mT)


def precision_to_scale_tril(precision: Tensor) -> Tensor:
    """Lower Cholesky factor L of Σ = Λ⁻¹ without inverting Λ.

    With J the flip of both axes, the Cholesky factor L_f of JΛJ gives Λ = UUᵀ with U = J L_f J
    upper triangular, so Σ = U⁻ᵀU⁻¹ and L = U⁻ᵀ = (Uᵀ)⁻¹: one Cholesky, one triangular solve.
    """
    u_t = torch.linalg.cholesky(precision.flip(-2, -1)).flip(-2, -1).mT
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    return torch.linalg.solve_triangular(u_t, eye.expand_as(u_t), upper=False)


def natural_to_loc_tril(eta1: Tensor, eta2: Tensor) -> Params:
    """(m, L) with LLᵀ = Σ = Λ⁻¹, Λ = -2 sym(η₂), m = Σ η₁."""
    tril = precision_to_scale_tril(_precision(eta2))
    loc = (tril @ (tril.mT @ eta1.unsqueeze(-1))).squeeze(-1)
    return loc, tril


def loc_tril_to_natural(loc: Tensor, tril: Tensor) -> Params:
    """η = (Λm, -½Λ) with Λ = (LLᵀ)⁻¹ from the Cholesky factor (LAPACK potri)."""
    precision = torch.cholesky_inverse(tril)
    return (precision @ loc.unsqueeze(-1)).squeeze(-1), -0.5 * precision


def loc_cov_to_mean(loc: Tensor, cov: Tensor) -> Params:
    """μ = (m, Σ + mmᵀ)."""
    return loc, cov + _outer(loc, loc)


def mean_to_loc_tril(mu1: Tensor, mu2: Tensor) -> Params:
    """(m, L) with m = μ₁ and LLᵀ = sym(μ₂) - μ₁μ₁ᵀ."""
    cov = 0.5 * (mu2 + mu2.mT) - _outer(mu1, mu1)
    return mu1, torch.linalg.cholesky(cov)


def cholesky_to_cov_gradient(scale_tril: Tensor, grad_tril: Tensor) -> Tensor:
    """The symmetric ∂L/∂Σ from ∂L/∂L for L = cholesky(Σ), by the Cholesky reverse rule
    ∂L/∂Σ = sym(L⁻ᵀ Φ(Lᵀ ∂L/∂L) L⁻¹), Φ = lower triangle with the diagonal halved (Murray 2016,
    "Differentiation of the Cholesky decomposition", arXiv:1602.07527): triangular solves with L
    only, Σ is never formed. Only the lower triangle of ``grad_tril`` is read."""
    p = scale_tril.mT @ grad_tril.tril()
    phi = p.tril() - 0.5 * torch.diag_embed(p.diagonal(dim1=-2, dim2=-1))
    left = torch.linalg.solve_triangular(scale_tril.mT, phi, upper=True)  # L⁻ᵀΦ
    out = torch.linalg.solve_triangular(scale_tril.mT, left.mT, upper=True).mT  # L⁻ᵀΦL⁻¹
    return 0.5 * (out + out.mT)


def scaled_low_rank_kl(p: Params, q: Params) -> tuple[Tensor, Tensor]:
    """(KL(p ‖ q), KL(q ‖ p)) for p = N(m, S(I + PPᵀ)S) and q = N(m', S'(I + P'P'ᵀ)S') given as
    (m, s, P) and (m', s', P'), S = diag s (AutoLowRankMultivariateNormal's Σ = WWᵀ + diag D
    with W = SP, D = s²), in O(d r²), neither Σ formed: with A = S'⁻¹S = diag a, C = I + PᵀP,
    C' = I + P'ᵀP' = L'L'ᵀ and e = S'⁻¹(m' − m), by Woodbury and the determinant lemma,
    2 KL(p ‖ q) = Σaᵢ² + |AP|² − tr(C'⁻¹(AP')ᵀAP') − |L'⁻¹P'ᵀ(AP, e)|² + |e|² − d
    + 2Σ log(s'ᵢ/sᵢ) + log|C'| − log|C|, and KL(q ‖ p) the same with the roles swapped (both
    share the two r × r factorizations). Leading dimensions are a batch."""
    chol_p, chol_q = _capacitance(p[2]), _capacitance(q[2])
    log_ratio = 2 * (q[1].log() - p[1].log()).sum(-1) + _logdet(chol_q) - _logdet(chol_p)
    return (0.5 * (_spread(p, q, chol_q) + log_ratio),
            0.5 * (_spread(q, p, chol_p) - log_ratio))


def _capacitance(factor: Tensor) -> Tensor:
    """The Cholesky factor of I + PᵀP."""
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return torch.linalg.cholesky(eye + factor.mT @ factor)


def _spread(p: Params, q: Params, chol_q: Tensor) -> Tensor:
    """2 KL(p ‖ q) less its log-determinant terms (:func:`scaled_low_rank_kl`)."""
    m, s, factor = p
    m2, s2, factor2 = q
    a = (s / s2).unsqueeze(-1)
    e = ((m2 - m) / s2).unsqueeze(-1)
    scaled2 = a * factor2  # AP'
    projected = torch.linalg.solve_triangular(
        chol_q, factor2.mT @ torch.cat([a * factor, e], -1), upper=False)
    trace = torch.cholesky_solve(scaled2.mT @ scaled2, chol_q).diagonal(dim1=-2, dim2=-1).sum(-1)
    return (a.square().sum((-2, -1)) + (a * factor).square().sum((-2, -1)) - trace
            - projected.square().sum((-2, -1)) + e.square().sum((-2, -1)) - s.shape[-1])


def _logdet(tril: Tensor) -> Tensor:
    """log|LLᵀ| of a Cholesky factor L."""
    return 2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)


class _DenseGaussian(ExponentialFamily):
    """The η / μ geometry of a d-dimensional Gaussian; subclasses add their arguments."""

    event_dims = (1, 2)

    def event_rank(self) -> int:
        return 1

    def natural_to_mean(self, eta1: Tensor, eta2: Tensor) -> Params:
        loc, tril = natural_to_loc_tril(eta1, eta2)
        return loc_cov_to_mean(loc, tril @ tril.mT)

    def mean_to_natural(self, mu1: Tensor, mu2: Tensor) -> Params:
        return loc_tril_to_natural(*mean_to_loc_tril(mu1, mu2))

    def log_partition(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        """A = ½|L_Λ⁻¹η₁|² - Σᵢ log (L_Λ)ᵢᵢ with L_Λ the Cholesky factor of Λ."""
        chol = torch.linalg.cholesky(_precision(eta2))
        v = torch.linalg.solve_triangular(chol, eta1.unsqueeze(-1), upper=False).squeeze(-1)
        return 0.5 * v.square().sum(-1) - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        return z, _outer(z, z)

    def in_domain(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        """Λ = -2 sym(η₂) positive definite (its Cholesky succeeds) and η finite."""
        finite = torch.isfinite(eta1).all(-1) & torch.isfinite(eta2).all((-2, -1))
        precision = torch.nan_to_num(_precision(eta2), nan=0.0, posinf=0.0, neginf=0.0)
        return finite & (torch.linalg.cholesky_ex(precision).info == 0)

    def translate(self, eta: Params, shift: Tensor) -> Params:
        eta1, eta2 = eta
        return eta1 + (_precision(eta2) @ shift.unsqueeze(-1)).squeeze(-1), eta2

    def retract(self, eta: Params, step: Params) -> Params:
        """Lin, Schmidt & Khan (2020, ICML), eq. 7: with Λ = -2 sym(η₂) and the plain precision
        step G = -2 sym(δ₂), Λ' = Λ + G + ½GΛ⁻¹G = ½Λ + ½(Λ + G)Λ⁻¹(Λ + G) is positive definite
        for every G, and the mean moves by -Λ'⁻¹ρ∇ₘL as in the plain step; in natural
        coordinates η' = η + δ + (C m, -½C) with C = ½GΛ⁻¹G and m = Λ⁻¹η₁."""
        (eta1, eta2), (d1, d2) = eta, step
        chol = torch.linalg.cholesky(_precision(eta2))
        g = _precision(d2)
        half = torch.linalg.solve_triangular(chol, g, upper=False)  # L⁻¹G, so C = ½(L⁻¹G)ᵀ(L⁻¹G)
        c = 0.5 * half.mT @ half
        m = torch.cholesky_solve(eta1.unsqueeze(-1), chol)
        return eta1 + d1 + (c @ m).squeeze(-1), eta2 + d2 - 0.5 * c

    def fisher(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        """Cov[(z, zzᵀ)] by Isserlis' theorem, with P = Σ + mmᵀ:

        Cov(zᵢ, zⱼ) = Σᵢⱼ,  Cov(zᵢ, z_k z_l) = Σᵢₖ m_l + Σᵢₗ m_k,
        Cov(zᵢzⱼ, z_k z_l) = Pᵢₖ Pⱼₗ + Pᵢₗ Pⱼₖ - 2 mᵢ mⱼ m_k m_l.
        """
        loc, tril = natural_to_loc_tril(eta1, eta2)
        cov = tril @ tril.mT
        second = cov + _outer(loc, loc)
        d = loc.shape[-1]
        c12 = torch.einsum("...ik,...l->...ikl", cov, loc)
        c12 = (c12 + c12.transpose(-2, -1)).reshape(c12.shape[:-2] + (d * d,))
        mm = _outer(loc, loc)
        c22 = (torch.einsum("...ik,...jl->...ijkl", second, second)
               + torch.einsum("...il,...jk->...ijkl", second, second)
               - 2 * torch.einsum("...ij,...kl->...ijkl", mm, mm))
        c22 = c22.reshape(c22.shape[:-4] + (d * d, d * d))
        top = torch.cat([cov, c12], -1)
        bottom = torch.cat([c12.mT, c22], -1)
        return torch.cat([top, bottom], -2)

    def param_event_shapes(self, flat_size: int) -> tuple[torch.Size, ...]:
        """k = d + d² flattened coordinates: η₁ of shape (d,), η₂ of shape (d, d)."""
        d = round((math.sqrt(1 + 4 * flat_size) - 1) / 2)
        if d + d * d != flat_size:
            raise ValueError(f"{flat_size} is not d + d² for any integer d: not a flattened "
                             f"{type(self).__name__} parameter")
        return torch.Size((d,)), torch.Size((d, d))


class MultivariateNormal(_DenseGaussian):
    """Full-covariance Gaussian with arguments (loc, scale_tril)."""

    name = "MultivariateNormal"
    dist_class = _MultivariateNormal
    arg_names = ("loc", "scale_tril")
    location_split = True

    def args_to_natural(self, loc: Tensor, scale_tril: Tensor) -> Params:
        return loc_tril_to_natural(loc, scale_tril)

    def natural_to_args(self, eta1: Tensor, eta2: Tensor) -> Params:
        return natural_to_loc_tril(eta1, eta2)

    def args_to_mean(self, loc: Tensor, scale_tril: Tensor) -> Params:
        return loc_cov_to_mean(loc, scale_tril @ scale_tril.mT)

    def mean_to_args(self, mu1: Tensor, mu2: Tensor) -> Params:
        return mean_to_loc_tril(mu1, mu2)

    def mean_gradient(self, args: Params, d_args: Params) -> Params:
        """With m = μ₁, Σ = μ₂ − μ₁μ₁ᵀ = LLᵀ: ∂L/∂μ₂ = G = ∂L/∂Σ (Cholesky reverse rule), and
        ∂L/∂μ₁ = ∂L/∂m − 2Gm; Σ is never recomputed from μ₂ − μ₁μ₁ᵀ (which cancels when
        |m|² ≫ λ_min(Σ))."""
        (loc, tril), (d_loc, d_tril) = args, d_args
        g = cholesky_to_cov_gradient(tril, d_tril)
        return d_loc - 2 * (g @ loc.unsqueeze(-1)).squeeze(-1), g


class LowRankMultivariateNormal(_DenseGaussian):
    """Gaussian with covariance WWᵀ + diag(D), arguments (loc, cov_factor W, cov_diag D).

    The maps from arguments go to the dense η and μ; the reverse maps do not exist, because a
    rank-r factor plus a diagonal cannot represent an arbitrary d×d precision (``full_rank`` False).
    """

    name = "LowRankMultivariateNormal"
    dist_class = _LowRankMultivariateNormal
    arg_names = ("loc", "cov_factor", "cov_diag")
    full_rank = False
    rotation_gauge = 1  # Σ = WWᵀ + D: W and WQ give the same distribution

    @staticmethod
    def _cov(cov_factor: Tensor, cov_diag: Tensor) -> Tensor:
        return cov_factor @ cov_factor.mT + torch.diag_embed(cov_diag)

    def args_to_natural(self, loc: Tensor, cov_factor: Tensor, cov_diag: Tensor) -> Params:
        return loc_tril_to_natural(loc, torch.linalg.cholesky(self._cov(cov_factor, cov_diag)))

    def args_to_mean(self, loc: Tensor, cov_factor: Tensor, cov_diag: Tensor) -> Params:
        return loc_cov_to_mean(loc, self._cov(cov_factor, cov_diag))

    def natural_to_args(self, eta1: Tensor, eta2: Tensor) -> Params:
        raise NotImplementedError(self._no_inverse())

    def args_fisher_product(self, args: Params, v: Params) -> Params:
        """F·v in (loc, W, D) in O(d r²): :class:`LowRankFisher`'s product."""
        return LowRankFisher(args)(v)

    def args_fisher_operator(self, args: Params) -> LowRankFisher:
        """The Fisher in (loc, W, D) at fixed ``args``, its Woodbury factors computed once for
        any number of products (and a preconditioner for solves with it)."""
        return LowRankFisher(args)

    def mean_to_args(self, mu1: Tensor, mu2: Tensor) -> Params:
        raise NotImplementedError(self._no_inverse())

    @staticmethod
    def _no_inverse() -> str:
        return ("LowRankMultivariateNormal cannot represent an arbitrary precision: a covariance "
                "WWᵀ + diag(D) with a rank-r factor W has fewer degrees of freedom than a dense "
                "d×d matrix, so natural or mean parameters have no low-rank arguments; step in "
                "the guide's own parameters with this family's Fisher instead")


class LowRankFisher:
    """The Fisher of N(loc, WWᵀ + diag(D)) in its arguments (loc, W, D) at fixed arguments, as a
    product v ↦ F·v in O(d r²), neither Σ nor Σ⁻¹ formed, the rank-sized factorization done once
    here. The Gaussian Fisher is block-diagonal, F_loc = Σ⁻¹ and F_ab = ½ tr(Σ⁻¹ ∂ₐΣ Σ⁻¹ ∂_bΣ)
    for covariance arguments (Mardia & Marshall 1984, Biometrika 71, eq. 5), so with
    dΣ = VWᵀ + WVᵀ + diag(v_D) and G = Σ⁻¹ dΣ Σ⁻¹: (Fv)_loc = Σ⁻¹ v_loc, (Fv)_W = G W,
    (Fv)_D = ½ diag G. Σ⁻¹ = D⁻¹ − RRᵀ by Woodbury, R = D⁻¹W L_C⁻ᵀ with L_C the Cholesky factor
    of the capacitance C = I + WᵀD⁻¹W (r × r), and
    diag(Σ⁻¹ diag(v_D) Σ⁻¹)ᵢ = v_Dᵢ(D⁻²ᵢ − 2D⁻¹ᵢ|Rᵢ|²) + Rᵢᵀ(Rᵀ diag(v_D) R)Rᵢ. Tangents ``v`` may
    carry extra leading dimensions (a batch of tangents), which broadcast against the arguments.
    """

    def __init__(self, args: Params):
        _, self.w, self.cov_diag = (a.detach() for a in args)
        self.inv_d = self.cov_diag.reciprocal()
        u = self.w * self.inv_d.unsqueeze(-1)
        eye = torch.eye(self.w.shape[-1], dtype=self.w.dtype, device=self.w.device)
        chol = torch.linalg.cholesky(eye + self.w.mT @ u)
        self.r = torch.linalg.solve_triangular(chol, u.mT, upper=False).mT
        self.p = self.solve(self.w)  # Σ⁻¹W
        self.k = self.w.mT @ self.p  # WᵀΣ⁻¹W

    def solve(self, x: Tensor) -> Tensor:
        """Σ⁻¹x for x of shape (…, d, k)."""
        return self.inv_d.unsqueeze(-1) * x - self.r @ (self.r.mT @ x)

    def cov(self, x: Tensor) -> Tensor:
        """Σx for x of shape (…, d, k)."""
        return self.cov_diag.unsqueeze(-1) * x + self.w @ (self.w.mT @ x)

    def __call__(self, v: Params) -> Params:
        v_loc, v_w, v_d = v
        w, p, r, inv_d = self.w, self.p, self.r, self.inv_d
        q = self.solve(v_w)
        g_w = self.solve(v_w @ self.k + w @ (v_w.mT @ p) + v_d.unsqueeze(-1) * p)
        quad = ((r @ (r.mT @ (v_d.unsqueeze(-1) * r))) * r).sum(-1)
        diag_g = (2 * (q * p).sum(-1) + v_d * inv_d * (inv_d - 2 * r.square().sum(-1)) + quad)
        return self.solve(v_loc.unsqueeze(-1)).squeeze(-1), g_w, 0.5 * diag_g

    def preconditioner(self, damping: float) -> Callable[[Params], Params]:
        """An approximate inverse v ↦ (F + λI)⁻¹v, λ = ``damping`` > 0, for a preconditioned
        conjugate-gradient solve: exact on loc, (Σ⁻¹ + λI)⁻¹; on W the Kronecker block
        K ⊗ Σ⁻¹ of F_WW (K = WᵀΣ⁻¹W; F_WW·V = Σ⁻¹VK + Σ⁻¹WVᵀΣ⁻¹W, the second term dropped as
        in Tran, Nguyen & Dao 2020, "A fast and efficient natural gradient for the factor model
        covariance", and the W–D coupling too), inverted exactly with its damping in K's
        eigenbasis K = QΛQᵀ: column j of VQ solves (λⱼΣ⁻¹ + λI)x = Σ(λⱼI + λΣ)⁻¹, each by
        Woodbury with an r × r capacitance; on D the diagonal of F_DD = ½ Σ⁻¹∘Σ⁻¹. Set-up
        O(d r³), each application O(d r²). Unbatched arguments only."""
        if not damping > 0:
            raise ValueError(f"LowRankFisher.preconditioner: damping must be > 0, got "
                             f"{damping!r}")
        if self.w.dim() != 2:
            raise ValueError(f"LowRankFisher.preconditioner: unbatched arguments only, got W of "
                             f"shape {tuple(self.w.shape)}")
        w, lam = self.w, damping
        eigenvalues, basis = torch.linalg.eigh(self.k)
        eigenvalues = eigenvalues.clamp_min(0)
        shifts = torch.cat([eigenvalues.new_ones(1), eigenvalues])  # 1 for loc, λⱼ for W
        # (aI + λΣ)⁻¹ = E⁻¹ − E⁻¹W(I/λ + WᵀE⁻¹W)⁻¹WᵀE⁻¹ with E = aI + λD, one per shift a
        inv_e = (shifts.unsqueeze(-1) + lam * self.cov_diag).reciprocal()  # (r + 1, d)
        eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
        capacitance = torch.linalg.cholesky(eye / lam + (w.mT * inv_e.unsqueeze(-2)) @ w)
        diag_inverse = self.inv_d - self.r.square().sum(-1)  # diag Σ⁻¹
        jacobi = 0.5 * diag_inverse.square() + lam

        def apply(v: Params) -> Params:
            v_loc, v_w, v_d = v
            columns = torch.cat([v_loc.unsqueeze(-1), v_w @ basis], -1).mT  # (r + 1, d)
            a = inv_e * columns
            t = torch.cholesky_solve((a @ w).unsqueeze(-1), capacitance).squeeze(-1)
            x = self.cov((a - inv_e * (t @ w.mT)).mT)  # Σ(aI + λΣ)⁻¹ per column
            return x[..., 0], x[..., 1:] @ basis.mT, v_d / jacobi

        return apply
