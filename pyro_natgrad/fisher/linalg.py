"""Linear algebra on flat vectors: flattening, metric tensors given as products (the
:class:`Metric` protocol) and their solves (dense, diagonal, conjugate gradients), Hutchinson's
trace, and the least-squares removal of a low-rank factor's rotations. Derivatives of autograd
graphs are in :mod:`~pyro_natgrad.fisher.autodiff`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenates tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Splits a vector (its last dimension; leading ones are kept as a batch) into tensors
    shaped like ``like``."""
    out, start = [], 0
    for t in like:
        out.append(vector[..., start:start + t.numel()].reshape(vector.shape[:-1] + t.shape))
        start += t.numel()
    return out


def without_rotations(w: Tensor, g: Tensor, eig: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """g minus its least-squares projection onto the rotation directions {wA : Aᵀ = −A} of a
    factor w (… × d × r), g − w·:func:`rotation_coefficients`. ``eig``: wᵀw's (eigenvalues,
    eigenvectors), when already at hand."""
    eig = torch.linalg.eigh(w.mT @ w) if eig is None else eig
    return g - w @ rotation_coefficients(w.mT @ g, eig)


def rotation_coefficients(cross: Tensor, eig: tuple[Tensor, Tensor]) -> Tensor:
    """The antisymmetric A of min_A ‖g − wA‖, from ``cross`` = wᵀg and ``eig`` = the
    eigendecomposition QΛQᵀ of G = wᵀw: the normal equations are the Sylvester equation
    GA + AG = wᵀg − gᵀw, solved in G's eigenbasis, Ãᵢⱼ = B̃ᵢⱼ/(λᵢ + λⱼ) (zero where
    λᵢ + λⱼ = 0)."""
    lam, q = eig
    b = q.mT @ (cross - cross.mT) @ q
    denominator = lam.unsqueeze(-1) + lam.unsqueeze(-2)
    tiny = torch.finfo(cross.dtype).tiny
    return q @ torch.where(denominator > tiny, b / denominator.clamp_min(tiny), 0.0) @ q.mT


class Metric(Protocol):
    """A metric tensor G (symmetric positive semidefinite) on flat vectors, given as products:
    ``mvp(v)`` = G·v (leading dimensions of v a batch where the metric allows), and, for the
    solves that need them, ``dense()`` (the matrix) and ``diag()`` (its diagonal). A metric may
    also have ``preconditioner(damping)``, an approximate inverse v ↦ (G + damping·I)⁻¹v
    (symmetric positive definite), which :func:`solve_metric` uses for ``"cg"``."""

    def mvp(self, v: Tensor) -> Tensor: ...

    def dense(self) -> Tensor: ...

    def diag(self) -> Tensor: ...


def solve_metric(metric: Metric, g: Tensor, form: str, damping: float, cg_iters: int,
                 rtol: float = 1e-6) -> Tensor:
    """(G + damping·I)⁻¹ g: by ``"dense"`` eigendecomposition (:func:`solve_psd`), ``"diag"``
    (the diagonal of G only) or matrix-free ``"cg"`` (:func:`conjugate_gradient` to ``rtol``,
    at most ``cg_iters`` products), preconditioned by the metric's ``preconditioner(damping)``
    where it has one and damping > 0."""
    if form == "cg":
        make = getattr(metric, "preconditioner", None)
        inverse = make(damping) if make is not None and damping > 0 else None
        return conjugate_gradient(metric.mvp, g, damping, cg_iters, rtol, inverse)
    if form == "diag":
        return g / (metric.diag() + damping)
    return solve_psd(metric.dense(), g, damping)


def hutchinson_trace(mvp: Callable[[Tensor], Tensor], like: Tensor, probes: int = 8) -> Tensor:
    """tr A ≈ (1/k) Σ_j v_jᵀ A v_j over k Rademacher probes v_j (Hutchinson 1990), for A given
    only as a matrix-vector product; ``like`` sets the dimension, dtype and device."""
    total = like.new_zeros(())
    generator = torch.Generator(device=like.device).manual_seed(0)  # the global RNG untouched
    for _ in range(probes):
        v = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
        v = v.to(like.dtype) * 2 - 1
        total = total + v.dot(mvp(v))
    return total / probes


def conjugate_gradient(mvp: Callable[[Tensor], Tensor], b: Tensor, damping: float = 0.0,
                       max_iter: int = 100, rtol: float = 1e-6,
                       preconditioner: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Solves (A + damping·I) x = b for symmetric positive (semi-)definite A given as ``mvp``
    (Hestenes & Stiefel 1952; Martens 2010 for its use with Fisher-vector products), until the
    residual is below ``rtol``·|b|, after ``max_iter`` products, or where the curvature or the
    preconditioned residual rᵀM⁻¹r is no longer positive (zero to rounding). With ``preconditioner``
    M⁻¹ (symmetric positive definite, an approximate inverse of A + damping·I), the
    preconditioned iteration (Golub & Van Loan 2013, *Matrix Computations*, Alg. 11.5.1): the
    same solution in as many products as the spectrum of M⁻¹(A + damping·I) needs."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = r if preconditioner is None else preconditioner(r)
    p = z.clone()
    rz, rs = r.dot(z), r.dot(r)
    stop = (rtol * b.norm()) ** 2
    for _ in range(max_iter):
        if rs <= stop:
            break
        ap = mvp(p) + damping * p
        curvature = p.dot(ap)
        if curvature <= 0:
            break
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs = r.dot(r)
        z = r if preconditioner is None else preconditioner(r)
        rz_new = r.dot(z)
        if not rz_new > 0:  # the preconditioned residual is zero to rounding (or not finite)
            break
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def solve_psd(matrix: Tensor, b: Tensor, damping: float = 0.0) -> Tensor:
    """The minimum-norm solution of (M + damping·I) x = b for a symmetric PSD matrix M.

    By eigendecomposition, dropping directions whose eigenvalue is below ``n·eps·λ_max``: a metric
    is often singular (a low-rank factor W can rotate, W ↦ WR, without changing q; params the
    metric does not see), and a plain damped Cholesky solve would then step far along those
    directions, where the metric (and the KL trust region built on it) sees no change at all.
    """
    dtype = matrix.dtype
    if dtype != torch.float64 and matrix.device.type != "mps":  # float32 eigh of an
        matrix, b = matrix.double(), b.double()  # ill-conditioned Fisher can return NaN
    m = 0.5 * (matrix + matrix.T)
    evals, evecs = torch.linalg.eigh(m)
    cutoff = m.shape[0] * torch.finfo(dtype).eps * evals.abs().max().clamp_min(1e-300)
    keep = evals > cutoff
    inverse = torch.where(keep, 1.0 / (evals.clamp_min(cutoff) + damping), 0.0)
    return (evecs @ (inverse * (evecs.T @ b))).to(dtype)
