"""What every medcam DICOM output shares: source checks, identity, codes, frame order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medcam import __version__
from medcam.errors import MedcamError

__all__ = ["DicomIdentity", "derived_uid", "method_code", "require_dicom_series", "uid_seed_for"]

MANUFACTURER = "medcam"
MODEL_NAME = "medcam-monai"
SERIAL = "0"


def method_code(method: str):
    """DICOM code (CID 217) naming the kind of map a method makes."""
    from pydicom.sr.codedict import codes

    if method == "cam":
        return codes.DCM.ClassActivation
    if method.startswith("gradcam") or method in ("hirescam", "xgradcam", "layercam"):
        return codes.DCM.GradientWeightedClassActivation
    return codes.DCM.Saliency


@dataclass
class DicomIdentity:
    """New series identity for one derived object; study and frame of reference are kept."""

    series_uid: str
    sop_uid: str
    series_number: int
    instance_number: int = 1

    @classmethod
    def new(cls, series_number: int, seed: str | None = None) -> DicomIdentity:
        """New random UIDs, or with ``seed`` UIDs derived from it (:func:`derived_uid`)."""
        from pydicom.uid import generate_uid

        if seed is not None:
            return cls(derived_uid(seed, "series"), derived_uid(seed, "instance"), series_number)
        return cls(generate_uid(), generate_uid(), series_number)

    def highdicom_kwargs(self) -> dict:
        return {
            "series_instance_uid": self.series_uid,
            "series_number": self.series_number,
            "sop_instance_uid": self.sop_uid,
            "instance_number": self.instance_number,
            "manufacturer": MANUFACTURER,
            "manufacturer_model_name": MODEL_NAME,
            "software_versions": __version__,
            "device_serial_number": SERIAL,
        }


def derived_uid(seed: str, *parts: str) -> str:
    """A UID that depends only on ``seed`` and ``parts`` (pydicom's root + a hash of them).

    With a seed made from the source instances, the model weights and the settings, a retried
    store or a restarted listener sends the same UIDs again, so a PACS keeps one copy.
    """
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[seed, *parts])


def uid_seed_for(options: dict, fmt: str, k: int) -> str | None:
    """The seed for map ``k`` of format ``fmt`` when the case has ``options["uid_seed"]``."""
    seed = options.get("uid_seed")
    return None if seed is None else f"{seed}/{fmt}/{k}"


def require_dicom_series(scan, what: str) -> None:
    """Raise unless ``scan`` is a DICOM series with a frame of reference."""
    if scan.kind != "dicom-series":
        raise MedcamError(
            f"A {what} is written on a DICOM source series, but this scan is {scan.kind!r}. "
            "Write NIfTI for NIfTI sources, or a Secondary Capture (dicom-sc) for 2D images."
        )
    if not scan.has_frame_of_reference:
        raise MedcamError(
            f"The source series has no FrameOfReferenceUID, so a {what} cannot be placed on "
            "it; write a Secondary Capture (dicom-sc) instead."
        )


def frames_from_volume(volume: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` on the source grid -> ``(Z, rows, columns)`` frames, one per source slice."""
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))


def sort_frames_along_normal(ds) -> None:
    """Reorder a multi-frame object's frames ascending along the slice normal, in place.

    dcmqi (3D Slicer's DICOM Parametric Map / SEG loader) puts frame k at slice k counted from
    the lowest position along cross(row, column cosines), so frames in another order load
    flipped. Pixel data, per-frame functional groups and DimensionIndexValues move together.
    """
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient], float
    )
    normal = np.cross(iop[:3], iop[3:])
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    dist = [
        float(np.dot(np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, float), normal))
        for g in groups
    ]
    order = np.argsort(dist, kind="stable")
    if (order == np.arange(len(order))).all():
        return
    _reorder_pixel_frames(ds, order)
    ds.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]
    position_dims = [
        d
        for d, item in enumerate(ds.DimensionIndexSequence)
        if item.DimensionIndexPointer == 0x00200032  # ImagePositionPatient
    ]
    for new, g in enumerate(ds.PerFrameFunctionalGroupsSequence):
        content = g.FrameContentSequence[0]
        values = list(np.atleast_1d(content.DimensionIndexValues))
        for d in position_dims:
            values[d] = new + 1
        values = [int(v) for v in values]
        content.DimensionIndexValues = values if len(values) > 1 else values[0]


def _reorder_pixel_frames(ds, order: np.ndarray) -> None:
    n, pixels = len(order), int(ds.Rows) * int(ds.Columns)
    if "FloatPixelData" in ds:
        frames = np.frombuffer(ds.FloatPixelData, "<f4").reshape(n, pixels)
        ds.FloatPixelData = frames[order].tobytes()
    elif int(ds.BitsAllocated) == 1:  # bit-packed across frame boundaries
        bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")
        frames = bits[: n * pixels].reshape(n, pixels)
        packed = np.packbits(frames[order].reshape(-1), bitorder="little").tobytes()
        ds.PixelData = packed + b"\x00" * (len(packed) % 2)
    else:
        dtype = {8: np.uint8, 16: "<u2", 32: "<u4"}[int(ds.BitsAllocated)]
        frames = np.frombuffer(ds.PixelData, dtype).reshape(n, -1)
        ds.PixelData = frames[order].tobytes()
