"""Reading DICOM: an image series, one Enhanced multi-frame object, a Siemens MOSAIC, or a 2D image.

Slices are ordered by their position along the slice normal ``cross(row, column cosines)``,
never by InstanceNumber, frame number or file name (MONAI's PydicomReader sorts by
InstanceNumber). A stack that mixes series, orientations, sizes or pixel spacings, has
duplicate or missing slices, uneven slice spacing, or is not perpendicular to its slices, is
refused with an error that names the problem.

Three layouts give a 3D volume:

``series``
    A folder of single-frame images (CT, MR, PET, ...), one slice per file.
``enhanced``
    One Enhanced (or Legacy Converted Enhanced) CT / MR / PET object: all slices in one file,
    geometry in the per-frame and shared functional groups (PlanePositionSequence,
    PlaneOrientationSequence, PixelMeasuresSequence, PixelValueTransformationSequence).
    ``DicomVolume.frames`` says which frame (1-based) each slice is.
``mosaic``
    One Siemens MOSAIC image (fMRI, DWI): the slices are tiles of one big image; the tile count
    is NumberOfImagesInMosaic in the Siemens CSA image header (0029,xx10), read with nibabel's
    ``nicom.csareader``. The geometry follows nibabel's ``MosaicWrapper``: ImagePositionPatient
    is corrected from the mosaic's corner to the first tile, the slice direction is the CSA
    SliceNormalVector and the slice spacing SpacingBetweenSlices (else SliceThickness).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medcam.errors import InputError

__all__ = ["DicomVolume", "read_dicom_file", "read_dicom_series"]

ORIENTATION_TOL = 1e-4
SPACING_REL_TOL = 0.05

#: Multi-frame image storage classes whose frames are slices of one volume.
ENHANCED_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET",
}


#: BodyPartExamined defined terms (PS3.16 Annex L) of unpaired parts, as dciodvfy applies them:
#: for these, General Series Laterality (type 2C) must be absent; for a paired or unknown part
#: it must be present (empty = unknown).
UNPAIRED_BODY_PARTS = frozenset(
    """ABDOMEN ABDOMENPELVIS AORTA BLADDER BRAIN CHEST CHESTABDOMEN CHESTABDPELVIS CIRCLEOFWILLIS
    COCCYX COLON CORONARYARTERY CSPINE CTSPINE DUODENUM ESOPHAGUS GALLBLADDER HEAD HEADNECK HEART
    ILEUM ILIUM JAW JEJUNUM LARYNX LIVER LSPINE LSSPINE MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST
    NECKCHESTABDOMEN NECKCHESTABDPELV NOSE PANCREAS PELVIS PENIS PHARYNX PROSTATE RECTUM SKULL
    SPINE SPLEEN SSPINE STERNUM STOMACH THYMUS THYROID TLSPINE TONGUE TRACHEA TSPINE UTERUS
    VAGINA VULVA WHOLEBODY""".split()
)


def series_laterality(ds) -> str | None:
    """General Series Laterality for a series made from ``ds``: the source's own; else empty
    (unknown) unless its BodyPartExamined is an unpaired part (``None``: leave it out)."""
    if "Laterality" in ds:
        return str(ds.Laterality or "")
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    return None if part in UNPAIRED_BODY_PARTS else ""


@dataclass
class DicomVolume:
    """Pixel data in modality units (HU for CT) and geometry of a DICOM image or volume.

    Attributes
    ----------
    array:
        ``(X, Y, Z)`` float32 (columns, rows, slices) for a volume; ``(X, Y)`` for a 2D image.
    affine_lps:
        4x4 voxel-index to LPS-mm map (``None`` for a 2D image without geometry). For a volume
        its third column points along ``+cross(row, column cosines)``.
    datasets:
        The pydicom datasets (pixel data not kept): one per slice, sorted along the slice
        normal, for a ``series``; the one object for ``enhanced``, ``mosaic`` and ``2d``.
    layout:
        ``"series"``, ``"enhanced"``, ``"mosaic"`` or ``"2d"``.
    frames:
        ``enhanced`` only: the 1-based frame number of each slice, in slice order.
    """

    array: np.ndarray
    affine_lps: np.ndarray | None
    datasets: list
    layout: str = "series"
    frames: list[int] | None = None


def _read(path: Path, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return None


def _name(ds) -> str:
    filename = getattr(ds, "filename", None)
    return Path(filename).name if isinstance(filename, str) else "<dataset>"


def _pixels(ds) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as err:  # missing/undecodable pixel data
        raise InputError(
            f"Cannot decode the pixel data of {_name(ds)!r} ({err}). Install the decoder for its "
            "transfer syntax (e.g. pylibjpeg) or convert the series."
        ) from err


def _modality_values(ds) -> np.ndarray:
    from pydicom.pixels import apply_rescale

    return np.asarray(apply_rescale(_pixels(ds), ds), dtype=np.float32)


def _drop_pixels(ds):
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def _floats(values) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=np.float64)


def is_enhanced(ds) -> bool:
    """True for a multi-frame object with per-frame functional groups (Enhanced CT/MR/...)."""
    return "PerFrameFunctionalGroupsSequence" in ds


def is_mosaic(ds) -> bool:
    """True for a Siemens MOSAIC image (ImageType contains ``MOSAIC``)."""
    return any(str(v).strip().upper() == "MOSAIC" for v in (ds.get("ImageType") or []))


# ----------------------------------------------------------------------------- geometry


def _stack_affine(
    where: str,
    names: list[str],
    orientations: np.ndarray,
    positions: np.ndarray,
    spacings: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Check a stack of slices and give ``(order, affine_lps)``.

    ``orientations (n, 6)``, ``positions (n, 3)`` and ``spacings (n, 2)`` (row, column spacing)
    per slice; ``names`` name the slices in messages. ``order`` sorts the slices ascending along
    the slice normal; the affine maps ``(column, row, slice)`` indices to LPS mm.
    """
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOL:
        raise InputError(
            f"The slices in {where} do not share one ImageOrientationPatient (e.g. a scout or "
            "a reformat mixed in); keep one orientation per folder."
        )
    if np.abs(spacings - spacings[0]).max() > 1e-4:
        raise InputError(f"The slices in {where} have different PixelSpacing values.")
    row_cos, col_cos = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row_cos, col_cos)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    positions, dist = positions[order], dist[order]
    names = [names[i] for i in order]
    gaps = np.diff(dist)
    if (gaps < 1e-3).any():
        k = int(np.argmin(gaps))
        raise InputError(
            f"Two slices in {where} share one position ({dist[k]:.3f} mm along the normal): "
            f"{names[k]} and {names[k + 1]}. Remove duplicates (or split multiple acquisitions "
            "into separate folders)."
        )
    step = float(np.median(gaps))
    if np.abs(gaps - step).max() > SPACING_REL_TOL * step:
        k = int(np.argmax(np.abs(gaps - step)))
        missing = round(gaps[k] / step) - 1
        what = f"about {missing} missing slice(s)" if missing >= 1 else "uneven slice spacing"
        raise InputError(
            f"The series in {where} has {what}: the gap after {dist[k]:.2f} mm is "
            f"{gaps[k]:.2f} mm where the others are {step:.2f} mm. Resample it to a regular "
            "grid or restore the missing files."
        )
    slice_vec = (positions[-1] - positions[0]) / (len(positions) - 1)
    if np.linalg.norm(np.cross(slice_vec / np.linalg.norm(slice_vec), normal)) > 1e-3:
        raise InputError(
            f"The slices in {where} are not stacked along their normal (gantry tilt or a "
            "sheared stack). Resample the series to an orthogonal grid first."
        )
    affine = np.eye(4)
    affine[:3, 0] = row_cos * spacings[0, 1]
    affine[:3, 1] = col_cos * spacings[0, 0]
    affine[:3, 2] = slice_vec
    affine[:3, 3] = positions[0]
    return order, affine


# ----------------------------------------------------------------------------- series


def read_dicom_series(folder: str | Path) -> DicomVolume:
    """Read the one image series in ``folder`` (non-recursive; non-DICOM files are ignored).

    A folder holding a single Enhanced multi-frame object or a single Siemens MOSAIC image is
    read as that object (see :func:`read_dicom_file`).

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
        pixel spacing; duplicate, missing or unevenly spaced slices; a sheared stack; several
        MOSAIC or multi-frame objects in one folder.
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
        return _read_object(datasets[0], Path(datasets[0].filename))
    if any(is_mosaic(ds) for ds in datasets):
        raise InputError(
            f"{folder} holds {len(datasets)} Siemens MOSAIC images: a 4D series (fMRI time "
            "points or DWI directions), one 3D volume per file. medcam explains one volume: "
            f"pass one file (e.g. {_name(datasets[0])}), or convert the series with dcm2niix."
        )
    multi = [ds for ds in datasets if is_enhanced(ds) or int(ds.get("NumberOfFrames", 1)) > 1]
    if multi:
        raise InputError(
            f"{folder} holds {len(multi)} multi-frame objects among {len(datasets)} files "
            f"(e.g. {_name(multi[0])}); medcam reads one multi-frame object or a series of "
            "single-frame slices. Pass the one file you want explained."
        )
    for ds in datasets:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise InputError(
                    f"{_name(ds)} has no {tag}; a 3D series needs it on every "
                    "slice. For 2D images (CR/DX) pass a single file instead of a folder."
                )
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise InputError(f"The slices in {folder} have different sizes (Rows, Columns): {sizes}.")
    order, affine = _stack_affine(
        str(folder),
        [_name(ds) for ds in datasets],
        np.array([_floats(ds.ImageOrientationPatient) for ds in datasets]),
        np.array([_floats(ds.ImagePositionPatient) for ds in datasets]),
        np.array([_floats(ds.PixelSpacing) for ds in datasets]),
    )
    datasets = [datasets[i] for i in order]
    array = np.stack([_modality_values(ds).T for ds in datasets], axis=-1)  # (X, Y, Z)
    return DicomVolume(array.astype(np.float32), affine, [_drop_pixels(ds) for ds in datasets])


def read_dicom_file(path: str | Path) -> DicomVolume:
    """Read one DICOM file: a 2D image, an Enhanced multi-frame volume or a Siemens MOSAIC.

    Returns
    -------
    DicomVolume
        2D image (CR, DX, one CT/MR slice): ``array: (X, Y)`` = (columns, rows) in modality
        units and ``affine_lps`` when the image has ImagePositionPatient/ImageOrientationPatient
        (else ``None``). Enhanced CT/MR/PET and MOSAIC: a 3D volume as from a series.
    """
    path = Path(path)
    ds = _read(path)
    if ds is None or "PixelData" not in ds:
        raise InputError(f"{path} is not a DICOM image file.")
    return _read_object(ds, path)


def _read_object(ds, path: Path) -> DicomVolume:
    if is_enhanced(ds):
        return _read_enhanced(ds, path)
    if is_mosaic(ds):
        return _read_mosaic(ds, path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        kind = getattr(ds.get("SOPClassUID"), "name", "multi-frame")
        raise InputError(
            f"{path} is a {kind} object with {frames} frames without per-frame geometry (e.g. "
            "a cine loop or a dose grid); medcam reads Enhanced CT/MR/PET multi-frame volumes, "
            "slice series and single 2D images. Convert it (e.g. with dcm2niix) to NIfTI."
        )
    return _read_2d(ds)


def _read_2d(ds) -> DicomVolume:
    pixels = _modality_values(ds)
    if pixels.ndim == 3:  # colour: (rows, cols, 3) -> keep luminance
        pixels = pixels.mean(axis=-1)
    affine = None
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "PixelSpacing" in ds:
        iop = _floats(ds.ImageOrientationPatient)
        sp = _floats(ds.PixelSpacing)
        affine = np.eye(4)
        affine[:3, 0] = iop[:3] * sp[1]
        affine[:3, 1] = iop[3:] * sp[0]
        affine[:3, 2] = np.cross(iop[:3], iop[3:]) * float(ds.get("SliceThickness", 1.0) or 1.0)
        affine[:3, 3] = _floats(ds.ImagePositionPatient)
    return DicomVolume(pixels.T.astype(np.float32), affine, [_drop_pixels(ds)], "2d")


# ----------------------------------------------------------------------------- enhanced


def _frame_item(shared, per_frame, sequence: str):
    """The first item of functional group ``sequence`` for a frame: per-frame, else shared."""
    for group in (per_frame, shared):
        if group is not None and sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def _read_enhanced(ds, path: Path) -> DicomVolume:
    sop = str(ds.get("SOPClassUID", ""))
    if sop not in ENHANCED_VOLUME_SOP_CLASSES:
        kind = getattr(ds.get("SOPClassUID"), "name", sop or "unknown SOP class")
        raise InputError(
            f"{path.name} is a {kind} object, not an image volume medcam explains (it reads "
            f"{', '.join(sorted(set(ENHANCED_VOLUME_SOP_CLASSES.values())))}, slice series and "
            "2D images)."
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{path.name} is a colour multi-frame image; medcam reads greyscale.")
    shared = (
        ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    )
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    n = len(groups)
    if n != int(ds.get("NumberOfFrames", n)):
        raise InputError(
            f"{path.name} declares {ds.NumberOfFrames} frames but has {n} per-frame functional "
            "group items; the file is damaged."
        )
    orientations, positions, spacings, slopes = [], [], [], []
    for f, group in enumerate(groups, start=1):
        orient = _frame_item(shared, group, "PlaneOrientationSequence")
        pos = _frame_item(shared, group, "PlanePositionSequence")
        measures = _frame_item(shared, group, "PixelMeasuresSequence")
        if orient is None or pos is None or measures is None or "PixelSpacing" not in measures:
            raise InputError(
                f"Frame {f} of {path.name} has no plane orientation, position or pixel spacing "
                "in its functional groups; without them its geometry is unknown."
            )
        orientations.append(_floats(orient.ImageOrientationPatient))
        positions.append(_floats(pos.ImagePositionPatient))
        spacings.append(_floats(measures.PixelSpacing))
        rescale = _frame_item(shared, group, "PixelValueTransformationSequence") or ds
        slopes.append(
            (float(rescale.get("RescaleSlope", 1.0)), float(rescale.get("RescaleIntercept", 0.0)))
        )
    positions_arr = np.array(positions)
    distinct = len(np.unique(np.round(positions_arr, 3), axis=0))
    if distinct < n:
        stacks = {
            str(_frame_item(None, g, "FrameContentSequence").get("StackID", ""))
            for g in groups
            if _frame_item(None, g, "FrameContentSequence") is not None
        }
        raise InputError(
            f"{path.name} holds {n} frames at {distinct} slice positions"
            + (f" in {len(stacks)} stacks" if len(stacks) > 1 else "")
            + " (several echoes, time points, diffusion directions or stacks); medcam explains "
            "one 3D volume. Split it into volumes (e.g. dcm2niix) and pass one as NIfTI."
        )
    where = path.name
    order, affine = _stack_affine(
        where,
        [f"frame {f}" for f in range(1, n + 1)],
        np.array(orientations),
        positions_arr,
        np.array(spacings),
    )
    pixels = _pixels(ds)
    if pixels.ndim == 2:
        pixels = pixels[None]
    values = np.empty((int(ds.Columns), int(ds.Rows), n), np.float32)  # (X, Y, Z)
    for z, f in enumerate(order):
        slope, intercept = slopes[f]
        values[:, :, z] = (pixels[f].astype(np.float64) * slope + intercept).T
    frames = [int(f) + 1 for f in order]
    return DicomVolume(values, affine, [_drop_pixels(ds)], "enhanced", frames)


# ----------------------------------------------------------------------------- mosaic


def _csa_image_header(ds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns that its readers are experimental
        from nibabel.nicom import csareader

    try:
        return csareader, csareader.get_csa_header(ds, "image")
    except csareader.CSAError:
        return csareader, None


def _read_mosaic(ds, path: Path) -> DicomVolume:
    csareader, csa = _csa_image_header(ds)
    n = csareader.get_n_mosaic(csa) if csa is not None else None
    if not n:
        raise InputError(
            f"{path.name} is a Siemens MOSAIC image (ImageType contains MOSAIC) but its CSA "
            "image header (0029,xx10) with NumberOfImagesInMosaic is missing (e.g. removed by "
            "anonymisation), so the tiles cannot be unpacked. Convert the original series with "
            "dcm2niix and pass the NIfTI."
        )
    n = int(n)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds:
            raise InputError(f"The MOSAIC image {path.name} has no {tag}; its geometry is unknown.")
    tiles = math.ceil(math.sqrt(n))
    big_rows, big_cols = int(ds.Rows), int(ds.Columns)
    if big_rows % tiles or big_cols % tiles:
        raise InputError(
            f"The MOSAIC image {path.name} is {big_rows}x{big_cols} pixels, which does not "
            f"split into {tiles}x{tiles} tiles for its {n} slices; the file is inconsistent."
        )
    rows, cols = big_rows // tiles, big_cols // tiles
    mosaic = _modality_values(ds)
    if mosaic.shape != (big_rows, big_cols):
        raise InputError(
            f"The pixel data of the MOSAIC image {path.name} has shape {mosaic.shape}, not "
            f"({big_rows}, {big_cols}); the file is damaged or truncated."
        )
    # tile t (row-major over the tile grid) is slice t
    stack = mosaic.reshape(tiles, rows, tiles, cols).transpose(0, 2, 1, 3).reshape(-1, rows, cols)
    stack = stack[:n]
    iop = _floats(ds.ImageOrientationPatient)
    row_cos, col_cos = iop[:3], iop[3:]
    row_spacing, col_spacing = _floats(ds.PixelSpacing)
    # ImagePositionPatient is the corner of a virtual big_rows x big_cols image centred on the
    # tiles; move it to the first voxel of a tile (nibabel MosaicWrapper.image_position)
    first = (
        _floats(ds.ImagePositionPatient)
        + col_cos * row_spacing * (big_rows - rows) / 2
        + row_cos * col_spacing * (big_cols - cols) / 2
    )
    normal = np.cross(row_cos, col_cos)
    csa_normal = csareader.get_slice_normal(csa)
    sign = 1.0
    if csa_normal is not None and np.all(np.isfinite(csa_normal)):
        dot = float(np.dot(np.asarray(csa_normal, float), normal))
        if abs(abs(dot) - 1.0) > 1e-3:
            raise InputError(
                f"The CSA SliceNormalVector of {path.name} is not perpendicular to its "
                "ImageOrientationPatient; the MOSAIC geometry is inconsistent."
            )
        sign = 1.0 if dot > 0 else -1.0
    step = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if not step or float(step) <= 0:
        raise InputError(
            f"The MOSAIC image {path.name} has neither SpacingBetweenSlices nor SliceThickness; "
            "its slice spacing is unknown."
        )
    step = float(step)
    values = np.ascontiguousarray(np.transpose(stack, (2, 1, 0)))  # (X, Y, Z) in tile order
    if sign < 0:  # tiles run against cross(row, col): store them ascending along it
        values = values[:, :, ::-1]
        first = first - (n - 1) * step * normal
    affine = np.eye(4)
    affine[:3, 0] = row_cos * col_spacing
    affine[:3, 1] = col_cos * row_spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = first
    return DicomVolume(values.astype(np.float32), affine, [_drop_pixels(ds)], "mosaic")
