"""Synthetic volumes defined in physical (patient) coordinates, and DICOM series built from them.

Used by the tests, the demo and the benchmarks: nothing is downloaded. Geometry follows DICOM:
a volume array is indexed ``(i, j, k)`` = (column, row, slice), ``row_cosines`` is the
direction in which the column index ``i`` grows, ``col_cosines`` that of the row index ``j``,
and slices are stacked along ``cross(row_cosines, col_cosines)``. World coordinates are LPS mm,
as in DICOM and ITK; ``Geometry.affine_ras`` gives the RAS affine MONAI and NIfTI use.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "Geometry",
    "blob_phantom",
    "rigid_motion",
    "rotation",
    "sphere_heatmap",
    "torso_phantom",
    "write_dicom_series",
    "write_enhanced_ct",
    "write_mosaic",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in LPS world space.

    Attributes
    ----------
    shape:
        ``(columns, rows, slices)``.
    spacing:
        ``(column spacing, row spacing, slice spacing)`` in mm.
    origin:
        LPS position (mm) of the centre of voxel ``(0, 0, 0)``.
    row_cosines, col_cosines:
        Unit vectors of ImageOrientationPatient (must be orthogonal).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    row_cosines: tuple[float, float, float] = (1.0, 0.0, 0.0)
    col_cosines: tuple[float, float, float] = (0.0, 1.0, 0.0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosines, self.col_cosines)

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 map from voxel index (i, j, k, 1) to LPS mm."""
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.row_cosines) * self.spacing[0]
        a[:3, 1] = np.asarray(self.col_cosines) * self.spacing[1]
        a[:3, 2] = self.normal * self.spacing[2]
        a[:3, 3] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 map from voxel index to RAS mm (NIfTI / MONAI convention)."""
        return LPS_TO_RAS @ self.affine_lps

    def world_points_lps(self) -> np.ndarray:
        """``(X, Y, Z, 3)`` LPS coordinates of every voxel centre."""
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), axis=-1)
        return idx @ self.affine_lps[:3, :3].T + self.affine_lps[:3, 3]

    def index_of(self, point_lps: Sequence[float]) -> np.ndarray:
        """Continuous voxel index of an LPS point."""
        return (np.linalg.inv(self.affine_lps) @ np.append(np.asarray(point_lps, float), 1.0))[:3]


def rotation(degrees_xyz: Sequence[float]) -> np.ndarray:
    """3x3 rotation matrix, rotations about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(degrees_xyz)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def blob_phantom(
    geometry: Geometry,
    blob_centre_lps: Sequence[float],
    blob_radius_mm: float = 10.0,
    *,
    body_radius_mm: float | None = None,
    body_hu: float = 40.0,
    blob_hu: float = 300.0,
    background_hu: float = -1000.0,
    noise_hu: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """CT-like volume ``(X, Y, Z)`` float32 in HU: air, a body cylinder, a bright sphere.

    The sphere's edge is smoothed over one voxel, so its intensity-weighted centroid sits at
    ``blob_centre_lps`` to well under a voxel on any grid.
    """
    pts = geometry.world_points_lps()
    vol = np.full(geometry.shape, background_hu, np.float32)
    centre = np.asarray(blob_centre_lps, float)
    if body_radius_mm is not None:
        centre_xy = pts[..., :2].reshape(-1, 2).mean(axis=0)
        r_xy = np.linalg.norm(pts[..., :2] - centre_xy, axis=-1)
        vol[r_xy <= body_radius_mm] = body_hu
    dist = np.linalg.norm(pts - centre, axis=-1)
    edge = min(geometry.spacing)
    weight = np.clip((blob_radius_mm + edge / 2 - dist) / edge, 0.0, 1.0)
    base = vol.copy()
    vol = base + weight.astype(np.float32) * (blob_hu - base)
    if noise_hu:
        vol += np.random.default_rng(seed).normal(0, noise_hu, vol.shape).astype(np.float32)
    return vol


@dataclass
class SeriesInfo:
    """Identity of a written series (for tests)."""

    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: list[str] = field(default_factory=list)


def write_dicom_series(
    volume_hu: np.ndarray,
    geometry: Geometry,
    folder: str | Path,
    *,
    modality: str = "CT",
    patient_id: str = "MEDCAM-PHANTOM",
    patient_name: str = "Phantom^Medcam",
    study_date: str = "20260101",
    series_description: str = "synthetic phantom",
    shuffle: bool = False,
    seed: int = 0,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    instance_numbers: Sequence[int] | None = None,
    rescale: tuple[float, float] = (1.0, -1024.0),
    body_part: str | None = "ABDOMEN",
    laterality: str | None = None,
) -> SeriesInfo:
    """Write ``volume_hu (X, Y, Z)`` as a single-frame CT/MR image series, one file per slice.

    Parameters
    ----------
    shuffle:
        Write the files in a random order with random names (InstanceNumber still follows the
        slice order unless ``instance_numbers`` says otherwise), to test readers that must sort
        by position.
    instance_numbers:
        Explicit InstanceNumber per slice (e.g. reversed, to catch InstanceNumber sorting).
    rescale:
        (RescaleSlope, RescaleIntercept) of the stored int16 values.
    body_part:
        BodyPartExamined (``None`` leaves it out).
    laterality:
        General Series Laterality (``"L"``/``"R"``); by default empty (unknown) for a paired
        or unnamed body part and absent for an unpaired one, as DICOM requires.

    The files pass ``dciodvfy`` (dicom3tools) without errors: decimal strings are formatted to
    at most 16 characters (ImageOrientationPatient is written with 16 significant characters,
    so it differs from ``geometry``'s cosines by < 1e-14), and the type 2 attributes a CT or MR
    image needs (PatientPosition, AcquisitionNumber, Laterality, MR sequence parameters) are
    present.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds as ds_str

    from medcam.io.dicom import series_laterality

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    slope, intercept = rescale
    stored = np.round((volume_hu - intercept) / slope).astype(np.int16)
    order = list(range(geometry.shape[2]))
    rng = random.Random(seed)
    names = [f"slice_{k:04d}.dcm" for k in order]
    if shuffle:
        names = [f"im_{rng.getrandbits(40):010x}.dcm" for _ in order]
        rng.shuffle(order)
    info = SeriesInfo(folder, [], study_uid, series_uid, for_uid)
    now = datetime.datetime(2026, 1, 1, 12, 0, 0)
    for k in order:
        ds = pydicom.Dataset()
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = for_uid, ""
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber = modality, 1
        ds.SeriesDescription = series_description
        ds.PatientPosition = "HFS"
        if body_part:
            ds.BodyPartExamined = body_part
        if laterality is not None:
            ds.Laterality = laterality
        elif series_laterality(ds) is not None:  # type 2C: absent for an unpaired part
            ds.Laterality = ""  # unknown
        ds.Manufacturer = "medcam synthetic"
        ds.InstanceNumber = int(instance_numbers[k]) if instance_numbers is not None else k + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.ImageOrientationPatient = [
            ds_str(float(v)) for v in (*geometry.row_cosines, *geometry.col_cosines)
        ]
        pos = geometry.affine_lps @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = [ds_str(round(float(v), 6)) for v in pos[:3]]
        ds.PixelSpacing = [ds_str(float(geometry.spacing[1])), ds_str(float(geometry.spacing[0]))]
        ds.SliceThickness = ds_str(float(geometry.spacing[2]))
        ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT" or (slope, intercept) != (1.0, 0.0):  # not in the MR Image IOD
            ds.RescaleSlope = ds_str(float(slope))
            ds.RescaleIntercept = ds_str(float(intercept))
        if modality == "CT":
            ds.RescaleType = "HU"
            ds.KVP = 120
            ds.WindowCenter, ds.WindowWidth = 40, 400  # soft tissue
        else:  # MR Image module, type 1/2 attributes
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "NONE", ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 8, 4, 1
        # pixel_array is (rows, columns) = volume[:, :, k].T
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        info.files.append(path)
        info.sop_uids.append(sop_uid)
    return info


def rigid_motion(degrees_xyz: Sequence[float], shift_mm: Sequence[float], centre_lps=(0, 0, 0)):
    """4x4 rigid motion in LPS: rotate about ``centre_lps`` (x, then y, then z), then shift."""
    m = np.eye(4)
    r = rotation(degrees_xyz)
    c = np.asarray(centre_lps, float)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(shift_mm, float)
    return m


def torso_phantom(
    geometry: Geometry,
    motion: np.ndarray | None = None,
    lesion_centre: Sequence[float] = (-45.0, -10.0, 15.0),
    lesion_radius_mm: float = 12.0,
    *,
    noise_hu: float = 10.0,
    seed: int = 0,
) -> np.ndarray:
    """CT-like torso ``(X, Y, Z)`` HU on ``geometry``, with the patient moved by ``motion``.

    Anatomy is defined in patient coordinates (LPS mm, origin at the body centre): an ellipsoid
    body ending above and below, a spine, a liver on the patient's right, two kidneys, a lung
    base and a lesion sphere in the liver. The patient is placed in the scanner by ``motion``
    (4x4, patient -> scanner world; identity for the baseline), so each visit can have its own
    grid, field of view and position, and the truth is known exactly.
    """
    pts = geometry.world_points_lps()
    if motion is not None:
        inv = np.linalg.inv(motion)
        pts = pts @ inv[:3, :3].T + inv[:3, 3]
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    edge = float(np.mean(geometry.spacing))  # partial-volume blur, as a scanner's PSF

    def soft(inside_distance):
        """Occupancy in [0, 1] from a signed distance (mm, positive inside)."""
        return np.clip(0.5 + inside_distance / edge, 0.0, 1.0).astype(np.float32)

    def ellipsoid(c, r):
        q = np.sqrt(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2)
        return soft((1.0 - q) * min(r))

    def paint(hu, weight, value):
        return hu + weight * (value - hu)

    body = ellipsoid((0, 0, 0), (150, 105, 170))
    hu = paint(np.full(geometry.shape, -1000.0, np.float32), body, 40.0)
    hu = paint(hu, ellipsoid((-60, -5, 55), (55, 60, 40)), -820.0)  # right lung base
    hu = paint(hu, ellipsoid((55, 0, 60), (45, 55, 35)), -850.0)  # left lung base
    hu = paint(hu, ellipsoid((-50, -15, -5), (65, 55, 55)), 65.0)  # liver (patient right)
    hu = paint(hu, ellipsoid((-55, 45, -60), (22, 18, 40)), 30.0)  # right kidney
    hu = paint(hu, ellipsoid((60, 45, -50), (22, 18, 40)), 30.0)  # left kidney
    spine = soft(16.0 - np.sqrt(x**2 + (y - 65) ** 2)) * soft(160.0 - np.abs(z))
    hu = paint(hu, spine, 600.0)
    hu = paint(np.full(geometry.shape, -1000.0, np.float32), body, 0.0) + body * hu
    c = np.asarray(lesion_centre, float)
    dist = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    hu = paint(hu, soft(lesion_radius_mm - dist), 150.0)
    if noise_hu:
        hu += np.random.default_rng(seed).normal(0, noise_hu, hu.shape).astype(np.float32)
    return hu.astype(np.float32)


def sphere_heatmap(
    geometry: Geometry,
    centre_patient: Sequence[float],
    radius_mm: float,
    motion: np.ndarray | None = None,
) -> np.ndarray:
    """A heatmap equal to 1 inside a sphere (edge smoothed over one voxel), 0 outside: stands in
    for a CAM that covers a lesion exactly, so volumes and centroids have known answers."""
    pts = geometry.world_points_lps()
    if motion is not None:
        inv = np.linalg.inv(motion)
        pts = pts @ inv[:3, :3].T + inv[:3, 3]
    dist = np.linalg.norm(pts - np.asarray(centre_patient, float), axis=-1)
    edge = min(geometry.spacing)
    return np.clip((radius_mm + edge / 2 - dist) / edge, 0, 1).astype(np.float32)


def write_enhanced_ct(
    volume_hu: np.ndarray,
    geometry: Geometry,
    path: str | Path,
    *,
    frame_order: Sequence[int] | None = None,
    **series_kwargs,
) -> Path:
    """Write ``volume_hu (X, Y, Z)`` as one multi-frame CT object (Legacy Converted Enhanced CT).

    The slices are written as a single-frame series (:func:`write_dicom_series`, which takes
    ``series_kwargs``), converted by highdicom to one object with per-frame functional groups
    (PlanePositionSequence per frame; orientation, pixel measures and rescale shared), and
    stored with frame ``f`` (1-based) holding slice ``frame_order[f - 1]`` (default: highdicom's
    order). Returns the file's path.
    """
    import tempfile

    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        info = write_dicom_series(volume_hu, geometry, tmp, **series_kwargs)
        slices = [pydicom.dcmread(f) for f in info.files]
        enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
            slices, generate_uid(), 2, generate_uid(), 1
        )
    if frame_order is not None:
        # which slice each of highdicom's frames holds, by position along the normal
        normal = geometry.normal
        origin = np.asarray(geometry.origin, float)
        spacing = geometry.spacing[2]
        groups = list(enhanced.PerFrameFunctionalGroupsSequence)
        slice_of = [
            round(
                float(np.dot(np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, float)
                             - origin, normal)) / spacing
            )
            for g in groups
        ]  # fmt: skip
        frame_of_slice = {k: i for i, k in enumerate(slice_of)}
        order = [frame_of_slice[int(k)] for k in frame_order]
        pixels = enhanced.pixel_array
        enhanced.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]
        for new, group in enumerate(enhanced.PerFrameFunctionalGroupsSequence, start=1):
            group.FrameContentSequence[0].InStackPositionNumber = new
        enhanced.PixelData = np.ascontiguousarray(pixels[order]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(path)
    return path


def _csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA2 ("SV10") header with ``{name: (vr, [values])}``, as nibabel reads it."""
    import struct

    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, values) in tags.items():
        out.append(
            struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 3, len(values), 77)
        )
        for value in values:
            data = value.encode() + b"\x00"
            out.append(struct.pack("<4i", len(data), len(data), 77, len(data)))
            out.append(data + b"\x00" * (-len(data) % 4))
    return b"".join(out)


def write_mosaic(
    volume: np.ndarray,
    geometry: Geometry,
    path: str | Path,
    *,
    reverse_tiles: bool = False,
    csa: bool = True,
    seed: int = 0,
) -> Path:
    """Write ``volume (X, Y, Z)`` as one Siemens MOSAIC MR image (fMRI/DWI style).

    The ``Z`` slices are tiled row-major into a square grid of ``ceil(sqrt(Z))`` tiles per side
    (unused tiles zero). As Siemens scanners do, ImageType contains ``MOSAIC``,
    ImagePositionPatient is the corner of a virtual image the size of the whole mosaic centred
    on the tiles, and the private CSA image header (0029,1010) holds NumberOfImagesInMosaic and
    SliceNormalVector. ``reverse_tiles`` stores the slices in descending order along
    ``geometry.normal`` (tile 0 = the last slice) with the CSA normal pointing the other way;
    ``csa=False`` leaves the CSA header out (as some anonymisers do). Values are stored as
    uint16 (rounded). Returns the file's path.
    """
    import math

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds as ds_str

    cols, rows, n = geometry.shape
    tiles = math.ceil(math.sqrt(n))
    order = list(range(n))[::-1] if reverse_tiles else list(range(n))
    mosaic = np.zeros((tiles * rows, tiles * cols), np.uint16)
    for t, k in enumerate(order):
        i, j = divmod(t, tiles)
        mosaic[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = np.round(volume[:, :, k].T)
    row_cos, col_cos = np.asarray(geometry.row_cosines), np.asarray(geometry.col_cosines)
    col_spacing, row_spacing = geometry.spacing[0], geometry.spacing[1]
    first = geometry.affine_lps @ np.array([0.0, 0.0, order[0], 1.0])
    corner = (
        first[:3]
        - col_cos * row_spacing * (tiles * rows - rows) / 2
        - row_cos * col_spacing * (tiles * cols - cols) / 2
    )
    normal = geometry.normal * (-1.0 if reverse_tiles else 1.0)
    ds = pydicom.Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Mosaic^Test",
        "MOSAIC",
        "",
        "O",
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = generate_uid(), ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = "MR", 1, 1, 1
    ds.Manufacturer = "SIEMENS"
    ds.PatientPosition, ds.BodyPartExamined = "HFS", "BRAIN"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "EP", "SK", "FS"
    ds.MRAcquisitionType, ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "2D", 3000, 30, 1
    ds.ImageOrientationPatient = [ds_str(float(v)) for v in (*row_cos, *col_cos)]
    ds.ImagePositionPatient = [ds_str(round(float(v), 6)) for v in corner]
    ds.PixelSpacing = [ds_str(float(row_spacing)), ds_str(float(col_spacing))]
    ds.SliceThickness = ds.SpacingBetweenSlices = ds_str(float(geometry.spacing[2]))
    ds.Rows, ds.Columns = mosaic.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = mosaic.tobytes()
    if csa:
        header = _csa2(
            {
                "NumberOfImagesInMosaic": ("US", [str(n)]),
                "AcquisitionMatrixText": ("SH", [f"{rows}p*{cols}"]),
                "SliceNormalVector": ("FD", [repr(float(v)) for v in normal]),
            }
        )
        ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", header)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
