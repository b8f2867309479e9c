"""Counts the O(d³) linear-algebra calls of a block of code, so a test can bound them.

>>> with count_ops(d) as ops:
...     step(...)
>>> assert ops.factorizations <= 1 and ops.cubic <= 3, ops.calls

Every torch call made from Python is seen (a ``TorchFunctionMode``: ``torch.linalg.*``, tensor
methods, the ``@`` operator), whatever module made it. A call is O(d³) when its matrices reach
``size`` (the caller's d): a factorization (Cholesky, LU through ``inv``/``solve``/``det``, QR,
eigen- or singular-value decompositions) of a matrix with both sides ≥ size; a triangular or
Cholesky solve with a square factor of side ≥ size and a right-hand side of ≥ size columns;
``cholesky_inverse`` of such a factor; a matrix product whose three dimensions are all ≥ size.
Matrix–vector work and smaller matrices are not counted. Calls made inside torch's C++ code
(e.g. the LU inside ``linalg.solve``) count as the one call that made them.

``work`` adds up the multiply–adds of every such call, large or small, in units of size³ (a
d×d product 1, a Cholesky ⅓, a triangular solve with a d×d right-hand side ½): it also sees
O(d³) work done in blocks smaller than d (e.g. :func:`~pyro_natgrad.families.gaussian_step.
lower_product`'s row blocks), which the call count does not.
"""

from __future__ import annotations

import math
from collections import Counter

from torch import Tensor, broadcast_shapes
from torch.overrides import TorchFunctionMode

FACTORIZATIONS = frozenset({
    "linalg_cholesky", "linalg_cholesky_ex", "cholesky", "linalg_inv", "linalg_inv_ex", "inverse",
    "linalg_solve", "linalg_solve_ex", "linalg_eigh", "linalg_eigvalsh", "linalg_eig",
    "linalg_eigvals", "linalg_svd", "svd", "linalg_svdvals", "linalg_qr", "qr", "linalg_lu",
    "linalg_lu_factor", "linalg_lu_factor_ex", "lu", "linalg_ldl_factor", "linalg_ldl_factor_ex",
    "linalg_det", "det", "linalg_slogdet", "slogdet", "logdet", "linalg_pinv", "pinverse",
    "linalg_lstsq", "linalg_matrix_rank", "linalg_matrix_power", "matrix_exp",
    "linalg_matrix_exp"})
SOLVES = frozenset({"linalg_solve_triangular", "triangular_solve", "cholesky_solve",
                    "linalg_lu_solve", "lu_solve"})
INVERSES = frozenset({"cholesky_inverse"})
PRODUCTS = frozenset({"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "addmm_",
                      "baddbmm", "baddbmm_", "linalg_multi_dot", "chain_matmul"})


class OpCounter(TorchFunctionMode):
    """The counting mode; ``calls`` lists (kind, op name) of every counted call, kind being
    ``"factorization"`` or ``"cubic"`` (the other O(d³) calls)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.calls: list[tuple[str, str]] = []
        self.multiply_adds = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        kind = self._kind(name, args, kwargs)
        if kind is not None:
            self.calls.append((kind, func.__name__))
        self.multiply_adds += _multiply_adds(name, args, kwargs)
        return func(*args, **kwargs)

    @property
    def work(self) -> float:
        """Multiply–adds of the linear algebra inside, in units of size³."""
        return self.multiply_adds / self.size ** 3

    @property
    def factorizations(self) -> int:
        return sum(kind == "factorization" for kind, _ in self.calls)

    @property
    def cubic(self) -> int:
        """All O(d³) calls, factorizations included."""
        return len(self.calls)

    def by_name(self) -> Counter:
        return Counter(name for _, name in self.calls)

    def _big(self, t) -> bool:
        return isinstance(t, Tensor) and t.dim() >= 2 and min(t.shape[-2:]) >= self.size

    def _kind(self, name: str, args: tuple, kwargs: dict) -> str | None:
        tensors = [a for a in args if isinstance(a, Tensor)] + [
            v for k, v in kwargs.items() if isinstance(v, Tensor) and k != "out"]
        if name in FACTORIZATIONS:
            return "factorization" if tensors and self._big(tensors[0]) else None
        if name in INVERSES:
            return "cubic" if tensors and self._big(tensors[0]) else None
        if name in SOLVES:
            # the square factor, and a right-hand side of ≥ size columns (rows when left=False)
            return "cubic" if sum(self._big(t) for t in tensors) >= 2 else None
        if name in PRODUCTS:
            return "cubic" if self._cubic_product(tensors) else None
        return None

    def _cubic_product(self, tensors: list[Tensor]) -> bool:
        mats = [t for t in tensors if t.dim() >= 2]
        if len(mats) < 2:
            return False
        a, b = mats[-2], mats[-1]
        return min(a.shape[-2], a.shape[-1], b.shape[-1]) >= self.size


def _multiply_adds(name: str, args: tuple, kwargs: dict) -> float:
    """Multiply–adds of one call: m·k·n per product, n³/3 per Cholesky or LU, n²k/2 per
    triangular solve with k right-hand sides, n²k per Cholesky or LU solve, 2n³/3 per
    ``cholesky_inverse``, n³ for any other factorization; times the batch."""
    operands = list(args) + [v for k, v in kwargs.items() if k != "out"]
    mats = [t for t in operands
            if isinstance(t, Tensor) and t.dim() >= 2 and t.is_floating_point()]
    if not mats:
        return 0.0
    if name in PRODUCTS:
        if len(mats) < 2:
            return 0.0
        a, b = mats[-2], mats[-1]
        batch = math.prod(broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        return float(batch * a.shape[-2] * a.shape[-1] * b.shape[-1])
    if name in SOLVES:
        if len(mats) < 2:
            return 0.0
        if name == "linalg_solve_triangular":  # (A, B, *, left)
            factor, rhs, left = mats[0], mats[1], kwargs.get("left", True)
        elif name in ("linalg_lu_solve", "lu_solve"):  # (LU, pivots, B)
            factor, rhs, left = mats[0], mats[-1], True
        else:  # triangular_solve(B, A), cholesky_solve(B, L)
            factor, rhs, left = mats[1], mats[0], True
        n = factor.shape[-1]
        k = rhs.shape[-1] if left else rhs.shape[-2]
        share = 0.5 if name in ("linalg_solve_triangular", "triangular_solve") else 1.0
        return float(math.prod(rhs.shape[:-2]) * n * n * k * share)
    n, batch = mats[0].shape[-1], math.prod(mats[0].shape[:-2])
    if name in INVERSES:
        return batch * 2 * n ** 3 / 3
    if name in FACTORIZATIONS:
        return batch * n ** 3 / (3 if "cholesky" in name or "lu" in name else 1)
    return 0.0


def count_ops(size: int) -> OpCounter:
    """A context manager counting the O(d³) calls made inside it, d = ``size``."""
    return OpCounter(size)
