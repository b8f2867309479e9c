"""Forward–backward Gaussian VI (Diao et al. 2023) and its scale-free step size: the backward step
against the paper's matrix formula and the JKO objective, fixed points and one-step exactness on
Gaussian targets, positive definiteness for any h, frames (affine equivariance), the curvature
estimate from Pyro's gradients against closed forms, and a fit in SVI with the step applied by
hand; the low-rank Gaussian's W₂ metric product against the pulled-back dense one."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence

from pyro_natgrad.fisher.linalg import flat, unflat
from pyro_natgrad.wasserstein import (
    BuresMetric,
    LowRankBures,
    cholesky_to_cov_gradient,
    curvature_step,
    curvature_step_diag,
    energy_hessian,
    energy_hessian_diag,
    entropy_prox,
    forward_backward_step,
    forward_backward_step_diag,
    spectral_radius,
)

F64 = torch.float64


def _spd(d, generator, dtype=F64, batch=()):
    a = torch.randn(batch + (d, d), generator=generator, dtype=dtype)
    return a @ a.mT / d + 0.1 * torch.eye(d, dtype=dtype)


def _sqrtm(a):
    evals, evecs = torch.linalg.eigh(a)
    return evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.mT


def _gaussian_target_grads(m, tril, loc, precision):
    """∇ₘL and ∂L/∂Σ of L = KL(N(m, LLᵀ) ‖ N(loc, P⁻¹)), by autograd through (m, L) and the
    Cholesky reverse rule: the path an optimizer takes from a guide's params."""
    m, tril = m.clone().requires_grad_(), tril.clone().requires_grad_()
    target = dist.MultivariateNormal(loc, precision_matrix=precision)
    kl = kl_divergence(dist.MultivariateNormal(m, scale_tril=tril), target).sum()
    g_m, g_tril = torch.autograd.grad(kl, (m, tril))
    return g_m, cholesky_to_cov_gradient(tril.detach(), g_tril)


# ----- the backward (entropy) step ---------------------------------------------------------------
def test_entropy_prox_minimizes_its_objective_for_either_sign():
    """σ = ½(s + √(s² + 4h)) solves σ² − sσ − h = 0 (the objective's stationarity), beats its
    neighbours, and for s ≪ 0 in float32 matches float64 (no cancellation)."""
    s = torch.tensor([-1e4, -3.0, -0.1, 0.0, 0.2, 5.0], dtype=F64)
    h = 0.3
    sigma = entropy_prox(s, h)
    torch.testing.assert_close(sigma.square() - s * sigma, torch.full_like(s, h))

    def objective(x):
        return -torch.log(x) + (x - s).square() / (2 * h)

    for eps in (1e-3, -1e-3):
        assert bool((objective(sigma * (1 + eps)) > objective(sigma)).all())
    torch.testing.assert_close(entropy_prox(s.float(), h), sigma.float(), rtol=1e-6, atol=0)


def test_backward_step_is_the_papers_formula_and_the_jko_minimizer():
    """With ∇V = 0 (Ĥ = 0, zero mean gradient) the step is the backward step alone:
    Σ' = ½(Σ + 2hI + [Σ(Σ + 4hI)]^½) (Diao et al. 2023, Algorithm 1), here by eigh of Σ, and
    Σ' minimizes −½ log det Σ' + W₂²(N(0, Σ'), N(0, Σ)) / 2h among nearby covariances."""
    g = torch.Generator().manual_seed(0)
    d, h = 4, 0.7
    cov = _spd(d, g)
    tril = torch.linalg.cholesky(cov)
    zero = torch.zeros(d, dtype=F64)
    _, new_tril = forward_backward_step(zero, tril, zero, torch.zeros(d, d, dtype=F64), h)
    new_cov = new_tril @ new_tril.T
    eye = torch.eye(d, dtype=F64)
    expected = 0.5 * (cov + 2 * h * eye + _sqrtm(cov @ (cov + 4 * h * eye)))
    torch.testing.assert_close(new_cov, expected)

    root = _sqrtm(cov)

    def objective(c):
        w2 = torch.trace(c + cov - 2 * _sqrtm(root @ c @ root))
        return -0.5 * torch.logdet(c) + w2 / (2 * h)

    best = objective(new_cov)
    for _ in range(20):
        e = torch.randn(d, d, generator=g, dtype=F64)
        perturbed = new_cov + 1e-3 * (e + e.T)
        assert objective(perturbed) > best


# ----- fixed points, exactness, safety -----------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 2e-4)])
def test_gaussian_target_is_a_fixed_point_and_the_iteration_converges(dtype, tol):
    """For p = N(a, P⁻¹), Ĥ = P exactly: q = p is a fixed point for every h ≤ 1/λ_max(P), and
    from N(0, I) the step with h = 1/ρ(Ĥ) (:func:`curvature_step`, c = 1) converges to it."""
    g = torch.Generator().manual_seed(1)
    d = 4
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    precision = (rotation @ torch.diag(torch.linspace(1, 8, d, dtype=F64)) @ rotation.T).to(dtype)
    loc = torch.randn(d, generator=g, dtype=dtype)
    cov = torch.linalg.inv(precision)
    m, tril = loc.clone(), torch.linalg.cholesky(cov)
    for h in (1e-3, 0.5 / torch.linalg.eigvalsh(precision)[-1], 1 / spectral_radius(precision)):
        g_m, g_cov = _gaussian_target_grads(m, tril, loc, precision)
        m1, tril1 = forward_backward_step(m, tril, g_m, energy_hessian(tril, g_cov), h)
        torch.testing.assert_close(m1, loc, atol=tol, rtol=0)
        torch.testing.assert_close(tril1 @ tril1.T, cov, atol=tol, rtol=tol)
    m, tril = torch.zeros(d, dtype=dtype), torch.eye(d, dtype=dtype)
    for _ in range(800):  # closed-form gradients: ∇ₘL = P(m − a), ∂L/∂Σ = ½(P − Σ⁻¹)
        g_cov = 0.5 * (precision - torch.cholesky_inverse(tril))
        hess = energy_hessian(tril, g_cov)
        m, tril = forward_backward_step(m, tril, precision @ (m - loc), hess,
                                        curvature_step(hess))
    torch.testing.assert_close(m, loc, atol=10 * tol, rtol=0)
    torch.testing.assert_close(tril @ tril.T, cov, atol=10 * tol, rtol=0)


def test_one_step_lands_on_a_gaussian_target_in_its_curvature_frame():
    """With the frame F = chol(P⁻¹) (so FᵀPF = I) and h = 1 the forward step maps q onto the
    target's mean and collapses Σ_y, and the backward step restores Σ_y' = I: q' = p in one step,
    from any start."""
    g = torch.Generator().manual_seed(2)
    d = 5
    precision = _spd(d, g)
    loc = torch.randn(d, generator=g, dtype=F64)
    cov = torch.linalg.inv(precision)
    m, tril = torch.randn(d, generator=g, dtype=F64), torch.linalg.cholesky(_spd(d, g))
    g_m, g_cov = _gaussian_target_grads(m, tril, loc, precision)
    m1, tril1 = forward_backward_step(m, tril, g_m, energy_hessian(tril, g_cov), 1.0,
                                      frame=torch.linalg.cholesky(cov))
    torch.testing.assert_close(m1, loc)
    torch.testing.assert_close(tril1 @ tril1.T, cov)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("h", [1e-3, 1.0, 1e3])
def test_positive_definite_for_any_h_and_any_curvature_estimate(dtype, h):
    """Indefinite, noisy Ĥ and steps far beyond 1/ρ(Ĥ): L' is finite, lower triangular with a
    positive diagonal, and Σ' ⪰ hI (its eigenvalues ((s + √(s² + 4h))/2)² ≥ h), batched."""
    g = torch.Generator().manual_seed(3)
    d = 4
    tril = torch.linalg.cholesky(_spd(d, g, batch=(3,))).to(dtype)
    noise = 100 * torch.randn(3, d, d, generator=g, dtype=F64)
    hess = (noise + noise.mT).to(dtype)
    grad = 100 * torch.randn(3, d, generator=g, dtype=dtype)
    m1, tril1 = forward_backward_step(torch.zeros(3, d, dtype=dtype), tril, grad, hess, h)
    assert torch.isfinite(m1).all() and torch.isfinite(tril1).all()
    assert torch.equal(tril1, tril1.tril()) and bool((tril1.diagonal(dim1=-2, dim2=-1) > 0).all())
    smallest = torch.linalg.eigvalsh((tril1 @ tril1.mT).double())[..., 0]
    assert bool((smallest >= h * (1 - 1e-3)).all())


def test_batched_step_equals_the_steps_of_its_elements_with_per_element_h():
    g = torch.Generator().manual_seed(4)
    d = 3
    tril = torch.linalg.cholesky(_spd(d, g, batch=(2,)))
    hess = _spd(d, g, batch=(2,))
    grad, m = torch.randn(2, d, generator=g, dtype=F64), torch.randn(2, d, generator=g, dtype=F64)
    h = torch.tensor([0.1, 0.4], dtype=F64)
    frame = torch.linalg.cholesky(_spd(d, g, batch=(2,)))
    m1, tril1 = forward_backward_step(m, tril, grad, hess, h, frame=frame)
    for i in range(2):
        mi, ti = forward_backward_step(m[i], tril[i], grad[i], hess[i], float(h[i]),
                                       frame=frame[i])
        torch.testing.assert_close(m1[i], mi)
        torch.testing.assert_close(tril1[i], ti)


def test_the_step_in_the_frame_of_q_is_affine_equivariant():
    """With F = L, mapping the problem by x ↦ Ax + b (q's factor AL, the potential's gradient
    A⁻ᵀ∇V and curvature A⁻ᵀĤA⁻¹) maps the new q the same way, and h = c/ρ(LᵀĤL) is unchanged;
    without a frame h changes (the plain W₂ step is not affine invariant)."""
    g = torch.Generator().manual_seed(5)
    d = 4
    m, b = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    tril = torch.linalg.cholesky(_spd(d, g))
    hess, grad = _spd(d, g), torch.randn(d, generator=g, dtype=F64)
    a = torch.randn(d, d, generator=g, dtype=F64) + 2 * torch.eye(d, dtype=F64)
    a_inv = torch.linalg.inv(a)
    tril_a = torch.linalg.cholesky(a @ tril @ tril.T @ a.T)
    hess_a, grad_a = a_inv.T @ hess @ a_inv, a_inv.T @ grad
    h = curvature_step(hess, 0.8, frame=tril)
    h_a = curvature_step(hess_a, 0.8, frame=tril_a)
    torch.testing.assert_close(h, h_a)
    assert float(curvature_step(hess_a, 0.8) / curvature_step(hess, 0.8)) != pytest.approx(1.0)
    m1, tril1 = forward_backward_step(m, tril, grad, hess, h, frame=tril)
    m1a, tril1a = forward_backward_step(a @ m + b, tril_a, grad_a, hess_a, h_a, frame=tril_a)
    torch.testing.assert_close(m1a, a @ m1 + b)
    torch.testing.assert_close(tril1a @ tril1a.T, a @ tril1 @ tril1.T @ a.T)


# ----- mean field ---------------------------------------------------------------------------------
def test_diagonal_step_is_the_full_step_on_a_diagonal_problem_and_keeps_its_fixed_point():
    """On a separable problem (diagonal Ĥ) with hĤᵢᵢ ≤ 1 the mean-field step equals the
    full-rank one; on N(a, diag v) the fixed point σ = √v holds for h beyond 1/Ĥᵢᵢ too (the
    signed forward step), and the scale converges at the rate (1 − h/v)/(1 + h/v), |·| < 1 for
    every h."""
    g = torch.Generator().manual_seed(6)
    d = 3
    v = torch.tensor([0.5, 2.0, 0.05], dtype=F64)
    a = torch.randn(d, generator=g, dtype=F64)
    m, s = torch.randn(d, generator=g, dtype=F64), torch.tensor([0.1, 1.0, 0.4], dtype=F64)

    def grads(m, s):  # ∂/∂(m, σ) of KL(N(m, σ²) ‖ N(a, v)), elementwise
        return (m - a) / v, s / v - 1 / s

    g_m, g_s = grads(m, s)
    h = 0.02
    m1, s1 = forward_backward_step_diag(m, s, g_m, g_s, h)
    hess = torch.diag(energy_hessian_diag(s, g_s))
    torch.testing.assert_close(hess, torch.diag(1 / v))
    m2, t2 = forward_backward_step(m, torch.diag(s), g_m, hess, h)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(torch.diag(s1), t2)
    for h in (0.01, 1.0, 10.0):  # hĤᵢᵢ up to 200
        _, s_star = forward_backward_step_diag(a, v.sqrt(), *grads(a, v.sqrt()), h)
        torch.testing.assert_close(s_star, v.sqrt())
    h, delta = 0.3, 1e-7  # the map's derivative at the fixed point, by a finite difference
    s1 = forward_backward_step_diag(a, v.sqrt() + delta, *grads(a, v.sqrt() + delta), h)[1]
    rate = (1 - h / v) / (1 + h / v)
    torch.testing.assert_close((s1 - v.sqrt()) / delta, rate, rtol=1e-5, atol=0)


def test_curvature_step_diag_is_one_step_per_site_from_the_largest_curvature():
    hess_diag = torch.tensor([[0.5, -8.0], [2.0, 1.0]], dtype=F64)
    assert float(curvature_step_diag(hess_diag, 0.5)) == pytest.approx(0.5 / 8.0)
    frame = torch.tensor([[1.0, 0.25], [2.0, 0.5]], dtype=F64)  # f²Ĥ: [[0.5, −0.5], [8, 0.25]]
    torch.testing.assert_close(curvature_step_diag(hess_diag, 0.5, frame),
                               0.5 / 8.0 * frame.square())


def test_diagonal_step_with_framed_h_is_the_step_in_the_frame():
    """The diagonal step with hᵢ = h fᵢ² (:func:`curvature_step_diag` with a frame f) is the
    step with the scalar h in the coordinates y = x / f, mapped back: m_y = m/f, σ_y = σ/f,
    ∂L/∂m_y = f ∂L/∂m, ∂L/∂σ_y = f ∂L/∂σ. With f = σ the step is affine invariant per
    coordinate: rescaling a coordinate rescales the step and leaves h unchanged."""
    g = torch.Generator().manual_seed(3)
    m, g_m, g_s = (torch.randn(4, generator=g, dtype=F64) for _ in range(3))
    s = torch.rand(4, generator=g, dtype=F64) + 0.1
    hess = energy_hessian_diag(s, g_s)
    h_x = curvature_step_diag(hess, 0.5, frame=s)
    m1, s1 = forward_backward_step_diag(m, s, g_m, g_s, h_x)
    h = 0.5 / float((s.square() * hess).abs().max())
    my1, sy1 = forward_backward_step_diag(m / s, torch.ones_like(s), s * g_m, s * g_s, h)
    torch.testing.assert_close(m1, my1 * s)
    torch.testing.assert_close(s1, sy1 * s)
    c = torch.tensor([10.0, 0.1, 3.0, 1.0], dtype=F64)  # x → c x: m, σ scale, gradients / c
    m2, s2 = forward_backward_step_diag(c * m, c * s, g_m / c, g_s / c,
                                        curvature_step_diag(energy_hessian_diag(c * s, g_s / c),
                                                            0.5, frame=c * s))
    torch.testing.assert_close(m2, c * m1)
    torch.testing.assert_close(s2, c * s1)


# ----- the curvature estimate from Pyro's gradients -----------------------------------------------
def _pyro_grads(guide, names, num_particles, seed):
    """Gradients of Trace_ELBO's loss in the guide's constrained params (no model data: the model
    is the quartic potential V(z) = Σ zᵢ⁴/4, an improper unnormalized density as a factor)."""
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(3, dtype=F64), 1e6).to_event(1))
        pyro.factor("v", -(z**4).sum(-1) / 4)

    pyro.set_rng_seed(seed)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    with poutine.trace(param_only=True) as tr:
        loss = elbo.differentiable_loss(model, guide)
    values = [tr.trace.nodes[n]["value"] for n in names]
    return [v.detach() for v in values], [g.detach() for g in torch.autograd.grad(loss, values)]


def test_energy_hessian_from_trace_elbo_is_the_expected_hessian():
    """V(z) = Σ zᵢ⁴/4 under q = N(m, Σ): E_q[∇²V] = 3 diag(mᵢ² + Σᵢᵢ). The estimate
    2∂L/∂Σ + Σ⁻¹ from Trace_ELBO's gradient (the entropy part exact) matches it within Monte
    Carlo error, for a full-rank guide and a mean-field one."""
    m0 = torch.tensor([0.5, -1.0, 0.2], dtype=F64)
    tril0 = torch.tensor([[0.8, 0, 0], [0.3, 0.5, 0], [-0.2, 0.1, 0.6]], dtype=F64)

    def full_guide():
        loc = pyro.param("loc", m0)
        tril = pyro.param("tril", tril0, constraints.lower_cholesky)
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=tril))

    (_, tril), (_, g_tril) = _pyro_grads(full_guide, ("loc", "tril"), 200_000, 0)
    hess = energy_hessian(tril, cholesky_to_cov_gradient(tril, g_tril))
    expected = torch.diag(3 * (m0.square() + (tril0 @ tril0.T).diagonal()))
    torch.testing.assert_close(hess, expected, atol=0.05, rtol=0)
    pyro.clear_param_store()

    scale0 = torch.tensor([0.8, 0.5, 0.6], dtype=F64)

    def diag_guide():
        loc = pyro.param("loc", m0)
        scale = pyro.param("scale", scale0, constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    (_, scale), (_, g_scale) = _pyro_grads(diag_guide, ("loc", "scale"), 200_000, 0)
    torch.testing.assert_close(energy_hessian_diag(scale, g_scale),
                               3 * (m0.square() + scale0.square()), atol=0.05, rtol=0)


def test_spectral_radius_is_exact_once_the_krylov_space_is_full():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 6, 6, generator=g, dtype=F64)
    a = a + a.mT
    torch.testing.assert_close(spectral_radius(a, iters=6),
                               torch.linalg.eigvalsh(a).abs().max(-1).values)


# ----- in SVI, the step applied by hand -----------------------------------------------------------
def _fit(mean, cov, loc0, scale0, steps, seed):
    """SVI's gradients (Trace_ELBO, 16 vectorized particles) of a custom full-rank guide, the
    forward–backward step in q's frame with h = 1/ρ(LᵀĤL) written back into the param store;
    (mean error, covariance error) relative to their initial values, per step."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    d = mean.shape[0]

    def model():
        pyro.sample("z", dist.MultivariateNormal(mean, cov))

    def guide():
        loc = pyro.param("loc", loc0.clone())
        tril = pyro.param("tril", scale0 * torch.eye(d, dtype=F64), constraints.lower_cholesky)
        pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=tril))

    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True)
    store = pyro.get_param_store()
    guide()
    start = (float((loc0 - mean).norm()), float((scale0**2 * torch.eye(d) - cov).norm()))
    errors = []
    for _ in range(steps):
        with poutine.trace(param_only=True) as tr:
            loss = elbo.differentiable_loss(model, guide)
        m, tril = (tr.trace.nodes[n]["value"] for n in ("loc", "tril"))
        g_m, g_tril = torch.autograd.grad(loss, (m, tril))
        m, tril = m.detach(), tril.detach()
        hess = energy_hessian(tril, cholesky_to_cov_gradient(tril, g_tril))
        new_m, new_tril = forward_backward_step(m, tril, g_m, hess,
                                                curvature_step(hess, frame=tril), frame=tril)
        errors.append((float((new_m - mean).norm()) / start[0],
                       float((new_tril @ new_tril.T - cov).norm()) / start[1]))
        store["loc"], store["tril"] = new_m, new_tril
    return errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svi_fit_of_advancedvi_target_without_tuning(seed):
    """AdvancedVI.jl's test target (d = 5, N(5·1, 0.09 I) from N(0, I)), on which the Bures step
    with lr = 0.1 diverges: both errors below 0.1× their initial values from step 60 on
    (measured: 0.004–0.03 mean, 0.03–0.10 covariance over steps 60–100)."""
    errors = _fit(5.0 * torch.ones(5, dtype=F64), 0.09 * torch.eye(5, dtype=F64),
                  torch.zeros(5, dtype=F64), 1.0, 100, seed)
    assert max(max(e) for e in errors[59:]) < 0.12


def test_svi_fit_of_the_narrow_far_case():
    """The seed's case, q = N(0, 0.1²) → p = N(5, 0.5²): the curvature-scaled step brings the
    mean within 0.5 (one sd of p) of 5 by step 3 and keeps it there (measured: within 0.26 over
    steps 3–10); the variance stays positive and finite (16 particles: its estimate's own noise
    is ~35% per step at this step size)."""
    errors = _fit(torch.tensor([5.0], dtype=F64), torch.tensor([[0.25]], dtype=F64),
                  torch.zeros(1, dtype=F64), 0.1, 10, 0)
    assert max(e[0] for e in errors[2:]) < 0.1
    assert all(e[1] < 10 for e in errors)


@pytest.mark.parametrize("call", [
    lambda: forward_backward_step(torch.zeros(2), torch.eye(2), torch.zeros(2),
                                  torch.eye(2), 0.0),
    lambda: forward_backward_step(torch.zeros(2), torch.eye(2), torch.zeros(2),
                                  torch.zeros(2, 2), curvature_step(torch.zeros(2, 2))),
    lambda: forward_backward_step_diag(torch.zeros(2), torch.ones(2), torch.zeros(2),
                                       torch.zeros(2), -1.0),
    lambda: curvature_step(torch.eye(2), factor=0.0),
    lambda: curvature_step_diag(torch.ones(2), factor=-1.0),
])
def test_bad_step_sizes_are_rejected(call):
    with pytest.raises(ValueError, match="must be (finite and )?> 0"):
        call()


# ----- the low-rank Gaussian's W₂ metric in closed form ------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-4)])
def test_low_rank_bures_product_equals_the_pulled_back_dense_metric(dtype, tol):
    """G·v of N(loc, WWᵀ + diag D) in (loc, W, D) equals :class:`BuresMetric`'s product (the
    dense W₂ metric pulled back by autograd; d = 7, r = 3), for one tangent and a batch."""
    g = torch.Generator().manual_seed(8)
    d, r = 7, 3
    loc = torch.randn(d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(d, r, generator=g, dtype=dtype).requires_grad_()
    diag = (torch.rand(d, generator=g, dtype=dtype) + 0.2).requires_grad_()
    leaves = [loc, w, diag]
    pulled_back = BuresMetric([(loc, w @ w.T + torch.diag(diag), 1.0)], leaves)
    product = LowRankBures(leaves)
    tangents = torch.randn(4, d + d * r + d, generator=g, dtype=dtype)
    batch = product((tangents[:, :d], tangents[:, d:d + d * r].reshape(4, d, r),
                     tangents[:, d + d * r:]))
    for i, v in enumerate(tangents):
        expected = pulled_back.mvp(v)
        got = flat(product(unflat(v, leaves)))
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        torch.testing.assert_close(flat([b[i] for b in batch]), expected, atol=tol, rtol=tol)


def test_low_rank_bures_product_is_batched_over_arguments():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(2, 5, 2, generator=g, dtype=F64)
    diag = torch.rand(2, 5, generator=g, dtype=F64) + 0.1
    v = (torch.randn(2, 5, generator=g, dtype=F64), torch.randn(2, 5, 2, generator=g, dtype=F64),
         torch.randn(2, 5, generator=g, dtype=F64))
    batch = LowRankBures((torch.zeros(2, 5, dtype=F64), w, diag))(v)
    for i in range(2):
        single = LowRankBures((torch.zeros(5, dtype=F64), w[i], diag[i]))(tuple(x[i] for x in v))
        for b, s in zip(batch, single, strict=True):
            torch.testing.assert_close(b[i], s)
