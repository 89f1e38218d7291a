"""Exceptions raised by medcam.

Every error medcam raises on bad input is a :class:`MedcamError`, whose message says what was
wrong and how to fix it. Subclasses let callers catch one family of problems.
"""

from __future__ import annotations

__all__ = [
    "InputError",
    "LayerError",
    "MedcamError",
    "ModelError",
    "OutputError",
    "PacsError",
    "TargetError",
]


class MedcamError(Exception):
    """Base class of every error medcam raises on bad input or configuration."""


class LayerError(MedcamError, KeyError):
    """A target layer is unknown, unusable (no spatial output) or cannot be hooked."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class ModelError(MedcamError):
    """The model cannot be explained as given (TorchScript, no differentiable path, ...)."""


class TargetError(MedcamError, ValueError):
    """A target (class index, mask, selector) does not fit the model's output."""


class InputError(MedcamError, ValueError):
    """The input tensor or file is unusable (NaN/Inf, wrong rank, ...)."""


class OutputError(MedcamError, OSError):
    """An output cannot be written (folder not writable, would replace an input file, ...)."""


class PacsError(MedcamError):
    """A DICOM server (PACS, DICOMweb or DIMSE) is unreachable, refuses the credentials or an
    operation, or went away mid-transfer. Nothing of the job is marked done: a retry completes
    it (derived objects keep their UIDs, so nothing is stored twice)."""
