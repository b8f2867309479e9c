"""Empirical Fisher of a torch.nn.Module from per-sample gradients, in one vectorized pass.

For per-sample losses ℓ_n(θ) = loss_fn(f_θ(x_n), y_n), n = 1..N, the empirical Fisher is the
uncentred second moment of the per-sample gradients g_n = ∇_θ ℓ_n(θ):

    F̂(θ) = (1/N) Σ_n g_n g_nᵀ,        diag F̂(θ) = (1/N) Σ_n g_n ⊙ g_n

(Martens 2020, "New insights and perspectives on the natural gradient method", JMLR 21(146);
Kunstner, Balles & Hennig 2019, "Limitations of the empirical Fisher approximation for natural
gradient descent", NeurIPS, who also show where it differs from the Fisher).
The per-sample gradients come from ``torch.func.vmap(torch.func.grad(...))`` over a functional
call of the module, instead of one backward pass per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

KINDS = ("diag", "full")


def empirical_fisher(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    kind: Literal["diag", "full"] = "diag",
    chunk_size: int | None = None,
) -> list[Tensor] | Tensor:
    """Empirical Fisher (1/N) Σ_n g_n g_nᵀ of ``model`` on the samples ``(inputs[n], targets[n])``.

    Each g_n is the gradient of ``loss_fn(model(inputs[n:n+1]), targets[n:n+1])``: the loss sees a
    batch of one sample, so a ``reduction="mean"`` loss averages over that one sample only (and
    over the output elements, for element-wise losses such as ``MSELoss``).
    Parameters with ``requires_grad=False`` are held fixed and get zero entries, as in a loop of
    ``loss.backward()`` calls, where their ``.grad`` stays None. Randomness (dropout) is drawn
    independently per sample; put BatchNorm layers in eval mode.

    Args:
        model: the network; its parameters and buffers are read, never modified.
        inputs: the samples, one per index of the first dimension.
        targets: one target per sample (same first dimension as ``inputs``).
        loss_fn: ``loss_fn(output, target) -> scalar`` on a batch of one sample.
        kind: ``"diag"`` for diag F̂, ``"full"`` for the whole matrix F̂.
        chunk_size: at most this many samples per vectorized pass (bounds memory to
            ``chunk_size × P`` gradients); None takes all samples in one pass.

    Returns:
        ``"diag"``: a list of tensors shaped like ``model.parameters()``, in that order.
        ``"full"``: one ``(P, P)`` tensor over the flattened parameters: ``model.parameters()`` in
        order, each flattened row-major (``p.reshape(-1)``) and concatenated, P = Σ p.numel().
    """
    _check_arguments(model, inputs, targets, kind, chunk_size)
    named = list(model.named_parameters())
    trainable = {name: p.detach() for name, p in named if p.requires_grad}
    constants = {name: p.detach() for name, p in named if not p.requires_grad}
    constants.update(model.named_buffers())

    def sample_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        loss = loss_fn(functional_call(model, (params, constants), (x[None],)), y[None])
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar, got shape {tuple(loss.shape)} "
                "(use reduction='mean' or 'sum', not 'none')"
            )
        return loss

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    n = inputs.shape[0]
    step = chunk_size or n
    total: list[Tensor] | Tensor | None = None
    for start in range(0, n, step):
        x, y = inputs[start:start + step], targets[start:start + step]
        g = per_sample_grads(trainable, x, y)
        rows = [g[name] if name in g else p.new_zeros((len(x),) + p.shape) for name, p in named]
        part = _second_moment(rows, kind)
        total = part if total is None else _add(total, part)
    return [t / n for t in total] if kind == "diag" else total / n


def _second_moment(rows: list[Tensor], kind: str) -> list[Tensor] | Tensor:
    """Σ_n g_n ⊙ g_n per parameter ("diag") or Σ_n g_n g_nᵀ flattened ("full"), for per-sample
    gradients ``rows`` of shape ``(chunk,) + p.shape`` each."""
    if kind == "diag":
        return [r.square().sum(0) for r in rows]
    flat = torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
    return flat.T @ flat


def _add(a: list[Tensor] | Tensor, b: list[Tensor] | Tensor) -> list[Tensor] | Tensor:
    return [x + y for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a + b


def _check_arguments(model: nn.Module, inputs: Tensor, targets: Tensor, kind: str,
                     chunk_size: int | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters: nothing to take a Fisher of")
    if not any(p.requires_grad for p in params):
        raise ValueError(f"all parameters of {type(model).__name__} have requires_grad=False")
    if inputs.dim() == 0 or targets.dim() == 0:
        raise ValueError("inputs and targets need a leading sample dimension")
    if inputs.shape[0] == 0:
        raise ValueError("empty batch: the empirical Fisher needs at least one sample")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets hold different numbers of samples: "
            f"{inputs.shape[0]} vs {targets.shape[0]}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
