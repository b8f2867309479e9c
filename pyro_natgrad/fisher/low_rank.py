"""The Fisher of AutoLowRankMultivariateNormal's q in the guide's own params, with its products and
a preconditioner in closed form.

Pyro's guide has params θ = (loc, u, P): s = t(u) (the scale's transform, elementwise),
W = diag(s)P, D = s², q = N(loc, WWᵀ + diag(D)) (:class:`~pyro_natgrad.guides.ScaledLowRank`).
Its Fisher is F_θ = Jᵀ F J, with F the Gaussian's Fisher in (loc, W, D)
(:class:`~pyro_natgrad.families.multivariate_normal.LowRankFisher`, factored once) and J the
Jacobian of θ ↦ (loc, W, D): J(v_loc, v_u, v_P) = (v_loc, diag(s)v_P + diag(s'v_u)P, 2ss'v_u),
Jᵀ(w_loc, w_W, w_D) = (w_loc, s'∘(rowsum(w_W∘P) + 2s∘w_D), diag(s)w_W), s' = dt/du. A product
is O(d r²), no autograd graph.

With C = I + PPᵀ the covariance is Σ = diag(s) C diag(s). The preconditioner of
:meth:`ScaledLowRankFisher.preconditioner` is M⁻¹ = J⁻¹B⁻¹J⁻ᵀ: a block-diagonal approximation B
of the damped Fisher in (loc, W, D), pulled back through the exact inverse of J,
J⁻¹(x_loc, x_W, x_D) = (x_loc, x_D/(2ss'), diag(s)⁻¹(x_W − diag(s'x_u)P)), so that the coupling
of u and P that the parameterization makes (a change of sᵢ scales row i of W) is kept and only
F's own W–D coupling is dropped. Blocks: on loc the exact (Σ⁻¹ + μI)⁻¹; on W the Kronecker part
K ⊗ Σ⁻¹ of F_WW (K = WᵀΣ⁻¹W = PᵀC⁻¹P = G(I + G)⁻¹, G = PᵀP; the term Σ⁻¹WVᵀΣ⁻¹W dropped as in
Tran, Nguyen & Dao 2020, "A fast and efficient natural gradient for the factor model
covariance") with the damping μ in P's scale, which in P = diag(s)⁻¹W reads C⁻¹ ⊗ K + μI and is
inverted exactly in G's eigenbasis, where (κ_j C⁻¹ + μI)⁻¹ = C(κ_j I + μC)⁻¹ is
diagonal-plus-rank-r; on D the diagonal ½(Σ⁻¹)ᵢᵢ² of F_DD with u's damping, μ/(2sᵢs'ᵢ)². In θ:
x_u = (g_u − (s'/s)∘rowsum(g_P∘P)) / (2(s'ᵢ/sᵢ)²(C⁻¹)ᵢᵢ² + μ), x_P = X − diag(s'x_u/s)P with X
the P block's solve of g_P. Set-up O(d r² + r³), each application O(d r²).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

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

    @cached_property
    def _spectrum(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(G, γ, Q, (C⁻¹)ᵢᵢ): G = PᵀP = QΓQᵀ (γ clamped at 0) and the diagonal of
        C⁻¹ = (I + PPᵀ)⁻¹, 1 − |(PQ)ᵢ|²/(1 + γ) by Woodbury; shared by :meth:`trace` and
        :meth:`preconditioner`, which a step calls once each."""
        gram = self.p.mT @ self.p
        gamma, basis = torch.linalg.eigh(gram)
        gamma = gamma.clamp_min(0)
        c_inv_ii = 1 - ((self.p @ basis).square() / (1 + gamma)).sum(-1)
        return gram, gamma, basis, c_inv_ii

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
        the diagonals of the three blocks: on u, with dΣ from a log-scale a = log s,
        Σ⁻¹dΣ = diag(s)⁻¹(C⁻¹EᵢC + Eᵢ)diag(s) for a change of aᵢ (Eᵢ = eᵢeᵢᵀ) and
        ½tr((C⁻¹EᵢC + Eᵢ)²) = 1 + Cᵢᵢ(C⁻¹)ᵢᵢ; on P, F_WW's diagonal Σ⁻¹ᵢᵢK_jj + (Σ⁻¹W)ᵢⱼ² in
        P's coordinates, with tr K = Σγ/(1 + γ) and |C⁻¹P|²_F = Σγ/(1 + γ)² over the eigenvalues
        γ of PᵀP."""
        s, ds, p = self.s, self.ds, self.p
        _, gamma, _, c_inv_ii = self._spectrum
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
        gram, gamma, basis, c_inv_ii = self._spectrum
        shift = gamma / (1 + gamma) + mu  # a_j = κ_j + μ, per column of VQ
        spread = basis / shift @ basis.mT  # Q diag(1/a) Qᵀ
        # D: ½(Σ⁻¹)ᵢᵢ² with u's damping, in u's units
        ratio = ds / s
        u_diag = 2 * (ratio * c_inv_ii).square() + mu

        def apply(v: Tensor) -> Tensor:
            v_loc, v_u, v_p = self.coords.split(v)
            a = inv_e * v_loc
            t = torch.cholesky_solve((w.mT @ a).unsqueeze(-1), loc_capacitance).squeeze(-1)
            x_loc = operator.cov((a - inv_e * (w @ t)).unsqueeze(-1)).squeeze(-1)
            # per column ỹ_j of Y = VQ: (a_j I + μBBᵀ)⁻¹ỹ_j = (ỹ_j − B diag(1/(a_j/μ + γ))Bᵀỹ_j)
            # / a_j, then C· = I + BBᵀ and back by Qᵀ; with H = PᵀV, T = QᵀHQ / (a_j/μ + γᵢ),
            # ZQᵀ = V·Q diag(1/a)Qᵀ − P·M, M = Q(T diag(1/a))Qᵀ, and X = ZQᵀ + P(PᵀZQᵀ) where
            # PᵀZQᵀ = H·Q diag(1/a)Qᵀ − G·M: three products of d rows (a fourth, Pᵀ of the
            # rows term, for the gauge projection)
            h = p.mT @ v_p
            t = basis.mT @ h @ basis / (shift.unsqueeze(-2) / mu + gamma.unsqueeze(-1))
            mixed = basis @ (t / shift) @ basis.mT
            right = h @ spread - gram @ mixed - mixed  # X = V·spread + P·right
            x_u = (v_u - ratio * (v_p * p).sum(-1)) / u_diag  # J⁻ᵀ, D's block, J⁻¹ on u
            rows = (ratio * x_u).unsqueeze(-1) * p  # J⁻¹ on P: X − diag(s'x_u/s)P
            if self.gauge_free:  # less PA, A from the rotation content Pᵀ(X − rows)
                cross = h @ spread + gram @ right - p.mT @ rows
                right = right - rotation_coefficients(cross, (gamma, basis))
            return self.coords.join(x_loc, x_u, v_p @ spread + p @ right - rows) / m

        return apply
