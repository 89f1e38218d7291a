"""Reading DICOM: one image series from a folder, or a single 2D image.

Slices are ordered by their position along the slice normal ``cross(row, column cosines)``,
never by InstanceNumber or file name (MONAI's PydicomReader sorts by InstanceNumber). A series
that mixes series, orientations, sizes or pixel spacings, has duplicate or missing slices,
uneven slice spacing, or a slice stack that is not perpendicular to the slices, is refused
with an error that names the problem.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcam.errors import InputError

__all__ = ["DicomVolume", "read_dicom_file", "read_dicom_series"]

ORIENTATION_TOL = 1e-4
SPACING_REL_TOL = 0.05


@dataclass
class DicomVolume:
    """Pixel data in modality units (HU for CT) and geometry of a DICOM image or series.

    Attributes
    ----------
    array:
        ``(X, Y, Z)`` float32 (columns, rows, slices) for a series; ``(X, Y)`` for a 2D image.
    affine_lps:
        4x4 voxel-index to LPS-mm map (``None`` for a 2D image without geometry).
    datasets:
        The pydicom datasets, sorted along the slice normal (pixel data not kept).
    """

    array: np.ndarray
    affine_lps: np.ndarray | None
    datasets: list


def _read(path: Path, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return None


def _modality_values(ds) -> np.ndarray:
    from pydicom.pixels import apply_rescale

    try:
        pixels = ds.pixel_array
    except Exception as err:  # missing/undecodable pixel data
        raise InputError(
            f"Cannot decode the pixel data of {Path(ds.filename).name!r} ({err}). Install the "
            "decoder for its transfer syntax (e.g. pylibjpeg) or convert the series."
        ) from err
    return np.asarray(apply_rescale(pixels, ds), dtype=np.float32)


def _drop_pixels(ds):
    if "PixelData" in ds:
        del ds.PixelData
    return ds


def read_dicom_series(folder: str | Path) -> DicomVolume:
    """Read the one image series in ``folder`` (non-recursive; non-DICOM files are ignored).

    Returns
    -------
    DicomVolume
        ``array: (X, Y, Z)`` float32 in modality units (RescaleSlope/Intercept applied),
        ``affine_lps`` from ImagePositionPatient/ImageOrientationPatient/PixelSpacing and the
        measured slice spacing, ``datasets`` sorted along the slice normal.

    Raises
    ------
    InputError
        No DICOM files; several series; missing geometry; inconsistent orientation, size or
        pixel spacing; duplicate, missing or unevenly spaced slices; a sheared stack.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper() != "DICOMDIR")
    datasets = [ds for ds in (_read(p) for p in files) if ds is not None and "PixelData" in ds]
    if not datasets:
        raise InputError(f"No DICOM image files in {folder}. Point to a folder of one series.")
    by_series: dict[str, list] = defaultdict(list)
    for ds in datasets:
        by_series[str(ds.get("SeriesInstanceUID", "?"))].append(ds)
    if len(by_series) > 1:
        lines = [
            f"  {uid}: {len(v)} files, '{v[0].get('SeriesDescription', '')}'"
            for uid, v in by_series.items()
        ]
        raise InputError(
            f"{folder} mixes {len(by_series)} DICOM series; put each series in its own folder:\n"
            + "\n".join(lines)
        )
    if len(datasets) == 1:
        ds = datasets[0]
        frames = int(ds.get("NumberOfFrames", 1))
        if frames > 1:
            raise InputError(
                f"{folder} holds one multi-frame (enhanced) DICOM object with {frames} frames; "
                "medcam reads single-frame series. Convert it (e.g. with dcm2niix) to NIfTI."
            )
        vol = read_dicom_file(Path(ds.filename))
        return vol
    for ds in datasets:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise InputError(
                    f"{Path(ds.filename).name} has no {tag}; a 3D series needs it on every "
                    "slice. For 2D images (CR/DX) pass a single file instead of a folder."
                )
    iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.abs(iop - iop[0]).max() > ORIENTATION_TOL:
        raise InputError(
            f"The slices in {folder} do not share one ImageOrientationPatient (e.g. a scout or "
            "a reformat mixed in); keep one orientation per folder."
        )
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise InputError(f"The slices in {folder} have different sizes (Rows, Columns): {sizes}.")
    spacing = np.array([[float(v) for v in ds.PixelSpacing] for ds in datasets])
    if np.abs(spacing - spacing[0]).max() > 1e-4:
        raise InputError(f"The slices in {folder} have different PixelSpacing values.")
    row_cos, col_cos = iop[0, :3], iop[0, 3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    datasets = [datasets[i] for i in order]
    positions, dist = positions[order], dist[order]
    gaps = np.diff(dist)
    if (gaps < 1e-3).any():
        k = int(np.argmin(gaps))
        raise InputError(
            f"Two slices in {folder} share one position ({dist[k]:.3f} mm along the normal): "
            f"{Path(datasets[k].filename).name} and {Path(datasets[k + 1].filename).name}. "
            "Remove duplicates (or split multiple acquisitions into separate folders)."
        )
    step = float(np.median(gaps))
    if np.abs(gaps - step).max() > SPACING_REL_TOL * step:
        k = int(np.argmax(np.abs(gaps - step)))
        missing = round(gaps[k] / step) - 1
        what = f"about {missing} missing slice(s)" if missing >= 1 else "uneven slice spacing"
        raise InputError(
            f"The series in {folder} has {what}: the gap after {dist[k]:.2f} mm is "
            f"{gaps[k]:.2f} mm where the others are {step:.2f} mm. Resample it to a regular "
            "grid or restore the missing files."
        )
    slice_vec = (positions[-1] - positions[0]) / (len(positions) - 1)
    if np.linalg.norm(np.cross(slice_vec / np.linalg.norm(slice_vec), normal)) > 1e-3:
        raise InputError(
            f"The slices in {folder} are not stacked along their normal (gantry tilt or a "
            "sheared stack). Resample the series to an orthogonal grid first."
        )
    array = np.stack([_modality_values(ds).T for ds in datasets], axis=-1)  # (X, Y, Z)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * spacing[0, 1]
    affine[:3, 1] = col_cos * spacing[0, 0]
    affine[:3, 2] = slice_vec
    affine[:3, 3] = positions[0]
    return DicomVolume(array.astype(np.float32), affine, [_drop_pixels(ds) for ds in datasets])


def read_dicom_file(path: str | Path) -> DicomVolume:
    """Read one single-frame 2D DICOM image (CR, DX, a single CT/MR slice, ...).

    Returns ``array: (X, Y)`` = (columns, rows) in modality units, and ``affine_lps`` when the
    image has ImagePositionPatient/ImageOrientationPatient (else ``None``).
    """
    path = Path(path)
    ds = _read(path)
    if ds is None or "PixelData" not in ds:
        raise InputError(f"{path} is not a DICOM image file.")
    if int(ds.get("NumberOfFrames", 1)) > 1:
        raise InputError(f"{path} is a multi-frame DICOM object; medcam reads single frames.")
    pixels = _modality_values(ds)
    if pixels.ndim == 3:  # colour: (rows, cols, 3) -> keep luminance
        pixels = pixels.mean(axis=-1)
    affine = None
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        sp = [float(v) for v in ds.PixelSpacing]
        affine = np.eye(4)
        affine[:3, 0] = iop[:3] * sp[1]
        affine[:3, 1] = iop[3:] * sp[0]
        affine[:3, 2] = np.cross(iop[:3], iop[3:]) * float(ds.get("SliceThickness", 1.0) or 1.0)
        affine[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return DicomVolume(pixels.T.astype(np.float32), affine, [_drop_pixels(ds)])
