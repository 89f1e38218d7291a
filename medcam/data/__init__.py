"""Synthetic data made on the fly: phantoms in physical coordinates and DICOM series."""

from medcam.data.synthetic import Geometry, blob_phantom, rotation, write_dicom_series

__all__ = ["Geometry", "blob_phantom", "rotation", "write_dicom_series"]
