"""Derivatives of a live autograd graph on flat vectors: vector-Jacobian and Jacobian-vector
products, Gram products Jᵀ(Jv), and dense Jacobians (the pullbacks the metrics are built from)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .linalg import flat


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
    jv = None
    if jt_w.requires_grad:
        (jv,) = torch.autograd.grad(jt_w, w, v, retain_graph=True, allow_unused=True)
    if jv is None:  # no double backward through the graph: J·v from J's rows
        return (_reverse_jacobian(output, inputs) @ v).reshape(output.shape)
    return jv


def gram_mvp(output: Tensor, inputs: Sequence[Tensor], v: Tensor) -> Tensor:
    """Jᵀ(J v) for J = ∂output/∂inputs, in memory O(output + inputs) (Schraudolph 2002)."""
    return vjp(output, inputs, jvp(output, inputs, v))


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
        columns = [torch.autograd.grad(jt_w, w, e, retain_graph=True, allow_unused=True)[0]
                   for e in eye]
        columns = None if any(c is None for c in columns) else torch.stack(columns)
    if columns is None:  # Jᵀw does not reach w: a once-differentiable rule (the implicit
        return _reverse_jacobian(output, inputs)  # reparameterization of Beta, Dirichlet)
    return columns.reshape(d, n).T


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
