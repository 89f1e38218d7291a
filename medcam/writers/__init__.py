"""Writers: NIfTI, DICOM Parametric Map / SEG / Secondary Capture, PNG figures, JSON sidecar.

Each output format is one registered writer (:mod:`medcam.writers.registry`);
:func:`write_outputs` writes a case's formats as one transaction.
"""

from medcam.writers.outputs import FORMATS, case_name, model_identity, write_outputs
from medcam.writers.registry import (
    CaseOutput,
    OutputFormat,
    available_formats,
    check_formats,
    register_format,
)

__all__ = [
    "FORMATS",
    "CaseOutput",
    "OutputFormat",
    "available_formats",
    "case_name",
    "check_formats",
    "model_identity",
    "register_format",
    "write_outputs",
]
