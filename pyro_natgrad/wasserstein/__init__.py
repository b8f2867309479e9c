"""Wasserstein-2 geometry of guide distributions: Bures–Wasserstein steps and metric for Gaussians,
the pushforward metric of any reparameterized distribution, and Gaussian VI as a Bures–Wasserstein
gradient flow."""

from ..families.multivariate_normal import cholesky_to_cov_gradient
from .gaussian import BuresMetric, bures_step, gaussian_vi_flow, lyapunov_solve
from .pushforward import PushforwardMetric

__all__ = ["BuresMetric", "bures_step", "cholesky_to_cov_gradient", "gaussian_vi_flow",
           "lyapunov_solve", "PushforwardMetric"]
