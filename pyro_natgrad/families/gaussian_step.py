"""The natural-gradient (mirror) step of a full-covariance Gaussian N(m, LLᵀ), in the factor L.

The mirror step in natural parameters η = (Λm, −½Λ), η' = η − ρ ∂L/∂μ, written in (m, Λ) with a
separate precision rate ρ_Λ ≤ ρ (Khan & Rue 2023, "The Bayesian learning rule", JMLR, §4.1;
ρ_Λ = ρ is the plain step):

    Λ' = Λ + 2ρ_Λ ∂L/∂Σ,    m' = m − ρ Λ'⁻¹ ∂L/∂m.

With the loss's gradient given in the Cholesky factor, ∂L/∂L (what SVI has), the Cholesky reverse
rule (Murray 2016, "Differentiation of the Cholesky decomposition", arXiv:1602.07527) gives
∂L/∂Σ = ½ L⁻ᵀ S L⁻¹ with

    P = Lᵀ tril(∂L/∂L),    S = tril(P) + tril(P)ᵀ − diag(P)   (symmetric; S = 2Lᵀ(∂L/∂Σ)L),

so Λ' = L⁻ᵀ B L⁻¹ with B = I + ρ_Λ S. Factor B = UUᵀ with U *upper* triangular (the Cholesky
factor of B with both axes flipped); then Σ' = Λ'⁻¹ = (LU⁻ᵀ)(LU⁻ᵀ)ᵀ, and L' = LU⁻ᵀ is lower
triangular with a positive diagonal: the new factor is one triangular solve away, as in the
Cholesky-factor natural steps of Lin, Schmidt & Khan (2020, "Handling the positive-definite
constraint in the Bayesian learning rule", ICML) and Lin, Duruisseaux, Leok, Nielsen, Khan &
Schmidt (2021, "Structured second-order methods via natural gradient descent", arXiv:2107.10884).
With v = Lᵀ∂L/∂m and w = U⁻¹v, m' = m − ρ L'w, and the exact divergences need only U:

    KL(q ‖ q') = ½[tr B − d − log|B| + ρ²|w|²]   (tr B − d = ρ_Λ tr S),
    KL(q' ‖ q) = ½[tr B⁻¹ − d + log|B| + ρ²|U⁻ᵀw|²],

from KL(N₀ ‖ N₁) = ½[tr Σ₁⁻¹Σ₀ − d + (m₁ − m₀)ᵀΣ₁⁻¹(m₁ − m₀) + log|Σ₁|/|Σ₀|] with
tr(Λ'Σ) = tr B, |Σ'|/|Σ| = |B|⁻¹, (m' − m)ᵀΛ'(m' − m) = ρ²|w|² and
(m' − m)ᵀΛ(m' − m) = ρ²|U⁻ᵀw|².

The retraction of Lin, Schmidt & Khan (2020), eq. 7, Λ' = Λ + G + ½GΛ⁻¹G with G = 2ρ_Λ∂L/∂Σ
(the mean as above), whitens to B = I + ρ_ΛS + ½ρ_Λ²S² = ½I + ½(I + ρ_ΛS)², positive definite for
every rate; the same factorization and formulas serve, with tr B − d = ρ_Λ tr S + ½ρ_Λ²|S|²_F.

The plain B is positive definite, i.e. the step stays in the domain, iff ρ_Λ λ_min(S) > −1;
:func:`max_precision_rate` estimates that bound by Lanczos iterations (O(d²) each) before any
factorization. Cost: forming S is one d×d matrix product per step (:func:`gaussian_direction`);
each candidate rate then takes one Cholesky of B for its KL (plus ``cholesky_inverse`` of the
factor for KL(q' ‖ q)), and the candidate that is taken one triangular solve with a matrix
right-hand side for L'; the rest is O(d²).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["GaussianDirection", "GaussianStep", "gaussian_direction", "natural_step",
           "max_precision_rate", "smallest_eigenvalue", "ritz_pairs", "lower_product",
           "lower_solve"]


@dataclass(frozen=True)
class GaussianDirection:
    """The gradient of one step, whitened by the current factor: ``whitened_loc`` v = Lᵀ∂L/∂m
    (…, d) and ``whitened_cov`` S = 2Lᵀ(∂L/∂Σ)L (…, d, d, symmetric), with the current ``loc``
    m and ``scale_tril`` L; ``whitened_cov_square`` S² where the retraction was asked for."""

    loc: Tensor
    scale_tril: Tensor
    whitened_loc: Tensor
    whitened_cov: Tensor
    whitened_cov_square: Tensor | None = None

    @cached_property
    def flipped_cov(self) -> Tensor:
        """JSJ, S with both axes reversed (formed once: every candidate factors JBJ)."""
        return self.whitened_cov.flip(-2, -1)

    @cached_property
    def frobenius(self) -> Tensor:
        """|S|_F per batch element (≥ |λ| for every eigenvalue λ of S); one d×d pass, once."""
        return torch.linalg.vector_norm(self.whitened_cov, dim=(-2, -1))

    def model_kl(self, rate: float) -> Tensor:
        """The quadratic model of :func:`natural_step`'s KL at ``rate`` = ρ = ρ_Λ, per batch
        element, before any factorization: ½ρ²|v|² + ¼ρ²|S|²_F (the KL's second-order term,
        tr B − d − log|B| ≈ ½ρ²|S|²_F and |U⁻¹v|² ≈ |v|²)."""
        return 0.5 * rate ** 2 * (self.whitened_loc.square().sum(-1)
                                  + 0.5 * self.frobenius.square())


@dataclass(frozen=True)
class GaussianStep:
    """One candidate of the step, per batch element: ``kl`` KL(q ‖ q'), ``reverse_kl``
    KL(q' ‖ q) (None unless asked for), ``ok``: B positive definite and the KLs finite, and the
    candidate's ``loc`` m' and ``scale_tril`` L' (lower triangular, positive diagonal), formed
    by ``build`` on first access: a candidate judged by its KL alone never pays L''s O(d³)
    triangular solve. Where ``ok`` is False the KLs are +inf and ``loc``/``scale_tril`` are
    unspecified (not a distribution: do not use)."""

    kl: Tensor
    reverse_kl: Tensor | None
    ok: Tensor
    build: Callable[[], tuple[Tensor, Tensor]] = field(repr=False, compare=False)
    bottom: Callable[[int], tuple[Tensor, Tensor]] | None = field(default=None, repr=False,
                                                                 compare=False)

    def least(self, iters: int) -> tuple[Tensor, Tensor]:
        """(μ, u) per batch element: μ = uᵀBu ≥ λ_min(B), the Rayleigh quotient of the unit
        vector u after ``iters`` steps of inverse iteration x ← B⁻¹x / |B⁻¹x| from a seeded
        random start (Golub & Van Loan 2013, §8.2.2), each two triangular solves with B's factor
        (O(d²)): it finds the direction where q' = N(m', Σ') widens most, Σ'Λ = B⁻¹ in q's
        whitened frame, whether or not Lanczos on S saw it. Only where ``ok``."""
        if self.bottom is None:
            raise ValueError("GaussianStep.least: this step was not built by natural_step")
        return self.bottom(iters)

    @cached_property
    def _args(self) -> tuple[Tensor, Tensor]:
        return self.build()

    @property
    def loc(self) -> Tensor:
        return self._args[0]

    @property
    def scale_tril(self) -> Tensor:
        return self._args[1]


def gaussian_direction(loc: Tensor, scale_tril: Tensor, d_loc: Tensor, d_scale_tril: Tensor,
                       *, retraction: bool = False) -> GaussianDirection:
    """Whitens the loss's gradient in the distribution's arguments (``args_gradient``), ∂L/∂m and
    ∂L/∂L, for :func:`natural_step`: v = Lᵀ∂L/∂m and S = tril(P) + tril(P)ᵀ − diag(P),
    P = Lᵀ tril(∂L/∂L) (the Cholesky reverse rule, see the module docstring). One d×d matrix
    product, and a second for S² with ``retraction`` (for ``natural_step(..., retract=True)``);
    only the lower triangle of ``d_scale_tril`` is read."""
    d = loc.shape[-1] if loc.dim() else 0
    if loc.dim() < 1 or scale_tril.dim() < 2 or scale_tril.shape[-2:] != (d, d):
        raise ValueError(f"gaussian_direction: loc must be (..., d) and scale_tril (..., d, d), "
                         f"got loc {tuple(loc.shape)} and scale_tril {tuple(scale_tril.shape)}")
    if d_loc.shape != loc.shape:
        raise ValueError(f"gaussian_direction: d_loc must have loc's shape {tuple(loc.shape)}, "
                         f"got {tuple(d_loc.shape)}")
    if d_scale_tril.shape != scale_tril.shape:
        raise ValueError(f"gaussian_direction: d_scale_tril must have scale_tril's shape "
                         f"{tuple(scale_tril.shape)}, got {tuple(d_scale_tril.shape)}")
    p = lower_product(scale_tril.mT, d_scale_tril)  # lower triangular
    s = p + p.mT
    s.diagonal(dim1=-2, dim2=-1).copy_(p.diagonal(dim1=-2, dim2=-1))
    v = (scale_tril.mT @ d_loc.unsqueeze(-1)).squeeze(-1)
    return GaussianDirection(loc, scale_tril, v, s, s @ s if retraction else None)


def natural_step(direction: GaussianDirection, rate: float | Tensor,
                 precision_rate: float | Tensor | None = None, *, reverse_kl: bool = False,
                 retract: bool = False, lift: tuple[Tensor, Tensor] | None = None
                 ) -> GaussianStep:
    """The candidate m' = m − ρ Λ'⁻¹∂L/∂m, Λ' = Λ + 2ρ_Λ ∂L/∂Σ (module docstring) for ``rate`` ρ
    and ``precision_rate`` ρ_Λ (default ρ: the plain natural step η ← η − ρ∂L/∂μ), each a
    number or a tensor of the batch shape (a rate per batch element). One Cholesky
    (``cholesky_ex``: a B that is not positive definite is reported in ``ok``, never raised) for
    the KL, and one triangular solve with a d×d right-hand side when ``loc`` or ``scale_tril`` is
    read; ``reverse_kl`` adds a ``cholesky_inverse`` for tr B⁻¹. ``retract``: the precision by
    Lin, Schmidt & Khan's retraction (module docstring), in the domain for every rate; needs
    ``gaussian_direction(..., retraction=True)``. ``lift`` = (U (…, d, k), a (…, k)): B gets
    U diag(a) Uᵀ added (a ≥ 0 raises B along U's columns: the precision floor of
    :class:`~pyro_natgrad.optim.transforms.PrecisionShortening`), O(d²k)."""
    loc, tril, v, s = (direction.loc, direction.scale_tril, direction.whitened_loc,
                       direction.whitened_cov)
    rho = _rate("rate", rate, s)
    rho_lam = rho if precision_rate is None else _rate("precision_rate", precision_rate, s)
    d = s.shape[-1]
    b = rho_lam[..., None, None] * direction.flipped_cov  # JBJ, B = I + ρ_Λ S
    if retract:
        if direction.whitened_cov_square is None:
            raise ValueError("natural_step: retract=True needs the direction built with "
                             "gaussian_direction(..., retraction=True) (its S²)")
        b = b + 0.5 * rho_lam[..., None, None].square() * direction.whitened_cov_square.flip(
            -2, -1)
    if lift is not None:
        flipped_vectors = lift[0].flip(-2)  # JU
        weighted = flipped_vectors * lift[1][..., None, :]
        if b.shape[:-2] == weighted.shape[:-2]:  # accumulated in place: no d×d temporary
            b.view(-1, d, d).baddbmm_(weighted.reshape(-1, d, weighted.shape[-1]),
                                      flipped_vectors.mT.reshape(-1, weighted.shape[-1], d))
        else:
            b.add_(weighted @ flipped_vectors.mT)
    b.diagonal(dim1=-2, dim2=-1).add_(1)  # JIJ = I
    flipped, info = _cholesky_in_place(b)  # JBJ = L_f L_fᵀ, U = J L_f J
    # U⁻¹v = J L_f⁻¹ Jv: vectors flipped, not the factor
    w = torch.linalg.solve_triangular(flipped, v.flip(-1).unsqueeze(-1), upper=False).flip(-2)
    diagonal = flipped.diagonal(dim1=-2, dim2=-1)
    pivots = diagonal.clone()
    # tr B − d − log|B| = Σ_{i≠j} u_ij² + Σ_i (u_ii² − 1 − 2 log u_ii) (tr B = |U|²_F): terms ≥ 0,
    # the diagonal's as 2x + x² − 2 log(1 + x) of x = u_ii − 1 in float64 (no cancellation); the
    # off-diagonal sum as the norm of the factor with its diagonal zeroed for the moment
    diagonal.zero_()
    off = torch.linalg.vector_norm(flipped, dim=(-2, -1)).square()
    diagonal.copy_(pivots)
    x = (pivots - 1).double()
    spread = off + (2 * x + x.square() - 2 * torch.log1p(x)).sum(-1).to(s.dtype)
    kl = 0.5 * (spread + rho.square() * w.squeeze(-1).square().sum(-1))
    ok = (info == 0) & torch.isfinite(kl)
    reverse = None
    if reverse_kl:
        log_det = 2 * pivots.log().sum(-1)  # log|B|
        trace_inv = torch.cholesky_inverse(flipped).diagonal(dim1=-2, dim2=-1).sum(-1)
        back = torch.linalg.solve_triangular(flipped.mT, w.flip(-2), upper=True
                                             ).flip(-2).squeeze(-1)  # U⁻ᵀw = J L_f⁻ᵀ Jw
        reverse = 0.5 * (trace_inv - d + log_det + rho.square() * back.square().sum(-1))
        ok = ok & torch.isfinite(reverse)
        reverse = torch.where(ok, reverse, torch.inf)
    kl = torch.where(ok, kl, torch.inf)

    def build() -> tuple[Tensor, Tensor]:
        new_tril = lower_solve(tril, flipped.flip(-2, -1).mT)  # L U⁻ᵀ
        return loc - rho[..., None] * (new_tril @ w).squeeze(-1), new_tril

    def bottom(iters: int) -> tuple[Tensor, Tensor]:
        """Inverse iteration on JBJ = L_f L_fᵀ; the vector returned in B's coordinates (J x)."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(flipped.shape[:-1] + (1,), generator=generator,
                        dtype=flipped.dtype).to(flipped.device)
        for _ in range(iters):
            x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True)
            x = torch.linalg.solve_triangular(
                flipped.mT, torch.linalg.solve_triangular(flipped, x, upper=False), upper=True)
        x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True)
        return (flipped.mT @ x).square().sum((-2, -1)), x.flip(-2).squeeze(-1)

    return GaussianStep(kl, reverse, ok, build, bottom)


def _cholesky_in_place(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``cholesky_ex`` of a symmetric ``matrix`` (…, d, d, contiguous) that the caller owns,
    factored in its own memory, which then holds the factor: its transpose is the same matrix in
    column-major order, LAPACK's own, so no copy of the input is made (one d×d pass and an
    allocation saved per candidate). Where a backend refuses the aliased output, the plain
    call."""
    info = matrix.new_empty(matrix.shape[:-2], dtype=torch.int32)
    try:
        return torch.linalg.cholesky_ex(matrix.mT, out=(matrix.mT, info))
    except RuntimeError:
        return torch.linalg.cholesky_ex(matrix)


def max_precision_rate(whitened_cov: Tensor, *, floor: float = 0.0, safety: float = 0.9,
                       iters: int = 10) -> Tensor:
    """The largest precision rate ρ_Λ with λ_min(B) ≥ ``floor`` for B = I + ρ_Λ S, S the
    ``whitened_cov`` of :func:`gaussian_direction` (then Λ' ⪰ ``floor``·Λ along every direction),
    per batch element, times ``safety``: safety·(1 − floor)/(−λ̂) where λ̂ < 0, else +inf.
    λ̂ = θ − r is the smallest Ritz value of ``iters`` Lanczos steps less its residual norm
    (:func:`smallest_eigenvalue`, O(d²) per step, no factorization). Ritz values never lie below
    λ_min, so θ alone would overshoot; θ − r does not once the Ritz pair has found the bottom of
    the spectrum, which few steps may not guarantee: a Cholesky of B remains the test."""
    if not 0 <= floor < 1:
        raise ValueError(f"max_precision_rate: floor must be in [0, 1), got {floor!r}")
    if not 0 < safety <= 1:
        raise ValueError(f"max_precision_rate: safety must be in (0, 1], got {safety!r}")
    ritz, residual = smallest_eigenvalue(whitened_cov, iters)
    bound = ritz - residual
    rate = safety * (1 - floor) / (-bound).clamp_min(torch.finfo(bound.dtype).tiny)
    return torch.where(bound < 0, rate, torch.inf)


def smallest_eigenvalue(matrix: Tensor, iters: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(θ, r) per batch element of a symmetric ``matrix`` (…, d, d): θ the smallest Ritz value
    of ``iters`` Lanczos steps (at most d) with full reorthogonalization, from a seeded random
    start (the global RNG untouched), and r = |β_k y_k| the norm of its residual (Golub & Van
    Loan 2013, *Matrix Computations*, §10.1): some eigenvalue lies in [θ − r, θ], and
    λ_min ≤ θ always. O(d²) per step; the k×k tridiagonal eigenproblem is negligible."""
    theta, _, residual = ritz_pairs(matrix, iters, seed)
    return theta[..., 0], residual[..., 0]


def ritz_pairs(matrix: Tensor, iters: int = 10, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """All k = min(``iters``, d) Ritz pairs of the Lanczos steps of :func:`smallest_eigenvalue`:
    values θ (…, k) ascending, unit vectors (…, d, k), and residual norms |β_k y_{k,i}| (…, k)."""
    if matrix.dim() < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"Lanczos: matrix must be (..., d, d), got {tuple(matrix.shape)}")
    if not (isinstance(iters, int) and iters > 0):
        raise ValueError(f"Lanczos: iters must be a positive integer, got {iters!r}")
    d = matrix.shape[-1]
    k = min(iters, d)
    batch = matrix.shape[:-2]
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch + (d,), generator=generator, dtype=matrix.dtype).to(matrix.device)
    flat = matrix.reshape(-1, d, d)  # batched as one leading dimension: fused bmm updates
    basis = matrix.new_zeros(flat.shape[0], k, d)  # rows q_0 … q_{k-1}
    basis[:, 0] = (q / q.square().sum(-1, keepdim=True).sqrt()).reshape(-1, d)
    threshold = torch.finfo(matrix.dtype).eps ** 0.5
    tiny = torch.finfo(matrix.dtype).tiny
    alphas, betas = [], []
    for j in range(k):
        done = basis[:, :j + 1]
        done_t = done.mT
        w = torch.bmm(basis[:, j:j + 1], flat)  # qᵀS = (Sq)ᵀ, S symmetric; (n, 1, d)
        scale = torch.linalg.vector_norm(w, dim=(-2, -1))
        # full reorthogonalization, two Gram–Schmidt passes ("twice is enough": one leaves the
        # next q off the basis); the first pass's coefficient on q_j is α_j = q_jᵀSq_j
        coefficients = torch.bmm(w, done_t)
        alphas.append(coefficients[:, 0, j])
        w = torch.baddbmm(w, coefficients, done, alpha=-1)
        w = torch.baddbmm(w, torch.bmm(w, done_t), done, alpha=-1)
        norm = torch.linalg.vector_norm(w, dim=(-2, -1))
        # an invariant subspace (β ≤ √eps·|Sq|): β = 0 and a zero vector next, so T gets zeros
        live = norm > threshold * scale
        betas.append(norm * live)
        if j + 1 < k:
            torch.mul(w[:, 0], (live / norm.clamp_min(tiny)).unsqueeze(-1),
                      out=basis[:, j + 1])
    alpha = torch.stack(alphas, -1).reshape(batch + (k,))
    beta = torch.stack(betas, -1).reshape(batch + (k,))
    basis = basis.reshape(batch + (k, d))
    tridiagonal = (torch.diag_embed(alpha) + torch.diag_embed(beta[..., :-1], 1)
                   + torch.diag_embed(beta[..., :-1], -1))
    theta, y = torch.linalg.eigh(tridiagonal)
    return theta, basis.mT @ y, (beta[..., -1:] * y[..., -1, :]).abs()


def lower_product(upper: Tensor, lower: Tensor, block: int = 64) -> Tensor:
    """tril(A·tril(B)) for A = ``upper`` upper triangular (its strict lower triangle zero) and B =
    ``lower`` (only its lower triangle read), both (…, d, d). Row block I (rows i:e) of the
    result's lower triangle is A[I, I] B[I, :i] + A[I, I] tril(B[I, I]) + A[I, e:] B[e:, :e]:
    the terms k < i vanish (A_ik = 0), and so do the columns past e, so the blocks take ≈ d³/6
    multiply–adds instead of the full product's d³. Below two blocks: the plain product."""
    d = upper.shape[-1]
    if d < 2 * block:
        return (upper @ lower.tril()).tril()
    out = upper.new_empty(torch.broadcast_shapes(upper.shape, lower.shape))
    for i in range(0, d, block):
        e = min(i + block, d)
        out[..., i:e, e:] = 0  # the strict upper triangle's part in these rows
        rows, corner = out[..., i:e, :e], upper[..., i:e, i:e]
        if i:  # B[I, :i] lies below the diagonal: read in place
            torch.matmul(corner, lower[..., i:e, :i], out=rows[..., :i])
        torch.matmul(corner, lower[..., i:e, i:e].tril(), out=rows[..., i:e])
        if e < d and rows.dim() == 2:
            rows.addmm_(upper[..., i:e, e:], lower[..., e:, :e])  # accumulated in place
        elif e < d:
            rows += upper[..., i:e, e:] @ lower[..., e:, :e]
        rows[..., i:e].tril_()
    return out


def lower_solve(lower: Tensor, factor: Tensor, block: int = 64) -> Tensor:
    """X = A F⁻¹ for A = ``lower`` and F = ``factor`` both lower triangular (…, d, d; only A's
    lower triangle is read). X is lower triangular, and XF = A read by column blocks from the
    right is X[:, J] F[J, J] = A[:, J] − Σ_{K>J} X[:, K] F[K, J], where X[:, K] vanishes above
    row block K: so each column block, once solved against F's diagonal block, is subtracted
    from every block left of it in one matrix product, X[k:, :k] −= X[k:, K] F[K, :k]
    (right-looking; Golub & Van Loan 2013, §3.1.4 by blocks). ≈ d³/6 multiply–adds, nearly all
    in products with a ``block``-wide inner dimension, against a triangular solve's d³/2 with a
    full right-hand side. Below two blocks: one triangular solve."""
    d = lower.shape[-1]
    if d < 2 * block:
        return torch.linalg.solve_triangular(factor, lower.tril(), upper=False, left=False)
    out = lower.expand(torch.broadcast_shapes(lower.shape, factor.shape)).tril()
    for j in reversed(range(0, d, block)):
        e = min(j + block, d)
        panel = out[..., j:, j:e]
        panel.copy_(torch.linalg.solve_triangular(factor[..., j:e, j:e], panel, upper=False,
                                                  left=False))
        if j and out.dim() == 2:
            out[j:, :j].addmm_(panel, factor[j:e, :j], alpha=-1)  # accumulated in place
        elif j:
            out[..., j:, :j] -= panel @ factor[..., j:e, :j]
    return out


def _rate(name: str, rate: float | Tensor, like: Tensor) -> Tensor:
    """A rate as a tensor of ``like``'s dtype and device, checked finite, ≥ 0 and of a shape
    that broadcasts to the batch shape of ``like`` (…, d, d)."""
    value = torch.as_tensor(rate, dtype=like.dtype, device=like.device)
    batch = like.shape[:-2]
    if value.dim() > len(batch) or any(v not in (1, b) for v, b in zip(
            reversed(value.shape), reversed(batch), strict=False)):
        raise ValueError(f"natural_step: {name} must be a number or broadcast to the batch "
                         f"shape {tuple(batch)}, got shape {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all() & (value >= 0).all()):
        raise ValueError(f"natural_step: {name} must be finite and >= 0, got {rate!r}")
    return value
