"""Counts the metric–vector products of a conjugate-gradient solve with and without its
preconditioner, so a test can bound them."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pyro_natgrad.fisher.linalg import conjugate_gradient


def preconditioned_and_plain(mvp: Callable[[Tensor], Tensor], g: Tensor, damping: float,
                             rtol: float, preconditioner: Callable[[Tensor], Tensor]
                             ) -> tuple[Tensor, int, int]:
    """The preconditioned solve of (A + damping·I)x = g (A given as ``mvp``, at most 1000
    products, to ``rtol``), and the products it took and the plain solve takes."""
    counts = []

    def counted(v: Tensor) -> Tensor:
        counts[-1] += 1
        return mvp(v)

    counts.append(0)
    x = conjugate_gradient(counted, g, damping, 1000, rtol, preconditioner)
    counts.append(0)
    conjugate_gradient(counted, g, damping, 1000, rtol)
    return x, counts[0], counts[1]
