"""Lightning modules and callbacks of the training stack."""

from .callbacks import DecisionBoundaryPlot, PredictionWriter, RunSummary
from .classifier import Classifier

__all__ = ["Classifier", "DecisionBoundaryPlot", "PredictionWriter", "RunSummary"]
