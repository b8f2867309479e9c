"""Metric estimators: the closed-form exponential-family Fisher pulled back to a guide's params,
the Monte Carlo score Fisher of any guide, and the empirical Fisher of a network."""

from .closed_form import PulledBackFisher
from .monte_carlo import MonteCarloFisher

__all__ = ["PulledBackFisher", "MonteCarloFisher"]
