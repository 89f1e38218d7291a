"""The public API and packaging facts."""

from __future__ import annotations

import importlib.metadata

import medcam


def test_public_api_is_exported():
    for name in medcam.__all__:
        assert hasattr(medcam, name), name
    assert {"explain", "Explainer", "list_layers", "MedcamError"} <= set(medcam.__all__)


def test_one_version_string():
    assert importlib.metadata.version("medcam-monai") == medcam.__version__


def test_all_errors_are_medcam_errors():
    for err in (medcam.LayerError, medcam.ModelError, medcam.TargetError, medcam.InputError):
        assert issubclass(err, medcam.MedcamError)
