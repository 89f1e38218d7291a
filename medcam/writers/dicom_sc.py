"""DICOM Secondary Capture: the heatmap burned into RGB pictures of the source images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcam.errors import MedcamError
from medcam.writers.dicom_common import DicomIdentity, derived_uid, uid_seed_for
from medcam.writers.figures import blend_rgb, window
from medcam.writers.registry import CaseOutput, register_format

__all__ = ["build_secondary_captures", "write_secondary_captures"]

_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def _direction_letters(v) -> str:
    """Patient-orientation letter of an LPS direction's strongest axis (highdicom takes one)."""
    v = np.asarray(v, float)
    axis = int(np.argmax(np.abs(v)))
    return _LETTERS[axis][0 if v[axis] > 0 else 1]


def _patient_orientation(iop, ds) -> tuple[str, str]:
    """Row and column directions as DICOM PatientOrientation letters."""
    if iop is not None:
        iop = [float(v) for v in iop]
        return _direction_letters(iop[:3]), _direction_letters(iop[3:])
    if "PatientOrientation" in ds and len(ds.PatientOrientation) == 2:
        return str(ds.PatientOrientation[0]), str(ds.PatientOrientation[1])
    return "L", "F"  # unknown; DICOM requires a value (the usual PA chest convention)


def _plane(ds, frame: int | None, sequence: str, keyword: str):
    """``keyword`` of a source plane: from the image, or its frame's functional groups."""
    if frame is None:
        return ds.get(keyword)
    for group in (
        ds.PerFrameFunctionalGroupsSequence[frame - 1],
        *(ds.get("SharedFunctionalGroupsSequence") or []),
    ):
        if sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
            return group[sequence][0].get(keyword)
    return None


def _source_reference(ds, frame: int | None):
    """A SourceImageSequence item: the image (and frame) this capture was made from."""
    import highdicom as hd
    from pydicom import Dataset
    from pydicom.sr.codedict import codes

    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item


def build_secondary_captures(
    image: np.ndarray,
    heatmap: np.ndarray,
    scan,
    *,
    label: str,
    method: str,
    series_number: int,
    alpha: float = 0.4,
    uid_seed: str | None = None,
) -> list:
    """One RGB Secondary Capture per source image, heatmap blended over the image.

    ``image`` and ``heatmap`` are ``(X, Y)`` or ``(X, Y, Z)`` on the source grid. All images share
    one new series in the source's study; ``BurnedInAnnotation`` is YES. This is the DICOM output
    every viewer shows, and the only one for 2D radiographs without a frame of reference.

    Each capture references the image (and frame, for an Enhanced multi-frame source) it was
    made from in SourceImageSequence, keeps the source's BodyPartExamined and Laterality, and
    carries every type 2 attribute of the Secondary Capture IOD (dciodvfy-clean). A Siemens
    MOSAIC gives one capture per unpacked slice, each referencing the one mosaic image.

    With ``uid_seed``, the series and instance UIDs derive from it (the same seed gives the same
    UIDs, so a retried store keeps one copy); by default they are new.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from medcam.io.dicom import series_laterality

    if not scan.datasets:
        raise MedcamError(
            "A DICOM Secondary Capture needs a DICOM source (it joins the source's study); "
            f"this scan is {scan.kind!r}. Use the PNG figures instead."
        )
    img = np.asarray(image, np.float32)
    heat = np.asarray(heatmap, np.float32)
    if img.ndim == 2:
        img, heat = img[..., None], heat[..., None]
    sources = scan.slice_sources
    ref, ref_frame = sources[0]
    center = _plane(ref, ref_frame, "FrameVOILUTSequence", "WindowCenter")
    width = _plane(ref, ref_frame, "FrameVOILUTSequence", "WindowWidth")
    if center is not None and width is not None:
        c = float(np.atleast_1d(center)[0])
        w = float(np.atleast_1d(width)[0])
        gray = window(img, c - w / 2, c + w / 2)
    else:
        gray = window(img)
    vmax = float(heat.max())
    series_uid = derived_uid(uid_seed, "series") if uid_seed is not None else generate_uid()
    out = []
    for k, (ds, frame) in enumerate(sources):
        rgb = blend_rgb(gray[:, :, k].T, heat[:, :, k].T, vmax, alpha)
        sop_uid = derived_uid(uid_seed, "instance", str(k)) if uid_seed is not None else None
        identity = DicomIdentity(series_uid, sop_uid or generate_uid(), series_number, k + 1)
        kwargs = identity.highdicom_kwargs()
        for key in ("manufacturer_model_name", "software_versions", "device_serial_number"):
            kwargs.pop(key)
        spacing = _plane(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
        iop = _plane(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ds,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
            patient_orientation=_patient_orientation(iop, ds),
            **kwargs,
        )
        sc.BurnedInAnnotation = "YES"
        sc.SeriesDescription = f"medcam {method} {label} overlay"[:64]
        what = f"{method} heatmap ({label}) blended over the source image"
        sc.ImageComments = what
        sc.DerivationDescription = f"medcam {what}"[:1024]
        sc.SourceImageSequence = [_source_reference(ds, frame)]
        if "BodyPartExamined" in ds:
            sc.BodyPartExamined = ds.BodyPartExamined
        # General Series Laterality is type 2C: copied when the source has it; else present
        # and empty (unknown), or absent when the body part is an unpaired one
        laterality = series_laterality(ds)
        if laterality is not None:
            sc.Laterality = laterality
        out.append(sc)
    return out


@register_format("dicom-sc", needs="dicom", order=40,
                 description="DICOM Secondary Capture pictures, heatmap burned in")  # fmt: skip
def write_secondary_captures(out: CaseOutput) -> list[Path]:
    """One folder ``<base>_sc/`` per map holding one RGB Secondary Capture per source image."""
    paths = []
    for k, label in enumerate(out.labels):
        images = build_secondary_captures(
            out.image,
            out.heat[k],
            out.scan,
            label=label,
            method=out.method,
            series_number=out.series_number(k, 3),
            alpha=float(out.options.get("alpha", 0.4)),
            uid_seed=uid_seed_for(out.options, "dicom-sc", k),
        )
        folder = out.folder.target(f"{out.base(k)}_sc")
        folder.mkdir()
        for i, sc in enumerate(images):
            sc.save_as(folder / f"sc_{i + 1:04d}.dcm")
        paths.append(folder)
    return paths
