"""Likelihoods for :mod:`pyro.contrib.gp` variational models that score the ELBO's expected
log-likelihood E_q(f)[log p(y | f)] under q(f) = N(m, v), pointwise.

contrib.gp's ``likelihoods.Gaussian`` scores log N(y | m, v + σ²), the log predictive density,
which is not that expectation (it is larger, by Jensen's inequality), so the objective it gives
``VariationalGP`` and ``VariationalSparseGP`` is not the ELBO, and its optimum in q is not the
variational posterior (Titsias 2009; Hensman, Fusi & Lawrence 2013). ``Binary`` estimates the
expectation from a single draw of f per call. Here:

* :class:`ExpectedGaussian`: E_q[log N(y | f, σ²)] = log N(y | m, σ²) − v / (2σ²), exactly;
* :class:`ExpectedBernoulli`: E_q[log Bernoulli(y | sigmoid(f))] by Gauss–Hermite quadrature
  (GPflow's ``variational_expectations``) or by Monte Carlo draws.

The expected log-likelihood is linear in q's mean parameters (E[u], E[uuᵀ]) when it is a
quadratic in f (Gaussian): a natural-gradient step of size 1 then lands on the optimal q(u).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.contrib.gp.likelihoods import Likelihood
from pyro.nn.module import PyroParam
from torch import Tensor
from torch.distributions import constraints

__all__ = ["ExpectedGaussian", "ExpectedBernoulli", "freeze"]


def freeze(module: torch.nn.Module, *names: str) -> None:
    """Fixes params of a (contrib.gp) module at their current values: each becomes a buffer, so
    no Pyro param exists for it and SVI neither sees nor steps it (GPflow's
    ``set_trainable(param, False)``); it still follows ``module.to(...)`` and ``state_dict``.

    >>> freeze(svgp.kernel, "lengthscale", "variance"); freeze(svgp, "Xu")
    """
    for name in names:
        value = getattr(module, name, None)
        if not isinstance(value, Tensor):
            raise ValueError(f"freeze: {type(module).__name__} has no tensor attribute {name!r}")
        value = value.detach().clone()
        delattr(module, name)
        module.register_buffer(name, value)


class ExpectedGaussian(Likelihood):
    """Gaussian likelihood y ~ N(f, σ²) scored by its exact expectation under q(f) = N(m, v):

    E_q[log N(y | f, σ²)] = log N(y | m, σ²) − v / (2σ²)

    (expand (y − f)² = (y − m)² − 2(y − m)(f − m) + (f − m)² and take E_q). In the model this is
    the observed site ``y`` ~ N(m, σ²) plus a factor ``y_variance_penalty`` = −Σ v / (2σ²).
    Without ``y``, a draw from the predictive N(m, v + σ²).

    :param variance: σ² > 0 (a tensor or a number), a positive :class:`~pyro.nn.module.PyroParam`
        (default 1).
    """

    variance: Tensor  # read as its constrained value

    def __init__(self, variance: Tensor | float | None = None):
        super().__init__()
        variance = torch.as_tensor(1.0 if variance is None else variance,
                                   dtype=None if isinstance(variance, Tensor) else
                                   torch.get_default_dtype())
        if not bool(torch.isfinite(variance).all() & (variance > 0).all()):
            raise ValueError(f"ExpectedGaussian: variance must be finite and > 0, got "
                             f"{variance!r}")
        self.variance = PyroParam(variance, constraints.positive)  # type: ignore[assignment]

    def forward(self, f_loc: Tensor, f_var: Tensor, y: Tensor | None = None) -> Tensor:
        name = self._pyro_get_fullname("y")
        if y is None:
            return pyro.sample(name, dist.Normal(f_loc, (f_var + self.variance).sqrt()))
        _check_shapes(name, f_loc, f_var, y)
        pyro.factor(name + "_variance_penalty", -(f_var / (2 * self.variance)).sum())
        y_dist = dist.Normal(f_loc, self.variance.sqrt()).expand(y.shape).to_event(y.dim())
        return pyro.sample(name, y_dist, obs=y)


class ExpectedBernoulli(Likelihood):
    """Bernoulli likelihood y ~ Bernoulli(sigmoid(f)) scored by E_q[log p(y | f)] under
    q(f) = N(m, v), as the factor ``y``:

    Σ_k w_k log p(y | m + √v z_k),

    with Gauss–Hermite nodes z_k = √2 x_k and weights w_k/√π (``num_points`` of them: exact for
    polynomials of degree < 2·num_points in f; GPflow's default 20), or, with ``num_samples``,
    z_k ~ N(0, 1) drawn afresh at each call and weights 1/S (an unbiased, reparameterized
    Monte Carlo estimate). Without ``y``, a draw y ~ Bernoulli(sigmoid(f)), f ~ q(f).

    :param num_points: Gauss–Hermite points (≥ 1).
    :param num_samples: Monte Carlo draws instead of quadrature (None: quadrature).
    """

    def __init__(self, num_points: int = 20, num_samples: int | None = None):
        super().__init__()
        for label, value in (("num_points", num_points), ("num_samples", num_samples)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                          and value >= 1):
                raise ValueError(f"ExpectedBernoulli: {label} must be an integer >= 1, "
                                 f"got {value!r}")
        self.num_points, self.num_samples = num_points, num_samples

    def nodes(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Standard-normal nodes z_k and weights w_k with Σ_k w_k g(z_k) ≈ E[g(z)], z ~ N(0, 1)."""
        if self.num_samples is not None:
            z = torch.randn(self.num_samples, dtype=like.dtype, device=like.device)
            return z, torch.full_like(z, 1.0 / self.num_samples)
        x, w = np.polynomial.hermite.hermgauss(self.num_points)
        z = torch.as_tensor(x * math.sqrt(2.0), dtype=like.dtype, device=like.device)
        return z, torch.as_tensor(w / math.sqrt(math.pi), dtype=like.dtype, device=like.device)

    def forward(self, f_loc: Tensor, f_var: Tensor, y: Tensor | None = None) -> Tensor:
        name = self._pyro_get_fullname("y")
        if y is None:
            f = dist.Normal(f_loc, f_var.sqrt()).rsample()
            return pyro.sample(name, dist.Bernoulli(logits=f))
        _check_shapes(name, f_loc, f_var, y)
        z, w = self.nodes(f_loc)
        f = f_loc + f_var.sqrt() * z.reshape((-1,) + (1,) * f_loc.dim())
        log_lik = dist.Bernoulli(logits=f).log_prob(y.to(f.dtype).expand(f.shape))
        expected = (w.reshape((-1,) + (1,) * f_loc.dim()) * log_lik).sum(0)
        pyro.factor(name, expected.sum())
        return y


def _check_shapes(name: str, f_loc: Tensor, f_var: Tensor, y: Tensor) -> None:
    if f_loc.shape != y.shape[-f_loc.dim():] or f_var.shape != f_loc.shape:
        raise ValueError(f"likelihood site {name!r}: y of shape {tuple(y.shape)} does not match "
                         f"f_loc {tuple(f_loc.shape)} / f_var {tuple(f_var.shape)}")
