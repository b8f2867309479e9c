"""The optimizers and the pieces they are assembled from.

A step runs, per group of guide sites: a *direction* (:class:`Mirror`, :class:`FisherSolve`,
:class:`Bures`, :class:`MetricSolve`) builds a proposal ``rate -> candidate``, shaped by
*transforms* (:class:`HeavyBall`, :class:`PrecisionShortening` or :class:`Retraction`,
:class:`GaugeProjection`, :class:`VarianceAdaptation`); *checks* test each candidate and a
:class:`KLTrustRegion` bounds it (:class:`KLAim` aims it at the bound); the *step-size policy*
(:class:`BoldDriver`, :class:`PflugCeiling`) judges the step from the next gradient.
:class:`GeometricOptim` runs that pipeline as a :class:`pyro.optim.PyroOptim`.
"""

from .bures import Bures, MetricSolve
from .fisher_solve import FisherAverage, FisherSolve
from .geometric import GeometricOptim, StepRefusedWarning
from .mirror import Mirror
from .natural import NaturalGradient
from .proposal import Candidate, Proposal
from .step_size import BoldDriver, Judgement, PflugCeiling, Step, judge
from .transforms import (
    GaugeProjection,
    HeavyBall,
    PrecisionShortening,
    Retraction,
    VarianceAdaptation,
    Velocity,
)
from .trust_region import KLAim, KLTrustRegion
from .wasserstein import WassersteinGradient

__all__ = [
    "NaturalGradient", "WassersteinGradient", "GeometricOptim", "StepRefusedWarning",
    "Mirror", "FisherSolve", "FisherAverage", "Bures", "MetricSolve", "Candidate", "Proposal",
    "HeavyBall", "PrecisionShortening", "Retraction", "GaugeProjection", "VarianceAdaptation",
    "Velocity", "KLTrustRegion", "KLAim",
    "BoldDriver", "PflugCeiling", "Judgement", "Step", "judge",
]
