"""Lightning modules, networks and callbacks of the training stack."""

from .callbacks import (
    DecisionBoundaryPlot,
    LastCheckpointOnInterrupt,
    PredictionWriter,
    RunSummary,
    batch_size,
)
from .classifier import Classifier
from .networks import MLP

__all__ = [
    "MLP",
    "Classifier",
    "DecisionBoundaryPlot",
    "LastCheckpointOnInterrupt",
    "PredictionWriter",
    "RunSummary",
    "batch_size",
]
