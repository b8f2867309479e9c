"""The Fisher of AutoLowRankMultivariateNormal's q in the guide's own params, with its products and
a preconditioner in closed form.

Pyro's guide has params θ = (loc, u, P): s = t(u) (the scale's transform, elementwise),
W = diag(s)P, D = s², q = N(loc, WWᵀ + diag(D)) (:class:`~pyro_natgrad.guides.ScaledLowRank`).
Its Fisher is F_θ = Jᵀ F J, with F the Gaussian's Fisher in (loc, W, D)
(:class:`~pyro_natgrad.families.multivariate_normal.LowRankFisher`, factored once) and J the
Jacobian of θ ↦ (loc, W, D): J(v_loc, v_u, v_P) = (v_loc, diag(s)v_P + diag(s'v_u)P, 2ss'v_u),
Jᵀ(w_loc, w_W, w_D) = (w_loc, s'∘(rowsum(w_W∘P) + 2s∘w_D), diag(s)w_W), s' = dt/du. A product
is O(d r²), no autograd graph.

With C = I + PPᵀ the covariance is Σ = diag(s) C diag(s), which gives the preconditioner of
:meth:`ScaledLowRankFisher.preconditioner` (blocks in θ, cross terms dropped): on loc the exact
(Σ⁻¹ + μI)⁻¹; on P the Kronecker part C⁻¹ ⊗ K of F_PP (K = PᵀC⁻¹P = G(I + G)⁻¹, G = PᵀP; the
term C⁻¹PVᵀC⁻¹P dropped as in Tran, Nguyen & Dao 2020, "A fast and efficient natural gradient
for the factor model covariance"), inverted exactly with its damping in G's eigenbasis, where
(κ_j C⁻¹ + μI)⁻¹ = C(κ_j I + μC)⁻¹ is diagonal-plus-rank-r; on u the exact diagonal
(s'ᵢ/sᵢ)²(1 + Cᵢᵢ(C⁻¹)ᵢᵢ) (with dΣ from a log-scale a = log s: Σ⁻¹dΣ = diag(s)⁻¹(C⁻¹EᵢC + Eᵢ)
diag(s) for a change of aᵢ, Eᵢ = eᵢeᵢᵀ, and ½tr((C⁻¹EᵢC + Eᵢ)²) = 1 + Cᵢᵢ(C⁻¹)ᵢᵢ). Set-up
O(d r² + r³), each application O(d r²).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..families.multivariate_normal import LowRankFisher
from ..pullback import ScaledLowRankCoordinates
from .linalg import rotation_coefficients

__all__ = ["ScaledLowRankFisher"]


class ScaledLowRankFisher:
    """m·F_θ of one unbatched AutoLowRankMultivariateNormal site at fixed params (module
    docstring), on the flat vectors of ``coords``.

    :param coords: the site's params θ = (loc, u, P) at fixed values
        (:class:`~pyro_natgrad.pullback.ScaledLowRankCoordinates`).
    :param multiplicity: the site's multiplicity m.
    :param gauge_free: the right-hand sides of solves have no component along P's rotations
        {(0, 0, PA) : Aᵀ = −A} (the Fisher's null space; removed by
        :class:`~pyro_natgrad.optim.transforms.GaugeProjection`), so neither has the solution:
        the preconditioner then projects them out too, so that every conjugate-gradient iterate
        stays free of them (the block preconditioner alone does not keep that subspace).
    """

    def __init__(self, coords: ScaledLowRankCoordinates, multiplicity: float = 1.0,
                 gauge_free: bool = False):
        self.coords = coords
        self.multiplicity, self.gauge_free = float(multiplicity), gauge_free
        self.s, self.ds, self.p = self.coords.s, self.coords.ds, self.coords.p
        self.operator = LowRankFisher(self.coords.args())

    def mvp(self, v: Tensor) -> Tensor:
        """m·Jᵀ F J v (leading dimensions of ``v`` are a batch)."""
        v_loc, v_u, v_p = self.coords.split(v)
        s, ds, p = self.s, self.ds, self.p
        dsv = ds * v_u
        f_loc, f_w, f_d = self.operator((v_loc, s.unsqueeze(-1) * v_p + p * dsv.unsqueeze(-1),
                                         2 * s * dsv))
        out = self.coords.join(f_loc, ds * ((f_w * p).sum(-1) + 2 * s * f_d),
                               s.unsqueeze(-1) * f_w)
        return self.multiplicity * out

    def trace(self) -> Tensor:
        """tr m·F_θ, exact: m[tr Σ⁻¹ + Σᵢ(s'ᵢ/sᵢ)²(1 + Cᵢᵢ(C⁻¹)ᵢᵢ) + (d − tr K) tr K + |C⁻¹P|²_F],
        the diagonals of the three blocks (module docstring; F_WW's diagonal
        Σ⁻¹ᵢᵢK_jj + (Σ⁻¹W)ᵢⱼ² in P's coordinates), with tr K = Σγ/(1 + γ) and
        |C⁻¹P|²_F = Σγ/(1 + γ)² over the eigenvalues γ of PᵀP."""
        s, ds, p = self.s, self.ds, self.p
        gamma, basis = torch.linalg.eigh(p.mT @ p)
        gamma = gamma.clamp_min(0)
        b = p @ basis
        c_inv_ii = 1 - (b.square() / (1 + gamma)).sum(-1)  # (C⁻¹)ᵢᵢ by Woodbury
        c_ii = 1 + p.square().sum(-1)
        k = gamma / (1 + gamma)
        trace_k = k.sum()
        total = ((c_inv_ii / s.square()).sum() + ((ds / s).square() * (1 + c_ii * c_inv_ii)).sum()
                 + (p.shape[-2] - trace_k) * trace_k + (k / (1 + gamma)).sum())
        return self.multiplicity * total

    def preconditioner(self, damping: float) -> Callable[[Tensor], Tensor]:
        """An approximate inverse v ↦ (m·F_θ + λI)⁻¹v, λ = ``damping`` > 0, symmetric positive
        definite (module docstring). With ``gauge_free``, ΠM⁻¹ with Π the projection off P's
        rotations: the residuals it is applied to lie off them already (the right-hand side
        does, and F_θ maps into its range, which is orthogonal to its null space), so this is
        ΠM⁻¹Π, symmetric and positive definite on their complement, to rounding."""
        if not damping > 0:
            raise ValueError(f"ScaledLowRankFisher.preconditioner: damping must be > 0, got "
                             f"{damping!r}")
        m = self.multiplicity
        mu = damping / m  # (m·F + λI)⁻¹ = (F + μI)⁻¹/m
        s, ds, p = self.s, self.ds, self.p
        operator = self.operator
        w, cov_diag = operator.w, operator.cov_diag
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        # loc: (Σ⁻¹ + μI)⁻¹ = Σ(I + μΣ)⁻¹, Woodbury with E = I + μD
        inv_e = (1 + mu * cov_diag).reciprocal()
        loc_capacitance = torch.linalg.cholesky(eye / mu + (w.mT * inv_e) @ w)
        # P: G = PᵀP = QΓQᵀ, K = G(I + G)⁻¹ has eigenvalues κ = γ/(1 + γ) in the same basis
        gram = p.mT @ p
        gamma, basis = torch.linalg.eigh(gram)
        gamma = gamma.clamp_min(0)
        shift = gamma / (1 + gamma) + mu  # a_j = κ_j + μ, per column of VQ
        b = p @ basis  # PQ: PPᵀ = BBᵀ, BᵀB = Γ
        spread = basis / shift @ basis.mT  # Q diag(1/a) Qᵀ
        # u: the exact diagonal, (C⁻¹)ᵢᵢ = 1 − |Bᵢ|²/(1 + γ) by Woodbury
        c_ii = 1 + p.square().sum(-1)
        c_inv_ii = 1 - (b.square() / (1 + gamma)).sum(-1)
        u_diag = (ds / s).square() * (1 + c_ii * c_inv_ii) + mu  # (m·F_uu + λ)/m

        def apply(v: Tensor) -> Tensor:
            v_loc, v_u, v_p = self.coords.split(v)
            a = inv_e * v_loc
            t = torch.cholesky_solve((w.mT @ a).unsqueeze(-1), loc_capacitance).squeeze(-1)
            x_loc = operator.cov((a - inv_e * (w @ t)).unsqueeze(-1)).squeeze(-1)
            # per column ỹ_j of Y = VQ: (a_j I + μBBᵀ)⁻¹ỹ_j = (ỹ_j − B diag(1/(a_j/μ + γ))Bᵀỹ_j)
            # / a_j, then C· = I + BBᵀ and back by Qᵀ; with H = PᵀV, T = QᵀHQ / (a_j/μ + γᵢ),
            # ZQᵀ = V·Q diag(1/a)Qᵀ − P·M, M = Q(T diag(1/a))Qᵀ, and X = ZQᵀ + P(PᵀZQᵀ) where
            # PᵀZQᵀ = H·Q diag(1/a)Qᵀ − G·M: three products of d rows in all
            h = p.mT @ v_p
            t = basis.mT @ h @ basis / (shift.unsqueeze(-2) / mu + gamma.unsqueeze(-1))
            mixed = basis @ (t / shift) @ basis.mT
            right = h @ spread - gram @ mixed - mixed  # X = V·spread + P·right
            if self.gauge_free:  # X − PA with A from PᵀX = H·spread + G·right
                right = right - rotation_coefficients(h @ spread + gram @ right, (gamma, basis))
            return self.coords.join(x_loc, v_u / u_diag, v_p @ spread + p @ right) / m

        return apply
