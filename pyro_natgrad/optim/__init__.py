"""The optimizers: geometry-aware :class:`pyro.optim.PyroOptim` subclasses."""

from .base import Candidate, GeometricOptim, StepRefusedWarning
from .natural import NaturalGradient
from .wasserstein import WassersteinGradient

__all__ = ["GeometricOptim", "Candidate", "StepRefusedWarning", "NaturalGradient",
           "WassersteinGradient"]
