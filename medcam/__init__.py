"""medcam: Grad-CAM and relatives for 2D/3D medical-imaging CNNs.

Data flow: load -> model + target layer -> CAM engine (:mod:`medcam.engine`) -> resample /
invert to original space -> write (NIfTI, DICOM, figures) -> longitudinal compare -> report.
"""

__version__ = "0.1.0"

from medcam.calibrate import Calibration, calibrate_layers, calibrate_scans, load_calibration
from medcam.engine import (
    METHODS,
    AllClasses,
    CAMResult,
    ClassTarget,
    Explainer,
    LayerInfo,
    PredictedClass,
    SegmentationTarget,
    explain,
    list_layers,
    register_method,
)
from medcam.errors import (
    InputError,
    LayerError,
    MedcamError,
    ModelError,
    OutputError,
    PacsError,
    TargetError,
    TrustError,
)
from medcam.io import Scan, load_scan
from medcam.space import ScanExplanation, explain_scan
from medcam.writers import write_outputs

__all__ = [
    "METHODS",
    "AllClasses",
    "CAMResult",
    "Calibration",
    "ClassTarget",
    "Explainer",
    "InputError",
    "LayerError",
    "LayerInfo",
    "MedcamError",
    "ModelError",
    "OutputError",
    "PacsError",
    "PredictedClass",
    "Scan",
    "ScanExplanation",
    "SegmentationTarget",
    "TargetError",
    "TrustError",
    "__version__",
    "calibrate_layers",
    "calibrate_scans",
    "explain",
    "explain_scan",
    "list_layers",
    "load_calibration",
    "load_scan",
    "register_method",
    "write_outputs",
]
