"""Longitudinal comparison of one patient's heatmaps across visits.

``compare(timepoints)`` registers each follow-up to the baseline (SimpleITK, rigid by default),
measures activated volume, centroid and peak shifts, overlap and correlation, fits trends vs
days, and writes difference maps, tables, plots and an HTML report.
"""

from medcam.longitudinal.compare import LongitudinalResult, compare
from medcam.longitudinal.metrics import METRIC_DESCRIPTIONS
from medcam.longitudinal.registration import Registration, register
from medcam.longitudinal.timepoint import Timepoint

__all__ = [
    "METRIC_DESCRIPTIONS",
    "LongitudinalResult",
    "Registration",
    "Timepoint",
    "compare",
    "register",
]
