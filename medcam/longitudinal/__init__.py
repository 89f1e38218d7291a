"""Longitudinal comparison of one patient's heatmaps across visits.

``compare(timepoints)`` registers each follow-up to the baseline (SimpleITK, rigid by default)
and checks the registration, measures activated volume, centroid and overlap against one
threshold for all visits, tracks findings (connected activated regions) with stable numbers and
UIDs, flags numbers that may be wrong, and writes difference maps, transforms, tables, pictures,
a self-contained HTML report and DICOM SEG + TID 1500 SR.
"""

from medcam.longitudinal.compare import LongitudinalResult, compare
from medcam.longitudinal.findings import Finding, FindingVisit
from medcam.longitudinal.metrics import METRIC_DESCRIPTIONS
from medcam.longitudinal.quality import Flag, Limits, UnreliableComparisonError
from medcam.longitudinal.registration import Registration, register
from medcam.longitudinal.timepoint import Timepoint, parse_date

__all__ = [
    "METRIC_DESCRIPTIONS",
    "Finding",
    "FindingVisit",
    "Flag",
    "Limits",
    "LongitudinalResult",
    "Registration",
    "Timepoint",
    "UnreliableComparisonError",
    "compare",
    "parse_date",
    "register",
]
