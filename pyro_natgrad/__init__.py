"""pyro_natgrad: natural-gradient and Wasserstein-gradient optimizers for Pyro's SVI."""

from .guides import record_args
from .optim import NaturalGradient, StepRefusedWarning

__version__ = "0.1.0"

__all__ = ["NaturalGradient", "StepRefusedWarning", "record_args"]
