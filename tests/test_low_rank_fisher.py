"""The low-rank Gaussian's Fisher in its arguments (loc, W, D): the operator that factors once for
many products, its preconditioner, and the preconditioned solve, checked against dense solves."""

import pytest
import torch
import torch.nn.functional as F

from pyro_natgrad.families.multivariate_normal import LowRankFisher, LowRankMultivariateNormal
from pyro_natgrad.fisher.closed_form import PulledBackFisher, solve_args_fisher
from pyro_natgrad.fisher.linalg import conjugate_gradient, flat, unflat

from .op_count import count_ops

FAMILY = LowRankMultivariateNormal()


def _args(d=30, r=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(d, generator=g, dtype=dtype)
    w = torch.randn(d, r, generator=g, dtype=dtype) * torch.linspace(0.1, 2.0, r, dtype=dtype)
    cov_diag = torch.exp(torch.empty(d, dtype=dtype).uniform_(-4, 0, generator=g))
    return loc, w, cov_diag


def _dense(operator, args):
    """The matrix of the args-space Fisher from its product on every argument direction."""
    eye = torch.eye(sum(a.numel() for a in args), dtype=args[0].dtype)
    return torch.cat([f.reshape(len(eye), -1) for f in operator(tuple(unflat(eye, args)))], -1)


class _Counting:
    """An operator that counts its products and keeps its preconditioner."""

    def __init__(self, operator, precondition=True):
        self.operator, self.products = operator, 0
        if precondition:
            self.preconditioner = operator.preconditioner

    def __call__(self, v):
        self.products += 1
        return self.operator(v)


def test_operator_factors_once_and_equals_the_product():
    args = _args()
    leaves = [a.clone().requires_grad_() for a in args]
    v = flat([torch.randn_like(a) for a in args])
    r = args[1].shape[-1]
    with count_ops(r) as ops:
        fisher = PulledBackFisher([(FAMILY, tuple(leaves), 1.0)], leaves)
        products = [fisher.mvp(v) for _ in range(4)]
    assert ops.by_name()["linalg_cholesky"] == 1, ops.calls  # the capacitance, once
    operator = FAMILY.args_fisher_operator(args)
    tangent = tuple(unflat(v, args))
    expected = flat(FAMILY.args_fisher_product(args, tangent))
    assert torch.equal(flat(operator(tangent)), expected)
    for product in products:  # leaves are the args: J = I
        torch.testing.assert_close(product, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_preconditioned_solve_equals_dense_solve(dtype, tol):
    args = _args(d=60, r=5, dtype=dtype, seed=1)
    operator = LowRankFisher(args)
    dense = _dense(operator, args).double()
    damping = 1e-2 * float(dense.trace()) / len(dense)
    b = tuple(torch.randn(a.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
              for a in args)
    expected = torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=dense.dtype),
                                  flat(b).double())
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    counting = _Counting(operator)
    x = flat(solve_args_fisher(counting, b, damping, max_iter=500, rtol=rtol))
    assert x.dtype == dtype
    torch.testing.assert_close(x.double(), expected, rtol=tol, atol=tol * float(
        expected.abs().max()))
    plain = _Counting(operator, precondition=False)
    solve_args_fisher(plain, b, damping, max_iter=500, rtol=rtol)
    assert counting.products < plain.products / 2, (counting.products, plain.products)


def test_preconditioner_is_symmetric_and_exact_on_the_mean():
    args = _args(seed=3)
    operator = LowRankFisher(args)
    damping = 0.1
    inverse = operator.preconditioner(damping)
    g = torch.Generator().manual_seed(4)
    u, v = ([torch.randn(a.shape, generator=g, dtype=a.dtype) for a in args] for _ in range(2))
    lhs, rhs = flat(u) @ flat(inverse(tuple(v))), flat(inverse(tuple(u))) @ flat(v)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    assert float(flat(u) @ flat(inverse(tuple(u)))) > 0
    loc, w, cov_diag = args
    cov = w @ w.T + torch.diag(cov_diag)
    zero = [torch.zeros_like(a) for a in args]
    out = inverse((v[0], zero[1], zero[2]))
    expected = torch.linalg.solve(torch.linalg.inv(cov) + damping * torch.eye(len(loc),
                                                                              dtype=loc.dtype),
                                  v[0])
    torch.testing.assert_close(out[0], expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="damping"):
        operator.preconditioner(0.0)


def test_natural_direction_in_pyro_low_rank_params():
    """AutoLowRankMultivariateNormal's params θ = (loc, u, P): scale s = softplus(u),
    W = P·diag-rows(s), D = s². The direction (Jᵀ(F + λI)J)⁻¹g_θ in θ equals J⁻¹(F + λI)⁻¹J⁻ᵀg_θ
    with J⁻¹ and J⁻ᵀ products through the inverse map (args ↦ θ) and the solve in args."""
    d, r = 12, 3
    loc, w, cov_diag = _args(d, r, seed=5)

    def to_args(theta):
        t_loc, u, p = unflat(theta, [loc, loc, w])
        s = F.softplus(u)
        return flat([t_loc, p * s.unsqueeze(-1), s.square()])

    def to_theta(a):
        a_loc, a_w, a_d = unflat(a, [loc, w, cov_diag])
        s = a_d.sqrt()
        return flat([a_loc, s + torch.log(-torch.expm1(-s)), a_w / s.unsqueeze(-1)])

    point = flat([loc, w, cov_diag])
    theta = to_theta(point)
    torch.testing.assert_close(to_args(theta), point)
    jac = torch.func.jacrev(to_args)(theta)
    operator = LowRankFisher((loc, w, cov_diag))
    dense = _dense(operator, (loc, w, cov_diag))
    damping = 0.05
    g_theta = torch.randn(theta.shape, dtype=theta.dtype,
                          generator=torch.Generator().manual_seed(6))
    metric = jac.T @ (dense + damping * torch.eye(len(dense), dtype=dense.dtype)) @ jac
    expected = torch.linalg.solve(metric, g_theta)
    _, pull = torch.func.vjp(to_theta, point)
    (g_args,) = pull(g_theta)  # J⁻ᵀ g_θ
    y = solve_args_fisher(operator, tuple(unflat(g_args, [loc, w, cov_diag])), damping,
                          max_iter=300, rtol=1e-12)
    x = torch.func.jacrev(to_theta)(point) @ flat(y)  # J⁻¹ y
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-8)


def test_preconditioned_conjugate_gradient():
    """An exact preconditioner solves in one product; none gives the plain iteration."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(20, 20, generator=g, dtype=torch.float64)
    a = a @ a.T + torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    calls = []

    def mvp(v):
        calls.append(1)
        return a @ v

    x = conjugate_gradient(mvp, b, 0.5, 100, 1e-12, lambda v: torch.linalg.solve(
        a + 0.5 * torch.eye(20, dtype=a.dtype), v))
    expected = torch.linalg.solve(a + 0.5 * torch.eye(20, dtype=a.dtype), b)
    torch.testing.assert_close(x, expected)
    assert len(calls) == 1
    calls.clear()
    torch.testing.assert_close(conjugate_gradient(mvp, b, 0.5, 100, 1e-12), expected)
    assert len(calls) > 5
