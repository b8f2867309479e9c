"""Flat-vector helpers and solvers for metric tensors given as matrix-vector products."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def vjp(output: Tensor, inputs: Sequence[Tensor], cotangent: Tensor,
        create_graph: bool = False) -> Tensor:
    """Flat (∂output/∂inputs)ᵀ·cotangent, zeros for inputs the output does not depend on."""
    grads = torch.autograd.grad(output, inputs, cotangent, retain_graph=True,
                                create_graph=create_graph, allow_unused=True)
    return flat([torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs,
                                                                       strict=True)])


def jvp(output: Tensor, inputs: Sequence[Tensor], v: Tensor) -> Tensor:
    """(∂output/∂inputs)·v by the double-backward trick: J v = ∂/∂w [Jᵀw]·v (no forward mode
    needed, so it works on any live graph)."""
    w = torch.zeros_like(output, requires_grad=True)
    jt_w = vjp(output, inputs, w, create_graph=True)
    if not jt_w.requires_grad:  # no double backward (e.g. implicit reparameterization): J·v
        return (jacobian(output, inputs) @ v).reshape(output.shape)
    (jv,) = torch.autograd.grad(jt_w, w, v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(output) if jv is None else jv


def without_rotations(w: Tensor, g: Tensor, eig: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """g minus its least-squares projection onto the rotation directions {wA : Aᵀ = −A} of a
    factor w (… × d × r). The normal equations of min_A ‖g − wA‖ over antisymmetric A are the
    Sylvester equation GA + AG = wᵀg − gᵀw with G = wᵀw; in G's eigenbasis, Ãᵢⱼ = B̃ᵢⱼ/(λᵢ + λⱼ).
    ``eig``: G's (eigenvalues, eigenvectors), when already at hand."""
    lam, q = torch.linalg.eigh(w.mT @ w) if eig is None else eig
    b = q.mT @ (w.mT @ g - g.mT @ w) @ q
    denominator = lam.unsqueeze(-1) + lam.unsqueeze(-2)
    tiny = torch.finfo(w.dtype).tiny
    a = q @ torch.where(denominator > tiny, b / denominator.clamp_min(tiny), 0.0) @ q.mT
    return g - w @ a


def gram_mvp(output: Tensor, inputs: Sequence[Tensor], v: Tensor) -> Tensor:
    """Jᵀ(J v) for J = ∂output/∂inputs, in memory O(output + inputs) (Schraudolph 2002)."""
    return vjp(output, inputs, jvp(output, inputs, v))


def solve_metric(metric, g: Tensor, form: str, damping: float, cg_iters: int) -> Tensor:
    """(G + damping·I)⁻¹ g for a metric with ``dense()``, ``diag()`` and ``mvp(v)``: by
    ``"dense"`` eigendecomposition, ``"diag"`` (the diagonal of G only) or matrix-free ``"cg"``,
    preconditioned by the metric's ``preconditioner(damping)`` where it has one and
    damping > 0."""
    if form == "cg":
        make = getattr(metric, "preconditioner", None)
        inverse = make(damping) if make is not None and damping > 0 else None
        return conjugate_gradient(metric.mvp, g, damping, cg_iters, preconditioner=inverse)
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


def jacobian(output: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """Dense Jacobian ∂output/∂inputs (n × d) of a live graph: reverse mode (n backward rows)
    when n ≤ d, else forward mode (d columns J e_i by the double-backward trick of :func:`jvp`),
    so that the batched pass never holds an n × n or d × d identity larger than it has to (a
    metric estimated from many draws of few params)."""
    n, d = output.numel(), sum(x.numel() for x in inputs)
    if n <= d:
        return _reverse_jacobian(output, inputs)
    w = torch.zeros_like(output, requires_grad=True)
    jt_w = vjp(output, inputs, w, create_graph=True)
    if not jt_w.requires_grad:  # no double backward: fall back to reverse mode
        return _reverse_jacobian(output, inputs)
    eye = torch.eye(d, dtype=output.dtype, device=output.device)
    try:
        (columns,) = torch.autograd.grad(jt_w, w, eye, retain_graph=True, allow_unused=True,
                                         is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule: one pass per column
        columns = torch.stack([jvp(output, inputs, e) for e in eye])
    if columns is None:
        return torch.zeros(n, d, dtype=output.dtype, device=output.device)
    return columns.T


def _reverse_jacobian(output: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """∂output/∂inputs by one batched backward pass per output row."""
    out = output.reshape(-1)
    eye = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
    try:
        rows = torch.autograd.grad(out, inputs, eye, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
        rows = [torch.zeros((out.numel(),) + x.shape, dtype=x.dtype, device=x.device)
                if r is None else r for r, x in zip(rows, inputs, strict=True)]
        return torch.cat([r.reshape(out.numel(), -1) for r in rows], dim=1)
    except RuntimeError:  # an op without a batching rule: one backward pass per row
        rows = []
        for i in range(out.numel()):
            g = torch.autograd.grad(out[i], inputs, retain_graph=True, allow_unused=True)
            rows.append(flat([torch.zeros_like(x) if gi is None else gi
                              for gi, x in zip(g, inputs, strict=True)]))
        return torch.stack(rows)


def conjugate_gradient(mvp: Callable[[Tensor], Tensor], b: Tensor, damping: float = 0.0,
                       max_iter: int = 100, rtol: float = 1e-6,
                       preconditioner: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Solves (A + damping·I) x = b for symmetric positive (semi-)definite A given as ``mvp``
    (Hestenes & Stiefel 1952; Martens 2010 for its use with Fisher-vector products), until the
    residual is below ``rtol``·|b| or after ``max_iter`` products. With ``preconditioner``
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
