"""Fisher information metrics: closed form (pulled back through the guide), Monte Carlo, and the
empirical Fisher of a network."""

from .closed_form import PulledBackFisher
from .empirical import empirical_fisher
from .monte_carlo import MonteCarloFisher

__all__ = ["PulledBackFisher", "MonteCarloFisher", "empirical_fisher"]
