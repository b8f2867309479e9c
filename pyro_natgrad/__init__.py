"""pyro_natgrad: natural-gradient and Wasserstein-gradient optimizers for Pyro's SVI."""

from .diagnostics import VIDiagnostics, to_inference_data, vi_diagnostics
from .fisher.empirical import empirical_fisher
from .fit import fit, plot_history
from .guides import record_args
from .optim import NaturalGradient, StepRefusedWarning, WassersteinGradient

__version__ = "0.1.0"

__all__ = [
    "NaturalGradient", "WassersteinGradient", "StepRefusedWarning", "record_args",
    "empirical_fisher", "fit", "plot_history", "to_inference_data", "vi_diagnostics",
    "VIDiagnostics",
]
