"""The low-rank Gaussian's Fisher in its arguments (loc, W, D): the operator that factors once for
many products, its preconditioner, and the preconditioned solve, checked against dense solves;
and the same in AutoLowRankMultivariateNormal's own params (ScaledLowRankFisher)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal
from torch.distributions import kl_divergence

from pyro_natgrad import NaturalGradient
from pyro_natgrad.demo import logistic_model
from pyro_natgrad.families.multivariate_normal import LowRankFisher, LowRankMultivariateNormal
from pyro_natgrad.fisher.closed_form import PulledBackFisher, solve_args_fisher
from pyro_natgrad.fisher.linalg import conjugate_gradient, flat, unflat, without_rotations
from pyro_natgrad.fisher.low_rank import ScaledLowRankFisher
from pyro_natgrad.guides import GuideReader, ScaledLowRank
from pyro_natgrad.optim import FisherSolve, GaugeProjection
from pyro_natgrad.pullback import ScaledLowRankCoordinates

from .cg_products import preconditioned_and_plain
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


# ----- AutoLowRankMultivariateNormal's params: ScaledLowRankFisher ---------------------------
ROLES = ("loc", "scale", "factor")
NAMES = ("factor", "loc", "scale")  # the group's order (sorted names), not the roles'


def _scaled(d=14, r=3, dtype=torch.float64, seed=8, multiplicity=2.0,
            scale_constraint=constraints.softplus_positive):
    g = torch.Generator().manual_seed(seed)
    values = {"loc": torch.randn(d, generator=g, dtype=dtype),
              "scale": torch.randn(d, generator=g, dtype=dtype) * 0.7 - 1,
              "factor": torch.randn(d, r, generator=g, dtype=dtype) / r ** 0.5}
    param = ScaledLowRank(ROLES, (constraints.real, scale_constraint, constraints.real))
    leaves = {n: v.clone().requires_grad_() for n, v in values.items()}
    pulled = PulledBackFisher([(FAMILY, param.args(leaves), multiplicity)],
                              [leaves[n] for n in NAMES])
    coords = ScaledLowRankCoordinates(NAMES, ROLES, values, scale_constraint)
    fisher = ScaledLowRankFisher(coords, multiplicity)
    return fisher, pulled, values


def _matrix(mvp, n, dtype):
    return torch.stack([mvp(e) for e in torch.eye(n, dtype=dtype)])


@pytest.mark.parametrize("scale_constraint", [constraints.softplus_positive, constraints.positive],
                         ids=["softplus", "exp"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_scaled_low_rank_fisher_equals_the_pulled_back_fisher(scale_constraint, dtype, tol):
    """Products (closed-form J and Jᵀ around the Woodbury product) equal the autograd pullback
    of the args-space Fisher, as matrices and for a batch of tangents; the trace is exact."""
    fisher, pulled, values = _scaled(dtype=dtype, scale_constraint=scale_constraint)
    n = sum(v.numel() for v in values.values())
    dense = _matrix(pulled.mvp, n, dtype)
    scale = float(dense.abs().max())
    torch.testing.assert_close(_matrix(fisher.mvp, n, dtype), dense, rtol=tol, atol=tol * scale)
    batch = torch.randn(3, n, dtype=dtype, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(fisher.mvp(batch), torch.stack([fisher.mvp(b) for b in batch]),
                               rtol=tol, atol=tol * scale)
    torch.testing.assert_close(fisher.trace(), dense.diagonal().sum(), rtol=tol, atol=0.0)


def test_scaled_low_rank_preconditioner_is_the_pulled_back_block_inverse():
    """The preconditioner is symmetric positive definite, the exact inverse on the loc block
    (decoupled in the Fisher), and equals J⁻¹B⁻¹J⁻ᵀ/m formed densely: J the Jacobian of
    θ ↦ (loc, W, D) by autograd, B block-diagonal in (loc, W, D) with Σ⁻¹ + μI, Σ⁻¹ ⊗ K +
    μ diag(s)⁻² ⊗ I (K = WᵀΣ⁻¹W) and ½(Σ⁻¹)ᵢᵢ² + μ/(2sᵢs'ᵢ)², μ = λ/m."""
    multiplicity, damping = 2.0, 0.05
    fisher, pulled, values = _scaled(multiplicity=multiplicity)
    n = sum(v.numel() for v in values.values())
    inverse = _matrix(fisher.preconditioner(damping), n, torch.float64)
    torch.testing.assert_close(inverse, inverse.T, rtol=1e-12, atol=1e-12)
    assert float(torch.linalg.eigvalsh(inverse).min()) > 0
    metric = _matrix(pulled.mvp, n, torch.float64) + damping * torch.eye(n, dtype=torch.float64)
    d, r = values["factor"].shape
    loc = slice(d * r, d * r + d)  # NAMES order: factor, loc, scale
    torch.testing.assert_close(inverse[loc, loc], torch.linalg.inv(metric[loc, loc]),
                               rtol=1e-10, atol=1e-12)

    param = ScaledLowRank(ROLES, (constraints.real, constraints.softplus_positive,
                                  constraints.real))
    theta = flat([values[n] for n in NAMES])

    def to_args(t):
        return flat(param.args(dict(zip(NAMES, unflat(t, [values[n] for n in NAMES]),
                                        strict=True))))

    jacobian = torch.func.jacrev(to_args)(theta)  # rows (loc, W, D), columns NAMES
    _, w, cov_diag = param.args(values)
    s = F.softplus(values["scale"])
    cov_inv = torch.linalg.inv(w @ w.T + torch.diag(cov_diag))
    k = (w.T @ cov_inv @ w).contiguous()
    mu = damping / multiplicity
    blocks = torch.block_diag(
        torch.linalg.inv(cov_inv + mu * torch.eye(d, dtype=w.dtype)),
        torch.linalg.inv(torch.kron(cov_inv.contiguous(), k)
                         + mu * torch.kron(torch.diag(s ** -2), torch.eye(r, dtype=w.dtype))),
        torch.diag(1 / (0.5 * cov_inv.diagonal() ** 2
                        + mu / (2 * s * torch.sigmoid(values["scale"])) ** 2)))
    back = torch.linalg.inv(jacobian)
    torch.testing.assert_close(inverse, back @ blocks @ back.T / multiplicity,
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="damping"):
        fisher.preconditioner(0.0)


@pytest.mark.parametrize("gauge_free", [False, True], ids=["", "gauge-free"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_scaled_low_rank_preconditioned_solve_equals_the_dense_solve(dtype, tol, gauge_free):
    """(m·F_θ + λI)⁻¹g by preconditioned CG (rtol 1e-8) equals the dense solve, in under half the
    products of plain CG to the same tolerance. Gauge-free: g without a component along P's
    rotations, and the preconditioner keeping the iterates off them, so the solution has none
    (to rounding), as the exact one."""
    fisher, pulled, values = _scaled(d=40, r=5, dtype=dtype, seed=10)
    fisher.gauge_free = gauge_free
    n = sum(v.numel() for v in values.values())
    dense = _matrix(pulled.mvp, n, dtype).double()
    damping = 1e-2 * float(fisher.trace()) / n
    g = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(11))
    p, d, r = values["factor"], 40, 5
    if gauge_free:  # NAMES order: the factor first
        g = torch.cat([without_rotations(p, g[:d * r].reshape(d, r)).reshape(-1), g[d * r:]])
    expected = torch.linalg.solve(dense + damping * torch.eye(n, dtype=torch.float64), g.double())
    rtol = 1e-8 if dtype == torch.float64 else 1e-5
    x, preconditioned, plain = preconditioned_and_plain(fisher.mvp, g, damping, rtol,
                                                        fisher.preconditioner(damping))
    assert x.dtype == dtype
    torch.testing.assert_close(x.double(), expected, rtol=tol, atol=tol * float(
        expected.abs().max()))
    assert preconditioned < plain / 2, (preconditioned, plain)
    if gauge_free:
        step = x[:d * r].reshape(d, r)
        rotation = step - without_rotations(p, step)
        assert float(rotation.norm()) < 10 * torch.finfo(dtype).eps * float(step.norm())


def test_auto_low_rank_guide_is_read_with_its_parameterization():
    """The reader gives AutoLowRankMultivariateNormal's site the (loc, scale, cov_factor)
    parameterization: its arguments are the guide's distribution's, and the inverse map returns
    the params."""
    pyro.clear_param_store()

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(6, dtype=torch.float64), 1.0).to_event(1))

    guide = AutoLowRankMultivariateNormal(model, rank=2)
    guide()
    store = pyro.get_param_store()
    leaves = {n: store.get_param(n).unconstrained() for n in store.keys()}
    (group,) = GuideReader(guide).read(leaves)
    (site,) = group.sites
    param = site.parameterization
    assert isinstance(param, ScaledLowRank)
    with torch.no_grad():
        args = param.args(leaves)
        for got, expected in zip(args, FAMILY.args(site.base), strict=True):
            assert torch.equal(got, expected)
        back = param.unconstrained(args)
    for n in param.param_names:
        torch.testing.assert_close(back[n], leaves[n].detach(), rtol=1e-12, atol=1e-12)
    pyro.clear_param_store()


def _logistic_gradient(d, rank, rows, particles, seed):
    """An AutoLowRankMultivariateNormal on a logistic regression (float64), its params created
    and their ELBO gradient taken once: (guide, unconstrained leaves, gradients)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, d, generator=g, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(X @ torch.linspace(-1, 1, d, dtype=torch.float64)),
                        generator=g)
    guide = AutoLowRankMultivariateNormal(logistic_model, rank=rank)
    Trace_ELBO(num_particles=particles, vectorize_particles=True,
               max_plate_nesting=1).loss_and_grads(logistic_model, guide, X, y)
    store = pyro.get_param_store()
    leaves = dict(sorted((n, store.get_param(n).unconstrained()) for n in store.keys()))
    return guide, leaves, {n: p.grad.detach().clone() for n, p in leaves.items()}


def test_natural_gradient_low_rank_direction_equals_the_dense_fisher_solve():
    """NaturalGradient's step on an AutoLowRankMultivariateNormal group (d = 40, rank 6, 8
    particles, a Monte Carlo gradient) is θ − ρ(F_θ + λI)⁻¹g with g the gauge-projected
    gradient and λ = 1e-6 + 1e-2·tr F_θ / n, to the CG tolerance: at the defaults the residual
    |(F_θ + λI)d − g| is ≤ 1e-4·|g| (``cg_rtol``); with ``cg_rtol=1e-6`` the direction equals
    the dense solve with the pulled-back Fisher's matrix to 2e-5, as does the unpreconditioned
    CG of the pulled-back products run to convergence."""
    guide, leaves, grads = _logistic_gradient(d=40, rank=6, rows=100, particles=8, seed=12)
    steps = {}
    for rtol in (None, 1e-6):
        optim = NaturalGradient(guide, **({} if rtol is None else
                                          {"solve": FisherSolve(cg_rtol=rtol)}))
        (group,) = optim.reader.read(leaves)
        key = group.param_names
        proposal = optim.solve.propose(key, group, leaves, grads, monte_carlo=False)
        theta = flat([leaves[n].detach() for n in key])
        steps[rtol] = theta - flat([proposal.candidate(1.0).values[n] for n in key])
    gradient = flat(GaugeProjection().apply(group, leaves, grads))
    (site,) = group.sites
    pulled = PulledBackFisher([(site.family, site.family.args(site.base), site.multiplicity)],
                              [leaves[n] for n in key])
    n = theta.numel()
    dense = pulled.dense()
    damping = 1e-6 + 1e-2 * float(dense.trace()) / n
    matrix = dense + damping * torch.eye(n, dtype=dense.dtype)
    residual = float((matrix @ steps[None] - gradient).norm() / gradient.norm())
    assert 1e-6 < residual <= 1e-4, residual  # the default stopped early, within its tolerance
    expected = torch.linalg.solve(matrix, gradient)
    assert float((steps[1e-6] - expected).norm() / expected.norm()) < 2e-5
    before = conjugate_gradient(pulled.mvp, gradient, damping, 2000, 1e-12)
    assert float((before - expected).norm() / expected.norm()) < 1e-10
    pyro.clear_param_store()


def test_low_rank_candidates_are_measured_in_closed_form_without_the_guide(monkeypatch):
    """A natural-step candidate of an AutoLowRankMultivariateNormal is measured from its params
    alone: its KL is max(KL(q ‖ q'), KL(q' ‖ q)) of Pyro's own posterior at the candidate's
    params (torch's KL), and the guide is not re-run for it."""
    guide, leaves, grads = _logistic_gradient(d=15, rank=3, rows=60, particles=4, seed=4)
    optim = NaturalGradient(guide)
    (group,) = optim.reader.read(leaves)
    proposal = optim.solve.propose(group.param_names, group, leaves, grads, monte_carlo=False)
    def posterior():
        with torch.no_grad():
            q = guide.get_posterior()
            return dist.LowRankMultivariateNormal(q.loc.clone(), q.cov_factor.clone(),
                                                  q.cov_diag.clone())

    q = posterior()
    monkeypatch.setattr(optim.reader, "trace", None)  # a re-run of the guide would fail
    for rate in (0.01, 0.3):
        candidate = proposal.candidate(rate)
        assert optim._check(proposal, candidate, math.inf, leaves) is None
        with torch.no_grad():
            saved = {n: leaves[n].clone() for n in candidate.values}
            for n, v in candidate.values.items():
                leaves[n].copy_(v)
            moved = posterior()
            for n, v in saved.items():
                leaves[n].copy_(v)
        expected = max(float(kl_divergence(q, moved)), float(kl_divergence(moved, q)))
        assert candidate.kl == pytest.approx(expected, rel=1e-9)
    pyro.clear_param_store()
