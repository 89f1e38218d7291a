"""What every medcam DICOM output shares: source checks, identity, codes, frame order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medcam import __version__
from medcam.errors import MedcamError

__all__ = [
    "DicomIdentity",
    "complete_type2",
    "copy_source_geometry",
    "derived_uid",
    "frames_for_source",
    "method_code",
    "require_dicom_series",
    "source_images",
    "uid_seed_for",
]

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
    """Raise unless ``scan`` is a DICOM volume a derived object can reference slice by slice.

    That is a series of single-frame slices or an Enhanced multi-frame object, with a frame of
    reference. A Siemens MOSAIC is refused: viewers show it as tiled 2D images, so a map
    referencing its slices cannot be overlaid anywhere.
    """
    if scan.kind == "dicom-mosaic":
        raise MedcamError(
            f"The source is a Siemens MOSAIC image: DICOM viewers show it as one tiled 2D image, "
            f"so a {what} referencing its slices cannot be overlaid on it. Write NIfTI (the "
            "unpacked volume's geometry) and view it over the series converted with dcm2niix."
        )
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


def frames_for_source(frames: np.ndarray, scan) -> np.ndarray:
    """Frames in slice order -> the order highdicom pairs them with the source planes.

    A series is already in slice order (``scan.datasets``); an Enhanced object's planes are its
    frames in frame-number order, which need not be the slice order.
    """
    if getattr(scan, "source_frames", None) is None:
        return frames
    out = np.empty_like(frames)
    out[np.asarray(scan.source_frames) - 1] = frames
    return out


# Type 2 attributes of the patient and study modules that highdicom copies from the source (it
# reads them unconditionally); a source may lack them (anonymised series, some scanners).
PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip


def complete_type2(datasets: list) -> list:
    """``datasets`` where each one missing a :data:`PATIENT_STUDY_TYPE2` attribute is replaced by
    a shallow copy holding it empty (type 2: present, value unknown); the sources are unchanged."""
    from pydicom import Dataset

    out = []
    for ds in datasets:
        missing = [k for k in PATIENT_STUDY_TYPE2 if k not in ds]
        if missing:
            copy = Dataset()
            copy.update(ds)  # shares the element objects, pixel data is not copied
            copy.file_meta = getattr(ds, "file_meta", Dataset())
            for k in missing:
                setattr(copy, k, "")
            ds = copy
        out.append(ds)
    return out


def source_images(scan) -> list:
    """The source datasets to hand highdicom as ``source_images``.

    Missing type 2 patient/study attributes are added empty (:func:`complete_type2`).

    highdicom reads an Enhanced source's orientation and pixel spacing from the shared
    functional groups only; some scanners (Philips) put them in every per-frame group. Such a
    source is handed over as a metadata copy with frame 1's PlaneOrientationSequence and
    PixelMeasuresSequence moved to the shared group (the reader has checked that all frames
    share one orientation and pixel spacing). SOP instance and frame numbers are unchanged, so
    the references are to the real source.
    """
    if getattr(scan, "source_frames", None) is None:
        return complete_type2(list(scan.datasets))
    ds = complete_type2(scan.datasets[:1])[0]
    moved = ("PlaneOrientationSequence", "PixelMeasuresSequence")
    shared = (
        ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    )
    if shared is not None and all(seq in shared for seq in moved):
        return [ds]
    from pydicom import Dataset

    def without(group, keywords) -> Dataset:  # a new item sharing the element objects
        item = Dataset()
        for elem in group:
            if elem.keyword not in keywords:
                item.add(elem)
        return item

    first = ds.PerFrameFunctionalGroupsSequence[0]
    lift = [seq for seq in moved if seq in first and (shared is None or seq not in shared)]
    meta = without(ds, ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"))
    new_shared = without(shared, ()) if shared is not None else Dataset()
    for seq in lift:
        new_shared[seq] = first[seq]
    meta.SharedFunctionalGroupsSequence = [new_shared]
    meta.PerFrameFunctionalGroupsSequence = [
        without(group, lift) for group in ds.PerFrameFunctionalGroupsSequence
    ]
    return [meta]


def _item(ds, frame: int | None, sequence: str):
    """A functional-group item of a source plane: per-frame for ``frame``, else shared."""
    if frame is None:
        return ds
    groups = [ds.PerFrameFunctionalGroupsSequence[frame - 1]]
    if "SharedFunctionalGroupsSequence" in ds:
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        if sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def _exact(values) -> list:
    """DS values as the source wrote them (when valid DS), so a viewer comparing numbers finds
    them equal; values longer than DICOM's 16 characters are re-formatted to fit."""
    from pydicom.valuerep import format_number_as_ds

    out = []
    for v in values:
        text = getattr(v, "original_string", None)
        if not isinstance(text, str):
            text = str(v)
        text = text.strip()
        out.append(text if 0 < len(text) <= 16 else format_number_as_ds(float(v)))
    return out


def copy_source_geometry(ds, scan) -> None:
    """Write ``ds``'s plane orientation, pixel spacing and per-frame positions as the exact
    values of the source planes each frame references.

    highdicom re-formats the source's decimal strings; a viewer that compares the derived
    object's ImageOrientationPatient with the source's for equality (OHIF's Parametric Map
    loader) then sees a difference of ~1e-14 and refuses the map as oblique. Copying the
    source's strings makes the numbers identical. Every frame keeps the plane it references.
    """
    planes = {}
    for src, frame in scan.slice_sources:
        planes[(str(src.SOPInstanceUID), frame)] = (src, frame)
    src0, frame0 = scan.slice_sources[0]
    orient = _item(src0, frame0, "PlaneOrientationSequence")
    measures = _item(src0, frame0, "PixelMeasuresSequence")
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = _exact(
        orient.ImageOrientationPatient
    )
    if measures is not None and "PixelSpacing" in measures:
        shared.PixelMeasuresSequence[0].PixelSpacing = _exact(measures.PixelSpacing)
    for group in ds.PerFrameFunctionalGroupsSequence:
        if "DerivationImageSequence" not in group or "PlanePositionSequence" not in group:
            continue  # no per-frame source reference: keep highdicom's position
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        key = (str(ref.ReferencedSOPInstanceUID), frame)
        if key not in planes:
            continue
        src, frame = planes[key]
        position = _item(src, frame, "PlanePositionSequence")
        group.PlanePositionSequence[0].ImagePositionPatient = _exact(position.ImagePositionPatient)


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
