"""Optimizers that compose the guide reader with family / metric geometry."""

from .base import Candidate, GeometricOptim, StepRefusedWarning
from .natural import NaturalGradient

__all__ = ["GeometricOptim", "Candidate", "StepRefusedWarning", "NaturalGradient"]
