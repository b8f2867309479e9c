"""The Cholesky-factor natural step of a full-covariance Gaussian (families/gaussian_step.py),
checked against the natural-parameter step of the MultivariateNormal family, torch's closed-form
KL, autograd and a conjugate target; and its O(d³) operation count."""

import pytest
import torch
from torch.distributions import MultivariateNormal as TorchMVN
from torch.distributions import kl_divergence

from pyro_natgrad.families.gaussian_step import (
    GaussianDirection,
    gaussian_direction,
    max_precision_rate,
    natural_step,
    ritz_pairs,
    smallest_eigenvalue,
)
from pyro_natgrad.families.multivariate_normal import MultivariateNormal

from .op_count import count_ops

FAMILY = MultivariateNormal()


def _problem(batch, d, dtype=torch.float64, seed=0, grad_scale=0.1):
    """A random (m, L) and gradients (∂L/∂m, ∂L/∂L) of the given batch shape."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch + (d, d), generator=g, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    tril = torch.linalg.cholesky(a @ a.mT / d + 0.5 * eye)
    loc = torch.randn(batch + (d,), generator=g, dtype=torch.float64)
    d_loc = torch.randn(batch + (d,), generator=g, dtype=torch.float64)
    d_tril = grad_scale * torch.randn(batch + (d, d), generator=g, dtype=torch.float64).tril()
    return tuple(x.to(dtype) for x in (loc, tril, d_loc, d_tril))


def _family_step(loc, tril, d_loc, d_tril, rate, fraction=None):
    """Today's natural step through the family: η' = η − ρ∂L/∂μ, and with a precision fraction
    f (ρ_Λ = fρ) the shortened step of NaturalGradient._shorten_precision:
    η₁' = η₁ − ρ(f ∂L/∂μ₁ + (1 − f)∂L/∂m), η₂' = η₂ − ρ f ∂L/∂μ₂."""
    eta = FAMILY.args_to_natural(loc, tril)
    dmu = FAMILY.mean_gradient((loc, tril), (d_loc, d_tril))
    f = torch.ones(loc.shape[:-1], dtype=loc.dtype) if fraction is None else fraction
    f1, f2 = f[..., None], f[..., None, None]
    new_eta = (eta[0] - rate * (f1 * dmu[0] + (1 - f1) * d_loc), eta[1] - rate * f2 * dmu[1])
    assert bool(FAMILY.in_domain(*new_eta).all())
    new_loc, new_tril = FAMILY.natural_to_args(*new_eta)
    return new_loc, new_tril, FAMILY.kl(eta, new_eta)


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_equals_natural_parameter_step(rate):
    loc, tril, d_loc, d_tril = _problem((4,), 7)
    step = natural_step(gaussian_direction(loc, tril, d_loc, d_tril), rate)
    new_loc, new_tril, kl = _family_step(loc, tril, d_loc, d_tril, rate)
    assert bool(step.ok.all())
    torch.testing.assert_close(step.loc, new_loc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step.scale_tril, new_tril, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step.kl, kl, rtol=1e-10, atol=1e-10)
    assert torch.equal(step.scale_tril, step.scale_tril.tril())
    assert bool((step.scale_tril.diagonal(dim1=-2, dim2=-1) > 0).all())


def test_equals_precision_shortened_step():
    loc, tril, d_loc, d_tril = _problem((3,), 6, seed=1)
    rate, fraction = 0.8, torch.tensor([1.0, 0.5, 0.125], dtype=torch.float64)
    step = natural_step(gaussian_direction(loc, tril, d_loc, d_tril), rate,
                        precision_rate=rate * fraction)
    new_loc, new_tril, kl = _family_step(loc, tril, d_loc, d_tril, rate, fraction)
    torch.testing.assert_close(step.loc, new_loc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step.scale_tril, new_tril, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step.kl, kl, rtol=1e-10, atol=1e-10)
    # the mean keeps its rate: a zero precision rate moves m by −ρΛ⁻¹∂L/∂m, Σ unchanged
    still = natural_step(gaussian_direction(loc, tril, d_loc, d_tril), rate, precision_rate=0.0)
    cov = tril @ tril.mT
    torch.testing.assert_close(still.scale_tril, tril)
    torch.testing.assert_close(still.loc, loc - rate * (cov @ d_loc[..., None]).squeeze(-1))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_kl_both_ways_equal_torch(dtype, tol):
    loc, tril, d_loc, d_tril = _problem((5,), 8, dtype=dtype, seed=2)
    step = natural_step(gaussian_direction(loc, tril, d_loc, d_tril), 0.6, reverse_kl=True)
    q, new = TorchMVN(loc, scale_tril=tril), TorchMVN(step.loc, scale_tril=step.scale_tril)
    assert step.kl.dtype == dtype and step.reverse_kl.dtype == dtype
    torch.testing.assert_close(step.kl, kl_divergence(q, new), rtol=tol, atol=tol)
    torch.testing.assert_close(step.reverse_kl, kl_divergence(new, q), rtol=tol, atol=tol)


def test_model_kl_is_the_second_order_term_of_the_exact_kl():
    """½ρ²|v|² + ¼ρ²|S|²_F per element: the exact KL's ratio to it tends to 1 as ρ → 0 (the
    error is O(ρ)), and it scales as ρ² exactly."""
    direction = gaussian_direction(*_problem((3,), 6, seed=3))
    errors = []
    for rate in (1e-2, 1e-3, 1e-4):
        exact = natural_step(direction, rate).kl
        errors.append(float((exact / direction.model_kl(rate) - 1).abs().max()))
    assert errors[2] < 1e-3 and errors[2] < errors[1] < errors[0], errors
    torch.testing.assert_close(direction.model_kl(0.2), 4 * direction.model_kl(0.1))
    v, s = direction.whitened_loc, direction.whitened_cov
    torch.testing.assert_close(direction.model_kl(0.1), 0.005 * ((v * v).sum(-1)
                                                                 + 0.5 * (s * s).sum((-2, -1))))


@pytest.mark.parametrize("shared", [False, True])
def test_lift_adds_its_directions_to_the_whitened_precision(shared):
    """natural_step(..., lift=(U, a)) is the step with B = I + ρ_Λ S + U diag(a) Uᵀ: its KL equals
    KL(N(m, Σ) ‖ N(m', Σ')) with Σ' = L B⁻¹ Lᵀ and m' = m − ρ Σ' L⁻ᵀv (v = Lᵀ∂L/∂m), for a lift
    per batch element and for one lift shared by the batch."""
    loc, tril, d_loc, d_tril = _problem((2,), 6, seed=4)
    direction = gaussian_direction(loc, tril, d_loc, d_tril)
    g = torch.Generator().manual_seed(5)
    batch = () if shared else (2,)
    vectors = torch.linalg.qr(torch.randn(batch + (6, 2), generator=g, dtype=torch.float64))[0]
    amounts = torch.rand(batch + (2,), generator=g, dtype=torch.float64)
    rate = torch.tensor([0.3, 0.7], dtype=torch.float64)
    step = natural_step(direction, rate, 0.5 * rate, lift=(vectors, amounts))
    b = (torch.eye(6, dtype=torch.float64) + (0.5 * rate)[:, None, None] * direction.whitened_cov
         + (vectors * amounts[..., None, :]) @ vectors.mT)
    new_cov = tril @ torch.linalg.solve(b, tril.mT)
    d_loc_back = torch.linalg.solve_triangular(tril.mT, direction.whitened_loc[..., None],
                                               upper=True)  # ∂L/∂m = L⁻ᵀv
    new_loc = loc - rate[:, None] * (new_cov @ d_loc_back)[..., 0]
    expected = kl_divergence(TorchMVN(loc, scale_tril=tril),
                             TorchMVN(new_loc, covariance_matrix=new_cov))
    torch.testing.assert_close(step.kl, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_least_finds_the_smallest_eigenvalue_of_b_by_inverse_iteration(dtype, tol):
    """GaussianStep.least(k): μ = uᵀBu ≥ λ_min(B) (a Rayleigh quotient, any k), u a unit vector;
    with one eigenvalue of B = I + ρ_Λ S at 0.05 and the rest in [0.6, 2] (d = 40, two batch
    elements), five steps of inverse iteration put μ within 1e-3 of 0.05 and u on its
    eigenvector (|cos| > 0.999)."""
    d = 40
    loc, tril, d_loc, _ = _problem((2,), d, dtype=dtype, seed=6)
    g = torch.Generator().manual_seed(7)
    q = torch.linalg.qr(torch.randn(2, d, d, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.tensor([0.05]), torch.linspace(0.6, 2.0, d - 1)]).double()
    b = q @ torch.diag(spectrum) @ q.mT
    s = ((b - torch.eye(d, dtype=torch.float64)) / 0.5).to(dtype)  # B = I + 0.5 S
    direction = GaussianDirection(loc, tril, loc.new_zeros(2, d), s)
    step = natural_step(direction, 0.5)
    for iters in (0, 1, 5):
        value, vector = step.least(iters)
        exact = (vector.double()[..., None, :] @ b @ vector.double()[..., :, None])[..., 0, 0]
        torch.testing.assert_close(value.double(), exact, rtol=tol, atol=tol)
        torch.testing.assert_close(vector.norm(dim=-1), torch.ones(2, dtype=dtype))
        assert bool((value >= 0.05 - tol).all())
    assert bool(((value - 0.05).abs() < 1e-3).all()), value
    assert bool(((vector.double() * q[..., :, 0]).sum(-1).abs() > 0.999).all())


def test_retraction_equals_the_family_retraction():
    """Where the plain step leaves the domain, retract=True equals MultivariateNormal.retract
    (Lin, Schmidt & Khan 2020, eq. 7) applied to δ = −ρ∂L/∂μ, and its KLs equal torch's."""
    loc, tril, d_loc, d_tril = _problem((3,), 6, seed=11, grad_scale=2.0)
    rate = 0.9
    direction = gaussian_direction(loc, tril, d_loc, d_tril, retraction=True)
    assert not bool(natural_step(direction, rate).ok.all())  # the plain step leaves the domain
    step = natural_step(direction, rate, retract=True, reverse_kl=True)
    assert bool(step.ok.all())
    eta = FAMILY.args_to_natural(loc, tril)
    dmu = FAMILY.mean_gradient((loc, tril), (d_loc, d_tril))
    new_loc, new_tril = FAMILY.natural_to_args(*FAMILY.retract(eta, tuple(-rate * x
                                                                          for x in dmu)))
    torch.testing.assert_close(step.loc, new_loc, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(step.scale_tril, new_tril, rtol=1e-9, atol=1e-9)
    q, new = TorchMVN(loc, scale_tril=tril), TorchMVN(step.loc, scale_tril=step.scale_tril)
    torch.testing.assert_close(step.kl, kl_divergence(q, new), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(step.reverse_kl, kl_divergence(new, q), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="retraction=True"):
        natural_step(gaussian_direction(loc, tril, d_loc, d_tril), rate, retract=True)


def test_float32_agrees_with_float64():
    args64 = _problem((3,), 10, seed=3)
    step64 = natural_step(gaussian_direction(*args64), 0.5, precision_rate=0.25)
    step32 = natural_step(gaussian_direction(*(a.float() for a in args64)), 0.5,
                          precision_rate=0.25)
    assert step32.loc.dtype == torch.float32 and bool(step32.ok.all())
    torch.testing.assert_close(step32.loc, step64.loc.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step32.scale_tril, step64.scale_tril.float(), rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(step32.kl, step64.kl.float(), rtol=1e-4, atol=1e-4)


def test_cov_gradient_matches_autograd():
    """S = 2Lᵀ(∂L/∂Σ)L with ∂L/∂Σ the symmetric gradient of a loss of Σ = LLᵀ."""
    loc, tril, _, _ = _problem((2,), 5, seed=4)
    c = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def loss(cov):
        return (c * cov).sum() + 0.5 * (cov @ cov).diagonal(dim1=-2, dim2=-1).sum()

    leaf = tril.clone().requires_grad_()
    (d_tril,) = torch.autograd.grad(loss(leaf @ leaf.mT), leaf)
    cov = (tril @ tril.mT).requires_grad_()
    (d_cov,) = torch.autograd.grad(loss(cov), cov)
    d_cov = 0.5 * (d_cov + d_cov.mT)
    direction = gaussian_direction(loc, tril, torch.zeros_like(loc), d_tril)
    torch.testing.assert_close(direction.whitened_cov, 2 * tril.mT @ d_cov @ tril)


def test_conjugate_target_lands_in_one_step():
    """−log p(z) = ½(z − a)ᵀA(z − a): with the exact ELBO gradient and ρ = 1 the step gives
    q' = N(a, A⁻¹), the exact posterior (Λ' = Λ + 2·½(A − Λ) = A, m' = m − A⁻¹A(m − a))."""
    d = 6
    g = torch.Generator().manual_seed(6)
    x = torch.randn(d, d, generator=g, dtype=torch.float64)
    a_mat, a = x @ x.T / d + torch.eye(d, dtype=torch.float64), torch.randn(d, generator=g,
                                                                          dtype=torch.float64)
    loc, tril, _, _ = _problem((), d, seed=7)
    leaves = [loc.clone().requires_grad_(), tril.clone().requires_grad_()]
    m, lower = leaves
    diff = m - a
    neg_elbo = (0.5 * (a_mat * (lower @ lower.mT)).sum() + 0.5 * diff @ a_mat @ diff
                - lower.diagonal().log().sum())
    d_loc, d_tril = torch.autograd.grad(neg_elbo, leaves)
    step = natural_step(gaussian_direction(loc, tril, d_loc, d_tril), 1.0)
    torch.testing.assert_close(step.loc, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(step.scale_tril @ step.scale_tril.mT, torch.linalg.inv(a_mat),
                               rtol=1e-10, atol=1e-10)


def test_not_positive_definite_reported_per_element():
    loc, tril, d_loc, d_tril = _problem((3,), 5, seed=8)
    d_tril = d_tril.clone()
    d_tril[1] = -20 * torch.eye(5, dtype=torch.float64) @ tril[1]  # S = −40·LᵀL at element 1
    d_loc = d_loc.clone()
    d_loc[2, 0] = float("nan")
    step = natural_step(gaussian_direction(loc, tril, d_loc, d_tril), 0.5, reverse_kl=True)
    assert step.ok.tolist() == [True, False, False]
    assert torch.isinf(step.kl[1:]).all() and torch.isinf(step.reverse_kl[1:]).all()
    alone = natural_step(gaussian_direction(loc[0], tril[0], d_loc[0], d_tril[0]), 0.5)
    torch.testing.assert_close(step.loc[0], alone.loc)
    torch.testing.assert_close(step.kl[0], alone.kl)
    # a small enough precision rate brings element 1 back
    rate = max_precision_rate(gaussian_direction(loc, tril, d_loc, d_tril).whitened_cov)
    assert float(rate[1]) < 0.5
    shortened = natural_step(gaussian_direction(loc, tril, d_loc, d_tril), 0.5,
                             precision_rate=rate.clamp(max=0.5))
    assert shortened.ok.tolist() == [True, True, False]


def test_bad_input_names_the_parameter():
    loc, tril, d_loc, d_tril = _problem((), 4)
    with pytest.raises(ValueError, match="d_scale_tril"):
        gaussian_direction(loc, tril, d_loc, d_tril[:3])
    with pytest.raises(ValueError, match="d_loc"):
        gaussian_direction(loc, tril, d_loc[:3], d_tril)
    direction = gaussian_direction(loc, tril, d_loc, d_tril)
    with pytest.raises(ValueError, match="precision_rate"):
        natural_step(direction, 0.5, precision_rate=-1.0)
    with pytest.raises(ValueError, match="rate"):
        natural_step(direction, float("nan"))
    with pytest.raises(ValueError, match="batch shape"):
        natural_step(direction, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floor"):
        max_precision_rate(direction.whitened_cov, floor=1.0)


def _symmetric(eigenvalues, seed=0):
    d = eigenvalues.shape[-1]
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q @ torch.diag_embed(eigenvalues) @ q.T


def test_max_precision_rate_bounds_the_domain():
    d = 60
    spread = torch.linspace(-3.0, 5.0, d, dtype=torch.float64)
    s = torch.stack([_symmetric(spread), _symmetric(spread.abs() + 0.1, seed=1)])
    rate = max_precision_rate(s, iters=30, safety=1.0)
    assert float(rate[1]) == float("inf")  # S ⪰ 0: every rate keeps B = I + ρS ≻ 0
    torch.testing.assert_close(rate[0], torch.tensor(1 / 3, dtype=torch.float64), rtol=0.02,
                               atol=0)
    eye = torch.eye(d, dtype=torch.float64)
    for floor in (0.0, 0.5):
        safe = float(max_precision_rate(s[0], floor=floor, iters=30, safety=0.9))
        lowest = float(torch.linalg.eigvalsh(eye + safe * s[0])[0])
        assert floor < lowest < floor + 0.2 * (1 - floor)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_max_precision_rate_on_a_monte_carlo_like_direction(dtype, tol):
    """S = −I + a rank-2P term (the entropy's exact gradient and P particles' rank-one
    terms): the Krylov space has dimension ≤ 2P + 1, so that many Lanczos steps are exact."""
    d, particles = 200, 4
    g = torch.Generator().manual_seed(9)
    u = torch.randn(d, particles, generator=g, dtype=torch.float64)
    e = torch.randn(d, particles, generator=g, dtype=torch.float64)
    s = -torch.eye(d, dtype=torch.float64) + (u @ e.T + e @ u.T)
    ritz, residual = smallest_eigenvalue(s.to(dtype), iters=2 * particles + 1)
    assert ritz.dtype == dtype
    lowest = torch.linalg.eigvalsh(s)[0]
    torch.testing.assert_close(ritz.double(), lowest, rtol=tol, atol=tol)
    assert float(residual) < tol * float(lowest.abs()) * 100


def test_lanczos_invariant_subspace_stays_finite():
    """−I + rank one: the Krylov space closes after two steps (β = 0), and more steps stay
    finite and exact."""
    v = torch.ones(30, dtype=torch.float64)
    s = -torch.eye(30, dtype=torch.float64) - 0.1 * torch.outer(v, v)
    ritz, residual = smallest_eigenvalue(s, iters=10)
    torch.testing.assert_close(ritz, torch.tensor(-4.0, dtype=torch.float64))
    assert torch.isfinite(residual) and float(residual) < 1e-8


def test_op_count():
    """Forming S: one d×d product (two with S² for the retraction); each candidate: one
    factorization for its KL, and one triangular solve with a d×d right-hand side only once its
    loc or scale_tril is read (a candidate rejected by its KL never pays it), a
    ``cholesky_inverse`` more with the reverse KL; the Lanczos bound none."""
    d = 40
    loc, tril, d_loc, d_tril = _problem((2,), d, seed=10)
    with count_ops(d) as ops:
        direction = gaussian_direction(loc, tril, d_loc, d_tril)
    assert ops.factorizations == 0 and ops.cubic == 1, ops.calls
    with count_ops(d) as ops:
        step = natural_step(direction, 0.7, precision_rate=0.3)
        assert bool(step.ok.all()) and bool(torch.isfinite(step.kl).all())
    assert ops.factorizations == 1 and ops.cubic == 1, ops.calls
    with count_ops(d) as ops:
        step.loc, step.scale_tril, step.loc  # noqa: B018 (formed once, on first access)
    assert ops.by_name() == {"linalg_solve_triangular": 1}, ops.calls
    with count_ops(d) as ops:
        natural_step(direction, 0.7, reverse_kl=True)
    assert ops.factorizations == 1 and ops.cubic == 2, ops.calls
    with count_ops(d) as ops:
        max_precision_rate(direction.whitened_cov, iters=10)
    assert ops.cubic == 0, ops.calls
    with count_ops(d) as ops:  # the retraction: S² once per step, nothing more per candidate
        retracting = gaussian_direction(loc, tril, d_loc, d_tril, retraction=True)
    assert ops.factorizations == 0 and ops.cubic == 2, ops.calls
    with count_ops(d) as ops:
        natural_step(retracting, 0.7, retract=True).scale_tril  # noqa: B018
    assert ops.factorizations == 1 and ops.cubic == 2, ops.calls


def test_op_counter_counts():
    """The counter itself: d×d factorizations, solves and products count; matrix–vector work
    and smaller matrices do not."""
    d = 12
    a = torch.eye(d, dtype=torch.float64) * 2
    v = torch.ones(d, 1, dtype=torch.float64)
    with count_ops(d) as ops:
        chol = torch.linalg.cholesky(a)
        torch.linalg.solve_triangular(chol, a, upper=False)
        torch.linalg.solve_triangular(chol, v, upper=False)
        torch.cholesky_inverse(chol)
        _ = a @ a
        _ = a @ v
        torch.linalg.inv(a[:5, :5])
        torch.linalg.eigh(a)
    assert ops.factorizations == 2 and ops.cubic == 5, ops.calls
    assert ops.by_name()["linalg_solve_triangular"] == 1


def test_ritz_pairs_are_eigenpairs_with_their_residual_norms():
    """Lanczos Ritz pairs (θᵢ, uᵢ): with as many steps as dimensions they are S's eigenpairs;
    with fewer, each residual norm rᵢ = |β_k y_{k,i}| equals |Suᵢ − θᵢuᵢ| (Golub & Van Loan
    2013, §10.1), the vectors are orthonormal, and the extremes converge first."""
    g = torch.Generator().manual_seed(2)
    d = 40
    x = torch.randn(d, d, generator=g, dtype=torch.float64)
    s = x + x.T
    s[0, 0] -= 60.0  # an outlier at the bottom of the spectrum
    eig = torch.linalg.eigvalsh(s)
    theta, vectors, residual = ritz_pairs(s, d)
    torch.testing.assert_close(theta, eig, rtol=1e-10, atol=1e-10)
    theta, vectors, residual = ritz_pairs(s, 10)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(10, dtype=torch.float64),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(residual, torch.linalg.vector_norm(s @ vectors - vectors * theta,
                                                                  dim=0), rtol=1e-8, atol=1e-8)
    assert float(theta[0]) == pytest.approx(float(eig[0]), rel=1e-6)
    # a batch of two dimensions, expanded (not contiguous): each element's own eigenvalues
    stack = torch.stack([s, 2 * s, -s])[:, None].expand(3, 2, d, d)
    theta, vectors, residual = ritz_pairs(stack, d)
    assert theta.shape == residual.shape == (3, 2, d) and vectors.shape == (3, 2, d, d)
    for i, factor in enumerate((1.0, 2.0, -1.0)):
        expected = torch.linalg.eigvalsh(factor * s).expand(2, d)
        torch.testing.assert_close(theta[i], expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="Lanczos: iters must be a positive integer, got 0"):
        ritz_pairs(s, 0)
