"""The inverse mean map η = (∇A)⁻¹(μ) by damped Newton, for families without a closed form.

η(μ) minimizes the strictly convex dual f(η) = A(η) - <η, μ>, whose gradient is μ(η) - μ and whose
Hessian is the Fisher F(η). Newton's step is δ = F(η)⁻¹(μ - μ(η)) with decrement
λ² = (μ - μ(η))ᵀδ ≈ 2 (f(η) - f(η*)) = 2 KL(q_η* ‖ q_η). The step is halved until η stays in the
natural domain and f drops by ¼tλ² (Armijo), full steps are taken once λ² < 0.01, and the iteration
stops at λ² ≤ machine epsilon (Minka 2000, "Estimating a Dirichlet distribution", §1;
Boyd & Vandenberghe 2004, *Convex Optimization*, §9.5).

One more Newton step is taken outside ``no_grad`` with only μ attached, so autograd sees
∂η/∂μ = F(η)⁻¹, the derivative of the inverse map given by the implicit function theorem.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ExponentialFamily, Params

_ARMIJO = 0.25
_FULL_STEP_DECREMENT = 0.01


def _newton_step(family: ExponentialFamily, eta: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Flat Newton step δ = F⁻¹(μ - μ(η)) and decrement λ² = (μ - μ(η))ᵀδ."""
    params = family.unflatten(eta)
    residual = target - family.flatten(family.natural_to_mean(*params))[0]
    step = torch.linalg.solve(family.fisher(*params), residual.unsqueeze(-1)).squeeze(-1)
    return step, (residual * step).sum(-1)


def _dual_objective(family: ExponentialFamily, eta: Tensor, target: Tensor) -> Tensor:
    return family.log_partition(*family.unflatten(eta)) - (eta * target).sum(-1)


def invert_mean_map(family: ExponentialFamily, mu: Params, eta0: Params, max_iter: int = 50,
                    max_halvings: int = 40) -> Params:
    """η with ∇A(η) = μ, by damped Newton from ``eta0`` (which must lie in the domain)."""
    flat_mu = family.flatten(mu)[0]
    target = flat_mu.detach()
    eta = family.flatten(eta0)[0].detach().expand_as(target)
    if not bool(family.in_domain(*family.unflatten(eta)).all()):
        raise ValueError(f"{family.name}: mean parameters outside the mean-parameter space "
                         "(no natural parameter has them as its expectation)")
    tol = torch.finfo(target.dtype).eps
    with torch.no_grad():
        for _ in range(max_iter):
            step, decrement = _newton_step(family, eta, target)
            active = ~(decrement <= tol)
            if not bool(active.any()):
                break
            f0 = _dual_objective(family, eta, target)
            rate = active.to(eta.dtype)
            for _ in range(max_halvings):
                candidate = eta + rate.unsqueeze(-1) * step
                descent = ((_dual_objective(family, candidate, target)
                            <= f0 - _ARMIJO * rate * decrement)
                           | (decrement < _FULL_STEP_DECREMENT))
                accepted = ~active | (family.in_domain(*family.unflatten(candidate)) & descent)
                if bool(accepted.all()):
                    break
                rate = torch.where(accepted, rate, 0.5 * rate)
            eta = torch.where(accepted.unsqueeze(-1), candidate, eta)
    step, decrement = _newton_step(family, eta, flat_mu)
    worst = float(decrement.detach().max())
    if not worst <= tol ** 0.5:
        raise RuntimeError(f"{family.name}: Newton inversion of the mean map did not converge in "
                           f"{max_iter} steps (largest Newton decrement {worst:.3g}); the mean "
                           "parameters may lie on the edge of the mean-parameter space")
    return family.unflatten(eta + step)


class IterativeMeanMap(ExponentialFamily):
    """A family whose μ ↦ η map is :func:`invert_mean_map` from ``initial_natural(*μ)``."""

    closed_form_mean_map = False

    def initial_natural(self, *mu: Tensor) -> Params:
        """A starting point inside the natural domain, close to (∇A)⁻¹(μ)."""
        raise NotImplementedError

    def mean_to_natural(self, *mu: Tensor) -> Params:
        """η(μ) by damped Newton (see :func:`invert_mean_map`)."""
        with torch.no_grad():
            eta0 = self.initial_natural(*mu)
        return invert_mean_map(self, mu, eta0)

    def mean_to_args(self, *mu: Tensor) -> Params:
        return self.natural_to_args(*self.mean_to_natural(*mu))
