"""Wasserstein-2 geometry of guide distributions: Bures–Wasserstein steps for Gaussians, the
pushforward metric of any reparameterized distribution, and Gaussian VI as a Bures–Wasserstein
gradient flow."""

from .gaussian import bures_step, gaussian_vi_flow
from .pushforward import PushforwardMetric

__all__ = ["bures_step", "gaussian_vi_flow", "PushforwardMetric"]
