"""Input: loading scans (NIfTI, DICOM series / 2D DICOM, PNG/JPEG, MetaTensor); safe output."""

from medcam.io.output import OutputDir, safe_name
from medcam.io.scan import Scan, load_scan

__all__ = ["OutputDir", "Scan", "load_scan", "safe_name"]
