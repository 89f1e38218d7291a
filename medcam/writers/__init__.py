"""Writers: NIfTI, DICOM Parametric Map / SEG / Secondary Capture, PNG figures, JSON sidecar."""

from medcam.writers.outputs import FORMATS, case_name, model_identity, write_outputs

__all__ = ["FORMATS", "case_name", "model_identity", "write_outputs"]
