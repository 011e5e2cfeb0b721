"""Data modules: the curve task and a large-vocabulary teacher task."""

from .curve import CurveDataModule, band_boundaries, band_labels
from .teacher import TeacherDataModule

__all__ = ["CurveDataModule", "TeacherDataModule", "band_boundaries", "band_labels"]
