"""The Bures–Wasserstein metric of AutoLowRankMultivariateNormal in the guide's own params
(ScaledLowRankBures): its closed-form products against the autograd pullback of the W₂ metric
(BuresMetric), its preconditioner, and WassersteinGradient's step with it against the dense
solve."""

import pyro
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal

from pyro_natgrad import WassersteinGradient
from pyro_natgrad.demo import logistic_model
from pyro_natgrad.fisher.autodiff import jacobian
from pyro_natgrad.fisher.linalg import flat, without_rotations
from pyro_natgrad.guides import ScaledLowRank
from pyro_natgrad.optim import GaugeProjection, MetricSolve
from pyro_natgrad.optim.bures import _low_rank_bures
from pyro_natgrad.pullback import ScaledLowRankCoordinates
from pyro_natgrad.wasserstein import BuresMetric, ScaledLowRankBures

from .cg_products import preconditioned_and_plain

F64 = torch.float64
ROLES = ("loc", "scale", "factor")
NAMES = ("factor", "loc", "scale")  # the group's order (sorted names), not the roles'


def _scaled(d=14, r=3, dtype=F64, seed=8, multiplicity=2.0, spread=0.7, factor=1.0,
            scale_constraint=constraints.softplus_positive, gauge_free=False):
    """The closed-form metric and the autograd pullback of the dense W₂ metric at random params;
    ``spread``: of the unconstrained scales; ``factor``: P's size (|Pᵢ|² ≫ 1 is Dᵢ ≪ |Wᵢ|²)."""
    g = torch.Generator().manual_seed(seed)
    values = {"loc": torch.randn(d, generator=g, dtype=dtype),
              "scale": torch.randn(d, generator=g, dtype=dtype) * spread - 1,
              "factor": torch.randn(d, r, generator=g, dtype=dtype) * factor / r ** 0.5}
    param = ScaledLowRank(ROLES, (constraints.real, scale_constraint, constraints.real))
    leaves = {n: v.clone().requires_grad_() for n, v in values.items()}
    loc, w, cov_diag = param.args(leaves)
    pulled = BuresMetric([(loc, w @ w.mT + torch.diag(cov_diag), multiplicity)],
                         [leaves[n] for n in NAMES])
    coords = ScaledLowRankCoordinates(NAMES, ROLES, values, scale_constraint)
    return ScaledLowRankBures(coords, multiplicity, gauge_free), pulled, values


def _matrix(mvp, n, dtype):
    return torch.stack([mvp(e) for e in torch.eye(n, dtype=dtype)])


def _gauge_free(g, p):
    """g (NAMES order: the factor first) without its component along P's rotations."""
    d, r = p.shape
    return torch.cat([without_rotations(p, g[:d * r].reshape(d, r)).reshape(-1), g[d * r:]])


@pytest.mark.parametrize("scale_constraint", [constraints.softplus_positive, constraints.positive],
                         ids=["softplus", "exp"])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 2e-4)])
def test_scaled_low_rank_bures_equals_the_pulled_back_metric(scale_constraint, dtype, tol):
    """Products (no Lyapunov solve for the scales, none of diag S) equal the autograd pullback
    of the dense Bures metric (one eigh per product, double backward), as matrices and for a
    batch of tangents."""
    metric, pulled, values = _scaled(dtype=dtype, scale_constraint=scale_constraint)
    n = sum(v.numel() for v in values.values())
    dense = pulled.dense()
    scale = float(dense.abs().max())
    torch.testing.assert_close(_matrix(metric.mvp, n, dtype), dense, rtol=tol, atol=tol * scale)
    batch = torch.randn(3, n, dtype=dtype, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(metric.mvp(batch), torch.stack([metric.mvp(b) for b in batch]),
                               rtol=tol, atol=tol * scale)


def test_bures_metric_dense_has_the_jacobian_shape_of_a_matrix_output():
    """BuresMetric.dense() of a low-rank covariance with more entries than params (forward-mode
    Jacobian of a d × d output) equals its products (it failed with a shape error: the
    forward-mode Jacobian kept the output's shape)."""
    _, pulled, values = _scaled(d=6, r=2)
    n = sum(v.numel() for v in values.values())
    assert 36 > n
    torch.testing.assert_close(pulled.dense(), _matrix(pulled.mvp, n, F64), rtol=1e-12,
                               atol=1e-12)
    x = torch.randn(3, requires_grad=True, dtype=F64)
    torch.testing.assert_close(jacobian(x[:, None] * x, [x]),
                               torch.autograd.functional.jacobian(
                                   lambda t: t[:, None] * t, x.detach()).reshape(9, 3))


def test_scaled_low_rank_bures_preconditioner_is_symmetric_and_exact_on_loc():
    """On gauge-free vectors the preconditioner is symmetric positive definite, and exact on the
    loc block (identity in the W₂ metric, decoupled)."""
    metric, pulled, values = _scaled(gauge_free=True)
    n = sum(v.numel() for v in values.values())
    damping = 0.05
    inverse = _matrix(metric.preconditioner(damping), n, F64)
    p = values["factor"]
    basis = torch.stack([_gauge_free(e, p) for e in torch.eye(n, dtype=F64)])
    evals, evecs = torch.linalg.eigh(basis)
    free = evecs[:, evals > 0.5]  # orthonormal basis of the rotation-free vectors
    restricted = free.T @ inverse @ free
    torch.testing.assert_close(restricted, restricted.T, rtol=1e-10, atol=1e-10)
    assert float(torch.linalg.eigvalsh(restricted).min()) > 0
    d, r = p.shape
    loc = slice(d * r, d * r + d)  # NAMES order: factor, loc, scale
    metric_loc = pulled.dense()[loc, loc] + damping * torch.eye(d, dtype=F64)
    torch.testing.assert_close(inverse[loc, loc], torch.linalg.inv(metric_loc), rtol=1e-12,
                               atol=1e-12)
    with pytest.raises(ValueError, match="damping"):
        metric.preconditioner(0.0)


@pytest.mark.parametrize("factor", [1.0, 30.0], ids=["D~WW", "D<<WW"])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-6), (torch.float32, 1e-3)])
def test_scaled_low_rank_bures_preconditioned_solve_equals_the_dense_solve(dtype, tol, factor):
    """(m·G_θ + λI)⁻¹g (λ = 1e-6, g gauge-free) by preconditioned CG equals the dense solve, in
    at most 40 products and under a third of plain CG's, also where the scales' rows nearly
    repeat P's (|Pᵢ|² ~ 300: a block preconditioner without the change of coordinates needed
    hundreds); the solution has no rotation component."""
    metric, pulled, values = _scaled(d=40, r=5, dtype=dtype, seed=10, spread=0.7,
                                     factor=factor, gauge_free=True)
    n = sum(v.numel() for v in values.values())
    dense = pulled.dense().double()
    damping = 1e-6
    p, d, r = values["factor"], 40, 5
    g = _gauge_free(torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(11)), p)
    evals, evecs = torch.linalg.eigh(dense)
    keep = evals > n * torch.finfo(F64).eps * evals.max()  # the dense solve off the null space
    expected = evecs[:, keep] @ ((evecs[:, keep].T @ g.double()) / (evals[keep] + damping))
    rtol = 1e-10 if dtype == F64 else 1e-5
    x, preconditioned, plain = preconditioned_and_plain(metric.mvp, g, damping, rtol,
                                                        metric.preconditioner(damping))
    assert x.dtype == dtype
    torch.testing.assert_close(x.double(), expected, rtol=tol, atol=tol * float(
        expected.abs().max()))
    assert preconditioned <= 40 and preconditioned < plain / 3, (preconditioned, plain)
    step = x[:d * r].reshape(d, r)
    rotation = step - without_rotations(p, step)
    assert float(rotation.norm()) < 100 * torch.finfo(dtype).eps * float(step.norm())


def _logistic_group(d=12, rank=3, seed=12, dtype=F64):
    """An AutoLowRankMultivariateNormal guide after a few Adam steps on a logistic regression,
    with a Monte Carlo gradient (8 particles): its group, leaves and gradients."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(60, d, generator=g, dtype=dtype)
    y = torch.bernoulli(torch.sigmoid(X @ torch.linspace(-2, 2, d, dtype=dtype)), generator=g)
    guide = AutoLowRankMultivariateNormal(logistic_model, rank=rank)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    pyro.infer.SVI(logistic_model, guide, pyro.optim.Adam({"lr": 0.05}), elbo).step(X, y)
    store = pyro.get_param_store()
    for _ in range(20):
        pyro.infer.SVI(logistic_model, guide, pyro.optim.Adam({"lr": 0.05}), elbo).step(X, y)
    leaves = dict(sorted((n, store.get_param(n).unconstrained()) for n in store.keys()))
    for p in leaves.values():
        p.grad = None
    elbo.loss_and_grads(logistic_model, guide, X, y)
    grads = {n: p.grad.detach().clone() for n, p in leaves.items()}
    optim = WassersteinGradient(guide)
    (group,) = optim.reader.read(leaves)
    return optim, group, leaves, grads


def _direction(solve, group, leaves, grads):
    key = group.param_names
    proposal = solve.propose(key, group, leaves, grads, "bures")
    theta = flat([leaves[n].detach() for n in key])
    return theta - flat([proposal.candidate(1.0).values[n] for n in key])


def test_wasserstein_low_rank_direction_equals_the_autodiff_bures_solve():
    """The plain (unframed) solve on an AutoLowRankMultivariateNormal group (d = 12, rank 3, a
    Monte Carlo gradient) is the closed-form metric by preconditioned CG, and its direction
    equals the dense solve of the autograd-pulled-back BuresMetric (form="dense", which drops the
    metric's null space, P's rotations) to 1e-5 relative, with or without the gradient's gauge
    projection on the dense side."""
    _, group, leaves, grads = _logistic_group()
    solve = MetricSolve(framed=False)
    assert solve.form is None and solve.gauge is not None
    assert isinstance(_low_rank_bures(group, leaves, True), ScaledLowRankBures)
    got = _direction(solve, group, leaves, grads)
    for gauge in (GaugeProjection(), None):
        dense = _direction(MetricSolve(form="dense", gauge=gauge), group, leaves, grads)
        assert float((got - dense).norm() / dense.norm()) < 1e-5
    pyro.clear_param_store()


def test_framed_direction_is_the_bures_solve_in_q_frame():
    """The default (framed) direction on an AutoLowRankMultivariateNormal group (d = 12, rank 3,
    a Monte Carlo gradient) equals the dense solve of the Bures metric of q's frame pulled back by
    autograd: BuresMetric of (L⁻¹m(θ), L⁻¹Σ(θ)L⁻ᵀ), L the Cholesky factor of Σ at the current
    θ, held fixed. This checks G = F_m ⊕ ½F_Σ, which the step solves as F⁻¹(g_m, 2g_Σ), against
    the W₂ metric itself (relative damping off; 1e-5 relative)."""
    _, group, leaves, grads = _logistic_group()
    param = group.sites[0].parameterization
    key = group.param_names
    live = {n: leaves[n].detach().clone().requires_grad_() for n in key}
    loc, w, cov_diag = param.args({n: live[n] for n in param.param_names})
    cov = w @ w.mT + torch.diag(cov_diag)
    frame = torch.linalg.cholesky(cov.detach())
    framed_loc = torch.linalg.solve_triangular(frame, loc.unsqueeze(-1), upper=False).squeeze(-1)
    half = torch.linalg.solve_triangular(frame, cov, upper=False)
    framed_cov = torch.linalg.solve_triangular(frame, half.mT, upper=False)
    metric = BuresMetric([(framed_loc, framed_cov, group.sites[0].multiplicity)],
                         [live[n] for n in key])
    g = flat(GaugeProjection().apply(group, leaves, grads))
    evals, evecs = torch.linalg.eigh(metric.dense())
    keep = evals > 1e-9 * evals.max()  # drop the null space, P's rotations
    expected = evecs[:, keep] @ ((evecs[:, keep].mT @ g) / evals[keep])
    got = _direction(MetricSolve(relative_damping=0.0, damping=1e-12), group, leaves, grads)
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    pyro.clear_param_store()


@pytest.mark.parametrize("d, rank, structured", [(3, 2, False), (4, 2, False), (5, 2, True),
                                                 (12, 3, True)])
def test_low_rank_bures_only_where_the_rotations_are_the_whole_null_space(d, rank, structured):
    """The closed-form CG solve is taken where (d − r)² ≥ d + r (Ledermann's bound); below it the
    metric has null directions besides P's r(r−1)/2 rotations (d = 3, r = 2: 3 of them, one a
    rotation), which a damped CG solve of a gauge-projected gradient would step along as 1/λ,
    and the dense solve is kept."""
    _, pulled, _ = _scaled(d=d, r=rank)
    evals = torch.linalg.eigvalsh(pulled.dense())
    null = int((evals < 1e-10 * evals.max()).sum())
    assert (null == rank * (rank - 1) // 2) == structured
    pyro.clear_param_store()

    def model():
        pyro.sample("z", pyro.distributions.Normal(torch.zeros(d, dtype=F64), 1.0).to_event(1))

    guide = AutoLowRankMultivariateNormal(model, rank=rank)
    guide()
    store = pyro.get_param_store()
    leaves = dict(sorted((n, store.get_param(n).unconstrained()) for n in store.keys()))
    (group,) = WassersteinGradient(guide).reader.read(leaves)
    assert (_low_rank_bures(group, leaves, True) is not None) == structured
    pyro.clear_param_store()


def test_a_low_rank_bures_step_is_held_to_its_length_along_the_coupling():
    """WassersteinGradient's plain Bures step on AutoLowRankMultivariateNormal (logistic
    regression, d = 100, 8 particles, ``framed=False``): the KL a step reports (the squared W₂
    length the trust region bounds) is at least its length along the reparameterization
    coupling, ½E|δT(ε)|² = ½(|δm|² + ‖δW‖²_F + ‖δ√D‖²) for z = m + Wε₁ + √D∘ε₂ (exact here; the
    optimizer's is a 64-draw estimate), not only the metric's quadratic model, which at Pyro's
    initial scales reported ~600 for steps whose next −ELBO was 10⁷–10¹⁴."""
    from benchmarks.problems import correlated_logistic

    X, y = correlated_logistic(100, 500)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoLowRankMultivariateNormal(logistic_model)
    guide(X, y)  # its params
    opt = WassersteinGradient(guide, solve=MetricSolve(framed=False))
    svi = SVI(logistic_model, guide, opt, Trace_ELBO(num_particles=8, vectorize_particles=True))
    checked = 0
    for _ in range(6):
        before = guide.get_posterior()
        loc0, w0, d0 = (t.detach().clone() for t in (before.loc, before.cov_factor,
                                                       before.cov_diag))
        svi.step(X, y)
        (step,) = opt.last_step.values()
        if step["method"] != "bures_metric":
            continue
        after = guide.get_posterior()
        length = 0.5 * float((after.loc - loc0).square().sum()
                             + (after.cov_factor - w0).square().sum()
                             + (after.cov_diag.sqrt() - d0.sqrt()).square().sum())
        assert step["kl"] >= 0.7 * length, (step["kl"], length)
        checked += 1
    assert checked >= 3
