"""Wasserstein-2 geometry of guide distributions: Bures–Wasserstein steps and metric for Gaussians,
the pushforward metric of any reparameterized distribution, and Gaussian VI as a Bures–Wasserstein
gradient flow."""

from ..families.multivariate_normal import cholesky_to_cov_gradient
from .forward_backward import (
    energy_hessian,
    energy_hessian_diag,
    entropy_prox,
    forward_backward_step,
    forward_backward_step_diag,
)
from .gaussian import (
    BuresMetric,
    LowRankBures,
    ScaledLowRankBures,
    bures_step,
    gaussian_vi_flow,
    lyapunov_solve,
    tril_of_root,
)
from .pushforward import PushforwardMetric
from .step_size import curvature_step, curvature_step_diag, spectral_radius

__all__ = ["BuresMetric", "bures_step", "cholesky_to_cov_gradient", "curvature_step",
           "curvature_step_diag", "energy_hessian", "energy_hessian_diag", "entropy_prox",
           "forward_backward_step", "forward_backward_step_diag", "gaussian_vi_flow",
           "LowRankBures", "lyapunov_solve", "PushforwardMetric", "ScaledLowRankBures",
           "spectral_radius", "tril_of_root"]
