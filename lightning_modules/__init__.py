"""Lightning modules, networks and callbacks of the training stack."""

from .callbacks import DecisionBoundaryPlot, PredictionWriter, RunSummary, batch_size
from .classifier import Classifier
from .networks import MLP

__all__ = [
    "MLP",
    "Classifier",
    "DecisionBoundaryPlot",
    "PredictionWriter",
    "RunSummary",
    "batch_size",
]
