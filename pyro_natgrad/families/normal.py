"""Univariate Normal N(m, σ²): T(z) = (z, z²), η = (m/σ², -1/(2σ²)), μ = (m, m² + σ²),
A(η) = -η₁²/(4η₂) - ½ log(-2η₂) (Wainwright & Jordan 2008, Example 3.3)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Normal as _Normal

from .base import ExponentialFamily, Params, symmetric_2x2


class Normal(ExponentialFamily):
    name = "Normal"
    dist_class = _Normal
    arg_names = ("loc", "scale")
    location_split = True
    event_dims = (0, 0)

    def args_to_natural(self, loc: Tensor, scale: Tensor) -> Params:
        prec = scale.pow(-2)
        return loc * prec, -0.5 * prec

    def natural_to_args(self, eta1: Tensor, eta2: Tensor) -> Params:
        var = -0.5 / eta2
        return eta1 * var, var.sqrt()

    def args_to_mean(self, loc: Tensor, scale: Tensor) -> Params:
        return loc, loc.square() + scale.square()

    def mean_to_args(self, mu1: Tensor, mu2: Tensor) -> Params:
        return mu1, (mu2 - mu1.square()).sqrt()

    def mean_gradient(self, args: Params, d_args: Params) -> Params:
        """With m = μ₁, σ = (μ₂ − μ₁²)^½: ∂L/∂μ₂ = ∂L/∂σ / (2σ), ∂L/∂μ₁ = ∂L/∂m − 2m ∂L/∂μ₂
        (σ is never recomputed from μ₂ − μ₁², which cancels when m² ≫ σ²)."""
        (loc, scale), (d_loc, d_scale) = args, d_args
        d_mu2 = d_scale / (2 * scale)
        return d_loc - 2 * loc * d_mu2, d_mu2

    def log_partition(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        return -eta1.square() / (4 * eta2) - 0.5 * torch.log(-2 * eta2)

    def sufficient_statistics(self, z: Tensor, *eta: Tensor) -> Params:
        return z, z.square()

    def in_domain(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        return (eta2 < 0) & torch.isfinite(eta1) & torch.isfinite(eta2)

    def translate(self, eta: Params, shift: Tensor) -> Params:
        eta1, eta2 = eta
        return eta1 - 2 * eta2 * shift, eta2

    def retract(self, eta: Params, step: Params) -> Params:
        """Lin, Schmidt & Khan (2020, ICML), "Handling the positive-definite constraint in the
        Bayesian learning rule", eq. 7: with λ = -2η₂ and the plain precision step g = -2δ₂,
        λ' = λ + g + ½g²/λ > 0 for every g, and the mean moves by -(λ')⁻¹ρ∇ₘL as in the plain
        step: η' = η + δ + (c m, -½c) with c = ½g²/λ and m = η₁/λ."""
        (eta1, eta2), (d1, d2) = eta, step
        precision, g = -2 * eta2, -2 * d2
        c = 0.5 * g.square() / precision
        return eta1 + d1 + c * eta1 / precision, eta2 + d2 - 0.5 * c

    def fisher(self, eta1: Tensor, eta2: Tensor) -> Tensor:
        """Cov[(z, z²)] = [[σ², 2mσ²], [2mσ², 4m²σ² + 2σ⁴]]."""
        m, s = self.natural_to_args(eta1, eta2)
        v = s.square()
        return symmetric_2x2(v, 2 * m * v, 4 * m.square() * v + 2 * v.square())
