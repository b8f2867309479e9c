"""What a natural step costs (issue 18): the full-covariance step's O(d³) work counted
(``tests/op_count.py``), and the cheaper forms of its parts checked against the plain ones."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from torch.distributions import transform_to

from pyro_natgrad import NaturalGradient
from pyro_natgrad.demo import logistic_model
from pyro_natgrad.families.gaussian_step import lower_product, lower_solve
from pyro_natgrad.guides import ScaledUnitCholesky
from pyro_natgrad.optim import Candidate
from pyro_natgrad.optim.checks import all_finite, in_support
from pyro_natgrad.optim.proposal import Deferred
from pyro_natgrad.pullback import args_gradient, coordinate_gradient

from .op_count import count_ops

F64 = torch.float64


@pytest.mark.parametrize("batch", [(2,), ()], ids=["batched", "unbatched"])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("d", [10, 130, 257])
def test_lower_product_is_the_lower_triangle_of_the_product(d, dtype, tol, batch):
    """Batched (the blocks' products broadcast) and unbatched (accumulated in place)."""
    g = torch.Generator().manual_seed(d)
    upper = torch.randn(*batch, d, d, generator=g, dtype=F64).triu()
    lower = torch.randn(d, d, generator=g, dtype=F64).tril()
    expected = (upper @ lower).tril()
    got = lower_product(upper.to(dtype), lower.to(dtype))
    assert got.dtype == dtype and got.shape == (*batch, d, d)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * d)


def test_lower_product_takes_a_third_of_the_product():
    """d = 256 in blocks of 64: Σ_I (4 − I)(I + 1)·64³ = 20·64³ = 0.3125·d³ multiply–adds."""
    d = 256
    upper, lower = torch.ones(d, d, dtype=F64).triu(), torch.ones(d, d, dtype=F64).tril()
    with count_ops(d) as ops:
        lower_product(upper, lower)
    assert ops.work == pytest.approx(0.3125), ops.work
    with count_ops(d) as ops:
        upper @ lower
    assert ops.work == 1.0 and ops.cubic == 1


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("d", [10, 130, 300])
def test_lower_solve_is_the_triangular_solve(d, dtype, tol):
    g = torch.Generator().manual_seed(d)
    factor = torch.randn(2, d, d, generator=g, dtype=F64).tril() / d ** 0.5
    factor.diagonal(dim1=-2, dim2=-1).copy_(1 + torch.rand(2, d, generator=g, dtype=F64))
    lower = torch.randn(d, d, generator=g, dtype=F64).tril()
    expected = torch.linalg.solve_triangular(factor, lower, upper=False, left=False)
    got = lower_solve(lower.to(dtype), factor.to(dtype))
    assert got.dtype == dtype and got.shape == (2, d, d)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * d)
    assert bool((got.triu(1) == 0).all())
    unbatched = lower_solve(lower.to(dtype), factor[0].to(dtype))  # accumulated in place
    torch.testing.assert_close(unbatched.double(), expected[0], rtol=tol, atol=tol * d)


def test_lower_solve_takes_a_fifth_of_the_solve():
    """d = 512 in 8 blocks of 64, column block k (from the right) solved and then subtracted
    from the k blocks left of it: Σ_k (8 − k)(½ + k)·64³ = 102·64³ ≈ 0.199·d³ multiply–adds (a
    triangular solve with a d×d right-hand side: 0.5·d³); the upper triangle is never read."""
    d = 512
    factor = torch.eye(d, dtype=F64)
    with count_ops(d) as ops:
        got = lower_solve(torch.ones(d, d, dtype=F64), factor)
    assert ops.work == pytest.approx(102 / 512), ops.work
    assert torch.equal(got, torch.ones(d, d, dtype=F64).tril())


@pytest.mark.parametrize("scale_constraint", [constraints.softplus_positive, constraints.positive],
                         ids=["softplus", "exp"])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_closed_form_args_gradient_equals_autograd(scale_constraint, dtype, tol):
    """AutoMultivariateNormal's (loc, scale, unit) ↦ (loc, L = diag(scale)·unit): the closed
    form of ∂L/∂(loc, L) equals the vector-Jacobian product through the inverse map, for unit
    gradients with and without an upper triangle, batched."""
    d = 7
    g = torch.Generator().manual_seed(3)
    param = ScaledUnitCholesky(("loc", "scale", "unit"), (
        constraints.real, scale_constraint, constraints.unit_lower_cholesky))
    loc = torch.randn(2, d, generator=g, dtype=F64)
    tril = torch.randn(2, d, d, generator=g, dtype=F64).tril(-1)
    tril.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(2, d, generator=g, dtype=F64) + 0.3)
    for unit_grad in (torch.randn(2, d, d, generator=g, dtype=F64).tril(-1),
                      torch.randn(2, d, d, generator=g, dtype=F64)):
        grads = [torch.randn(2, d, generator=g, dtype=F64), torch.randn(2, d, generator=g,
                                                                        dtype=F64), unit_grad]
        args = (loc.to(dtype), tril.to(dtype))
        grads = [x.to(dtype) for x in grads]
        got = args_gradient(param, args, grads)
        expected = coordinate_gradient(param, lambda *a: a, args, grads)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_all_finite_by_one_sum():
    big = torch.full((3,), 3e38)  # float32: finite elements whose sum overflows
    assert all_finite([torch.ones(4, 4), torch.zeros(2)])
    assert all_finite([big, big])  # the sum overflows; the elementwise test decides
    assert all_finite([]) and all_finite([torch.zeros(0)])
    for bad in (float("nan"), math.inf, -math.inf):
        x = torch.zeros(5, dtype=F64)
        x[2] = bad
        assert not all_finite([torch.ones(3), x])
    plus, minus = torch.tensor([math.inf]), torch.tensor([-math.inf])
    assert not all_finite([plus, minus])  # the sum is NaN


@pytest.mark.parametrize("constraint", [constraints.real, constraints.real_vector,
                                        constraints.unit_lower_cholesky],
                         ids=["real", "real_vector", "unit_lower_cholesky"])
def test_constraints_in_support_does_not_evaluate_map_every_finite_value_inside(constraint):
    """``in_support`` skips a constraint only where its transform maps every finite value to a
    finite point of the support (values are checked finite first): the extremes of float64 and
    float32 included."""
    for dtype in (F64, torch.float32):
        top = torch.finfo(dtype).max
        x = torch.tensor([[top, -top, 0.0], [1.0, -1e-30, top], [-top, 2.0, 0.5]], dtype=dtype)
        y = transform_to(constraint)(x)
        assert bool(torch.isfinite(y).all()) and bool(constraint.check(y).all())


def test_in_support_still_checks_the_other_constraints():
    pyro.clear_param_store()
    pyro.param("unit", torch.eye(3), constraint=constraints.unit_lower_cholesky)
    pyro.param("scale", torch.ones(3), constraint=constraints.softplus_positive)
    unit = {"unit": torch.randn(3, 3) * 1e30}
    assert in_support(Candidate(unit, rate=1.0)) is None
    assert in_support(Candidate({"scale": torch.full((3,), -1e3)}, rate=1.0)) == "domain"
    pyro.clear_param_store()


def test_deferred_values_are_formed_once_on_first_access():
    built = []

    def build():
        built.append(1)
        return {"a": torch.zeros(2)}

    values = Deferred(build)
    candidate = Candidate(values, rate=0.5, kl=0.1)
    assert not built
    assert list(candidate.values) == ["a"] and len(candidate.values) == 1
    torch.testing.assert_close(candidate.values["a"], torch.zeros(2))
    assert dict(candidate.values.items()).keys() == {"a"}
    assert built == [1]


def test_optimizer_step_work_on_a_full_covariance_guide():
    """d = 256, 8 particles: per optimizer call the O(d³) work is the lower triangle of LᵀḠ
    (0.31·d³ multiply–adds in row blocks), one Cholesky (d³/3) per factorization and the accepted
    candidate's factor L U⁻ᵀ (0.31·d³ in row blocks), all else O(d²) (measured 21·d²: Lanczos'
    matrix–vector products, the floor check's inverse iteration, …): at most
    0.62·d³ + factorizations·d³/3 + 30·d². (Before: a full d×d product and a full triangular
    solve per factorization, 1.5·d³ + factorizations·0.83·d³.)"""
    d = 256
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, d, generator=g, dtype=F64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.linspace(-1, 1, d, dtype=F64) / 4), generator=g)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoMultivariateNormal(logistic_model)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        elbo.loss(logistic_model, guide, X, y)
    optim = NaturalGradient(guide)
    svi = SVI(logistic_model, guide, optim, elbo)
    counted = []

    def counting(*args, **kwargs):
        with count_ops(d) as ops:
            optim(*args, **kwargs)
        (step,) = optim.last_step.values()
        counted.append((step["method"], ops.factorizations, ops.by_name(), ops.work))

    svi.optim = counting
    for _ in range(6):
        svi.step(X, y)
    stepped = [c for c in counted if c[0] == "natural"]
    assert len(stepped) >= 4, counted
    for _, factorizations, names, work in stepped:
        assert factorizations == names["linalg_cholesky_ex"] >= 1, counted
        assert work <= 0.62 + factorizations / 3 + 30 / d, counted
    pyro.clear_param_store()
