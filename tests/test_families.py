"""The exponential-family geometry of every registered family, checked against closed forms,
autodiff, torch's own KL divergences and Monte Carlo covariances."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.distributions.torch_distribution import ExpandedDistribution, TorchDistributionMixin
from torch.distributions import kl_divergence

from pyro_natgrad.families import (
    FAMILIES,
    ExponentialFamily,
    Gamma,
    MultivariateNormal,
    Normal,
    family_of,
    unwrap,
)
from pyro_natgrad.families.multivariate_normal import scaled_low_rank_kl

DTYPES = (torch.float32, torch.float64)
RTOL = {torch.float32: 2e-3, torch.float64: 1e-8}
BY_NAME = {fam.name: fam for fam in FAMILIES}
ITERATIVE = [name for name, fam in BY_NAME.items() if not fam.closed_form_mean_map]
SEEDS = st.integers(0, 2**32 - 1)
D, RANK, K = 3, 2, 4


def _positive(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    """Log-uniform on [lo, hi]."""
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    return (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp()


def _scale_tril(g: torch.Generator, batch: int) -> torch.Tensor:
    off = 0.4 * torch.randn(batch, D, D, generator=g, dtype=torch.float64).tril(-1)
    return off + torch.diag_embed(_positive(g, (batch, D), 0.5, 2.0))


ARGS: dict[str, Callable[[torch.Generator, int], tuple[torch.Tensor, ...]]] = {
    "Normal": lambda g, b: (2 * torch.randn(b, generator=g, dtype=torch.float64),
                            _positive(g, (b,), 0.3, 3.0)),
    "MultivariateNormal": lambda g, b: (torch.randn(b, D, generator=g, dtype=torch.float64),
                                        _scale_tril(g, b)),
    "LowRankMultivariateNormal": lambda g, b: (
        torch.randn(b, D, generator=g, dtype=torch.float64),
        0.7 * torch.randn(b, D, RANK, generator=g, dtype=torch.float64),
        _positive(g, (b, D), 0.3, 2.0)),
    "Gamma": lambda g, b: (_positive(g, (b,), 0.3, 8.0), _positive(g, (b,), 0.3, 3.0)),
    "Exponential": lambda g, b: (_positive(g, (b,), 0.3, 3.0),),
    "Beta": lambda g, b: (_positive(g, (b,), 0.5, 8.0), _positive(g, (b,), 0.5, 8.0)),
    "Dirichlet": lambda g, b: (_positive(g, (b, K), 0.5, 8.0),),
    "Categorical": lambda g, b: (torch.softmax(torch.randn(b, K, generator=g,
                                                           dtype=torch.float64), -1),),
    "Bernoulli": lambda g, b: (torch.sigmoid(2 * torch.randn(b, generator=g,
                                                             dtype=torch.float64)),),
    "Poisson": lambda g, b: (_positive(g, (b,), 0.3, 8.0),),
}


def make_args(name: str, seed: int, dtype: torch.dtype, batch: int = 3) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(a.to(dtype) for a in ARGS[name](g, batch))


def assert_close(actual, expected, dtype: torch.dtype, rtol: float | None = None) -> None:
    """Entrywise |a - e| ≤ rtol·(|e| + max|e|): relative, with the scale of the whole tensor."""
    for a, e in zip(actual, expected, strict=True):
        rtol_ = RTOL[dtype] if rtol is None else rtol
        a, e = a.detach(), e.detach().to(a.dtype)
        torch.testing.assert_close(a, e, rtol=rtol_, atol=rtol_ * float(e.abs().max()))


def dense(fam: ExponentialFamily) -> ExponentialFamily:
    """The family whose ``natural_to_args`` builds the same distribution (low rank → dense)."""
    return BY_NAME["MultivariateNormal"] if not fam.full_rank else fam


def test_every_family_has_arguments():
    assert set(ARGS) == set(BY_NAME)


# ----- coordinate maps ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
@settings(max_examples=15, deadline=None)
@given(seed=SEEDS)
def test_round_trips(name, dtype, seed):
    fam = BY_NAME[name]
    args = make_args(name, seed, dtype)
    eta, mu = fam.args_to_natural(*args), fam.args_to_mean(*args)
    if fam.full_rank:
        assert_close(fam.natural_to_args(*eta), args, dtype)
        assert_close(fam.mean_to_args(*mu), args, dtype)
    assert_close(fam.natural_to_mean(*eta), mu, dtype)
    assert_close(fam.mean_to_natural(*mu), eta, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_gradient_of_log_partition_is_mean(name, dtype):
    fam = BY_NAME[name]
    eta = [e.requires_grad_() for e in fam.args_to_natural(*make_args(name, 0, dtype))]
    grads = torch.autograd.grad(fam.log_partition(*eta).sum(), eta)
    assert_close(grads, fam.natural_to_mean(*eta), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_flatten_round_trip(name, dtype):
    fam = BY_NAME[name]
    eta = fam.args_to_natural(*make_args(name, 1, dtype))
    flat, batch_shape = fam.flatten(eta)
    assert batch_shape == (3,)
    for a, b in zip(fam.unflatten(flat), eta, strict=True):
        assert torch.equal(a, b)


def test_maps_broadcast_over_batch_dims():
    fam = Gamma()
    concentration = torch.tensor([[0.5], [2.0], [5.0]], dtype=torch.float64)
    rate = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    eta = fam.args_to_natural(concentration, rate)
    fisher = fam.fisher(*eta)
    assert fisher.shape == (3, 4, 2, 2)
    single = fam.fisher(*fam.args_to_natural(concentration[2, 0], rate[1]))
    assert torch.equal(fisher[2, 1], single)
    back = fam.mean_to_args(*fam.args_to_mean(concentration, rate))
    assert_close(back, torch.broadcast_tensors(concentration, rate), torch.float64)


# ----- Fisher information -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_closed_form_fisher_matches_autodiff(name, dtype):
    fam = BY_NAME[name]
    eta = fam.args_to_natural(*make_args(name, 2, dtype))
    assert_close([fam.fisher(*eta)], [ExponentialFamily.fisher(fam, *eta)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_closed_form_fisher_matches_monte_carlo(name, dtype):
    """Each entry of the sample covariance of T(z), z ~ q (N draws, in float64), lies within
    c·SE of F(η), SE being the entry's Monte Carlo standard error. c is the Bonferroni threshold
    for a family-wise false-alarm rate of 1e-3 (normal approximation) over all entries tested."""
    fam = BY_NAME[name]
    args = make_args(name, 3, dtype, batch=2)
    eta = fam.args_to_natural(*args)
    fisher = fam.fisher(*eta).double()
    n = 40_000
    torch.manual_seed(0)
    z = fam.distribution(*(a.double() for a in args)).sample((n,))
    t = fam.flatten(fam.sufficient_statistics(z, *(e.double() for e in eta)))[0].double()
    centred = t - t.mean(0)
    products = centred.unsqueeze(-1) * centred.unsqueeze(-2)
    estimate = products.mean(0) * n / (n - 1)
    std_error = products.std(0) / math.sqrt(n)
    k = fisher.shape[-1]
    upper = torch.triu_indices(k, k)
    z_scores = ((estimate - fisher) / std_error)[..., upper[0], upper[1]]
    threshold = float(torch.special.ndtri(torch.tensor(1 - 1e-3 / (2 * z_scores.numel()))))
    assert float(z_scores.abs().max()) < threshold


def _kl_hessian(fam: ExponentialFamily, eta0: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """∂²/∂η² KL(q_η₀ ‖ q_η) at η = η₀, with torch's kl_divergence, one block per batch element."""
    family = dense(fam)
    flat0, batch_shape = fam.flatten(eta0)
    p = family.distribution(*family.natural_to_args(*eta0))

    def kl(flat: torch.Tensor) -> torch.Tensor:
        q = family.distribution(*family.natural_to_args(*fam.unflatten(flat)))
        return kl_divergence(p, q).sum()

    hessian = torch.autograd.functional.hessian(kl, flat0, vectorize=True)
    return torch.stack([hessian[i, :, i, :] for i in range(batch_shape.numel())])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_closed_form_fisher_is_hessian_of_kl(name, dtype):
    """The Hessian of KL(q_η₀ ‖ q_η) at η₀ is F(η₀) (Amari & Nagaoka 2000, §3.5). For the Gaussians
    the η₂ directions need no restriction: natural_to_args symmetrizes η₂, so the KL, like A,
    depends only on sym η₂ and its Hessian equals Cov[(z, vec zzᵀ)]."""
    fam = BY_NAME[name]
    eta = fam.args_to_natural(*make_args(name, 4, dtype))
    assert_close([_kl_hessian(fam, eta)], [fam.fisher(*eta)], dtype,
                 rtol=1e-2 if dtype == torch.float32 else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [n for n in BY_NAME if not n.endswith("MultivariateNormal")])
def test_inverse_mean_map_derivative_is_inverse_fisher(name, dtype):
    """∂η/∂μ = F(η)⁻¹ through mean_to_natural: implicit differentiation for Gamma, Beta and
    Dirichlet, plain autograd for the closed forms. (The Gaussians' F is singular along
    antisymmetric η₂.)"""
    fam = BY_NAME[name]
    eta = fam.args_to_natural(*make_args(name, 5, dtype, batch=1))
    flat_mu = fam.flatten(fam.natural_to_mean(*eta))[0][0]

    def inverse(v: torch.Tensor) -> torch.Tensor:
        return fam.flatten(fam.mean_to_natural(*fam.unflatten(v)))[0]

    jacobian = torch.autograd.functional.jacobian(inverse, flat_mu)
    identity = torch.eye(flat_mu.shape[-1], dtype=dtype)
    assert_close([jacobian @ fam.fisher(*eta)[0]], [identity], dtype,
                 rtol=1e-2 if dtype == torch.float32 else None)


@pytest.mark.parametrize("name", ["MultivariateNormal", *ITERATIVE])
def test_maps_are_differentiable(name):
    """gradcheck (finite differences, float64) of natural_to_args, args_to_mean, mean_to_args."""
    fam = BY_NAME[name]
    args = [a.requires_grad_() for a in make_args(name, 6, torch.float64, batch=2)]
    eta = [e.detach().requires_grad_() for e in fam.args_to_natural(*args)]
    mu = [m.detach().requires_grad_() for m in fam.args_to_mean(*args)]
    assert torch.autograd.gradcheck(fam.natural_to_args, eta)
    assert torch.autograd.gradcheck(fam.args_to_mean, args)
    assert torch.autograd.gradcheck(fam.mean_to_args, mu)


# ----- divergences and domains ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_bregman_kl_matches_torch(name, dtype):
    fam = BY_NAME[name]
    args_p, args_q = make_args(name, 7, dtype), make_args(name, 8, dtype)
    ours = fam.kl(fam.args_to_natural(*args_p), fam.args_to_natural(*args_q))
    theirs = kl_divergence(fam.distribution(*args_p), fam.distribution(*args_q))
    assert_close([ours], [theirs], dtype, rtol=1e-3 if dtype == torch.float32 else 1e-7)


def _replace(params: tuple[torch.Tensor, ...], index: int, value) -> tuple[torch.Tensor, ...]:
    """Sets batch element 1 of parameter ``index`` to ``value``."""
    out = [p.clone() for p in params]
    out[index][1] = value
    return tuple(out)


INVALID = {
    "Normal": [(1, 0.0), (1, 0.5), (0, math.nan)],
    "MultivariateNormal": [(1, 0.5 * torch.eye(D)),
                           (1, -0.5 * torch.diag(torch.tensor([1.0, -1.0, 1.0]))),
                           (1, torch.tensor([[-1.0, 0, 0], [0, -1, 3], [0, 3, -1]])),
                           (0, math.inf)],
    "Gamma": [(0, -1.0), (0, -1.5), (1, 0.0), (1, 2.0)],
    "Exponential": [(0, 0.0), (0, 1.0)],
    "Beta": [(0, -1.0), (1, -2.0)],
    "Dirichlet": [(0, torch.tensor([0.0, -1.0, 1.0, 2.0]))],
    "Categorical": [(0, math.inf), (0, math.nan)],
    "Bernoulli": [(0, -math.inf), (0, math.nan)],
    "Poisson": [(0, math.inf), (0, math.nan)],
}
INVALID["LowRankMultivariateNormal"] = INVALID["MultivariateNormal"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_in_domain(name, dtype):
    """Valid η are inside; η with batch element 1 made invalid is outside only there."""
    fam = BY_NAME[name]
    eta = fam.args_to_natural(*make_args(name, 9, dtype))
    assert fam.in_domain(*eta).tolist() == [True, True, True]
    for index, value in INVALID[name]:
        assert fam.in_domain(*_replace(eta, index, value)).tolist() == [True, False, True], value


def test_categorical_statistic_needs_number_of_categories():
    with pytest.raises(ValueError, match="number of categories"):
        BY_NAME["Categorical"].sufficient_statistics(torch.tensor([0, 2]))


def test_low_rank_is_the_dense_gaussian_without_inverse_maps():
    low_rank, full = BY_NAME["LowRankMultivariateNormal"], MultivariateNormal()
    loc, factor, diag = make_args("LowRankMultivariateNormal", 10, torch.float64)
    tril = torch.linalg.cholesky(factor @ factor.mT + torch.diag_embed(diag))
    assert_close(low_rank.args_to_natural(loc, factor, diag), full.args_to_natural(loc, tril),
                 torch.float64)
    assert_close(low_rank.args_to_mean(loc, factor, diag), full.args_to_mean(loc, tril),
                 torch.float64)
    eta = low_rank.args_to_natural(loc, factor, diag)
    with pytest.raises(NotImplementedError, match="arbitrary precision"):
        low_rank.natural_to_args(*eta)
    with pytest.raises(NotImplementedError, match="arbitrary precision"):
        low_rank.mean_to_args(*low_rank.natural_to_mean(*eta))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_scaled_low_rank_kl_matches_torch(dtype, tol):
    """KL between N(m, S(I + PPᵀ)S) and N(m', S'(I + P'P'ᵀ)S') of different ranks, both ways
    and for a batch, equals torch's KL of the LowRankMultivariateNormals (W = SP, D = s²)."""
    g = torch.Generator().manual_seed(3)

    def draw(r):
        return (torch.randn(2, 9, generator=g, dtype=dtype),
                torch.rand(2, 9, generator=g, dtype=dtype) + 0.2,
                torch.randn(2, 9, r, generator=g, dtype=dtype))

    p, q = draw(3), draw(4)
    built = [dist.LowRankMultivariateNormal(m, s.unsqueeze(-1) * f, s ** 2) for m, s, f in (p, q)]
    for ours, theirs in zip(scaled_low_rank_kl(p, q), (kl_divergence(*built),
                                                        kl_divergence(*built[::-1])),
                            strict=True):
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    for same in scaled_low_rank_kl(p, p):
        torch.testing.assert_close(same, torch.zeros(2, dtype=dtype), rtol=0.0, atol=10 * tol)


def test_gaussian_flat_size_is_checked():
    assert MultivariateNormal().param_event_shapes(12) == (torch.Size([3]), torch.Size([3, 3]))
    with pytest.raises(ValueError, match="not d"):
        MultivariateNormal().param_event_shapes(11)


def test_iterative_inverse_rejects_impossible_means():
    """Gamma mean parameters must satisfy E log z < log E z (Jensen)."""
    with pytest.raises(ValueError, match="outside the mean-parameter space"):
        Gamma().mean_to_args(torch.tensor([1.0]), torch.tensor([1.0]))


# ----- the seed's worked examples ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_example1_fisher_of_normal_in_mean_variance(dtype):
    """F(μ, σ²) = diag(1/σ², 1/(2σ⁴)), as the pullback Jᵀ F(η) J with J = ∂η/∂(μ, σ²)."""
    fam = Normal()
    theta = torch.tensor([0.7, 2.5], dtype=dtype)

    def natural(t: torch.Tensor) -> torch.Tensor:
        return torch.stack(fam.args_to_natural(t[0], t[1].sqrt()))

    jac = torch.autograd.functional.jacobian(natural, theta)
    pulled_back = jac.T @ fam.fisher(*natural(theta)) @ jac
    var = theta[1]
    expected = torch.diag(torch.stack([1 / var, 1 / (2 * var**2)]))
    assert_close([pulled_back], [expected], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("variance", "expected"), [(0.1, 1.25), (10.0, 0.0125)])
def test_example3_kl_versus_parameter_distance(dtype, variance, expected):
    fam = Normal()
    scale = torch.tensor(variance, dtype=dtype).sqrt()
    p = fam.args_to_natural(torch.tensor(0.0, dtype=dtype), scale)
    q = fam.args_to_natural(torch.tensor(0.5, dtype=dtype), scale)
    assert_close([fam.kl(p, q)], [torch.tensor(expected, dtype=dtype)], dtype,
                 rtol=1e-5 if dtype == torch.float32 else 1e-12)


# ----- reading distributions --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BY_NAME))
def test_family_of_recognises_torch_and_pyro_classes(name):
    fam = BY_NAME[name]
    args = make_args(name, 11, torch.float64)
    pyro_class = getattr(dist, fam.dist_class.__name__)
    assert issubclass(pyro_class, TorchDistributionMixin)
    for d in (fam.distribution(*args), pyro_class(**dict(zip(fam.arg_names, args, strict=True)))):
        assert family_of(d) is fam
        assert_close(fam.args(d), args, torch.float64)


def test_family_of_rejects_unregistered_and_constrained_subclasses():
    assert family_of(dist.StudentT(3.0, 0.0, 1.0)) is None
    assert family_of(torch.distributions.Chi2(torch.tensor(3.0))) is None
    assert family_of(dist.Chi2(torch.tensor(3.0))) is None


def test_unwrap_multiplicity():
    base = dist.Normal(torch.zeros(3), torch.ones(3))
    bare, copies = unwrap(base.to_event(1))
    assert bare is base and copies == 1.0

    bare, copies = unwrap(ExpandedDistribution(base, torch.Size([5, 3])).to_event(2))
    assert bare is base and copies == 5.0
    bare, copies = unwrap(TorchDistributionMixin.expand(base.mask(True), torch.Size([2, 4, 3])))
    assert bare is base and copies == 8.0

    assert unwrap(base.mask(False)) == (base, 0.0)
    assert unwrap(base.mask(torch.ones(3, dtype=torch.bool)))[1] == 1.0
    assert unwrap(base.mask(torch.zeros(3, dtype=torch.bool)))[1] == 0.0
    with pytest.raises(ValueError, match="mask differs"):
        unwrap(base.mask(torch.tensor([True, False, True])))

    # Pyro's Normal.expand is torch's: the copies live in the base's own (expanded) batch.
    bare, copies = unwrap(base.expand([5, 3]))
    assert type(bare) is dist.Normal and bare.batch_shape == (5, 3) and copies == 1.0


GAUSSIANS = ["Normal", "MultivariateNormal"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GAUSSIANS)
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, size=st.floats(0.1, 1e3))
def test_retraction_stays_in_domain_for_any_step(name, dtype, seed, size):
    """Lin, Schmidt & Khan's Λ + G + ½GΛ⁻¹G is positive definite for every G, however large."""
    fam = BY_NAME[name]
    eta = fam.args_to_natural(*make_args(name, seed, torch.float64))
    g = torch.Generator().manual_seed(seed + 1)
    step = tuple(size * torch.randn(e.shape, generator=g, dtype=torch.float64) for e in eta)
    eta, step = tuple(e.to(dtype) for e in eta), tuple(s.to(dtype) for s in step)
    retracted = fam.retract(eta, step)
    assert bool(fam.in_domain(*retracted).all())


@pytest.mark.parametrize("name", GAUSSIANS)
def test_retraction_agrees_with_the_plain_step_to_second_order(name):
    """retract(η, tδ) − (η + tδ) = O(t²): the retraction is the natural step plus a curvature
    correction, so small steps are unchanged to first order."""
    fam = BY_NAME[name]
    eta = fam.args_to_natural(*make_args(name, 0, torch.float64))
    step = tuple(torch.randn(e.shape, generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64) for e in eta)
    gaps = []
    for t in (1e-2, 1e-3):
        scaled = tuple(t * s for s in step)
        plain = tuple(e + s for e, s in zip(eta, scaled, strict=True))
        gaps.append(max(float((r - p).abs().max())
                        for r, p in zip(fam.retract(eta, scaled), plain, strict=True)))
    assert gaps[1] < 0.02 * gaps[0]  # ×10 smaller t, ×100 smaller gap (allowing rounding)


def test_families_without_retraction_return_none():
    fam = BY_NAME["Gamma"]
    eta = fam.args_to_natural(*make_args("Gamma", 0, torch.float64))
    assert fam.retract(eta, eta) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_low_rank_fisher_product_equals_the_pullback(dtype):
    """The Woodbury product F·v in (loc, W, D) equals (∂η/∂args)ᵀ(∂μ/∂args)·v built by autodiff
    from the dense η and μ, for a batch of two low-rank Gaussians (d = 6, rank 2), and so does the
    dense matrix PulledBackFisher builds from it (all argument directions as one batch)."""
    from pyro_natgrad.fisher import PulledBackFisher
    from pyro_natgrad.fisher.autodiff import jacobian
    from pyro_natgrad.fisher.linalg import flat

    family = BY_NAME["LowRankMultivariateNormal"]
    g = torch.Generator().manual_seed(0)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10,
                                                                       "atol": 1e-10}
    args = [torch.randn(2, 6, generator=g, dtype=dtype),
            torch.randn(2, 6, 2, generator=g, dtype=dtype),
            torch.rand(2, 6, generator=g, dtype=dtype) + 0.5]
    leaves = [a.clone().requires_grad_(True) for a in args]
    eta = flat(family.args_to_natural(*leaves))
    mu = flat(family.args_to_mean(*leaves))
    dense = jacobian(eta, leaves).T @ jacobian(mu, leaves)
    v = [torch.randn(a.shape, generator=g, dtype=dtype) for a in args]
    product = flat(family.args_fisher_product(tuple(args), tuple(v)))
    torch.testing.assert_close(product, 0.5 * (dense + dense.T) @ flat(v), **tol)
    # the dense matrix from the product applied to every argument direction at once
    built = PulledBackFisher([(family, tuple(leaves), 1.0)], leaves).dense()
    torch.testing.assert_close(built, 0.5 * (dense + dense.T), **tol)
