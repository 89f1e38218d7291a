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


def _patient_orientation(ds) -> tuple[str, str]:
    """Row and column directions as DICOM PatientOrientation letters."""
    if "ImageOrientationPatient" in ds:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        return _direction_letters(iop[:3]), _direction_letters(iop[3:])
    if "PatientOrientation" in ds and len(ds.PatientOrientation) == 2:
        return str(ds.PatientOrientation[0]), str(ds.PatientOrientation[1])
    return "L", "F"  # unknown; DICOM requires a value (the usual PA chest convention)


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
    With ``uid_seed``, the series and instance UIDs derive from it (the same seed gives the same
    UIDs, so a retried store keeps one copy); by default they are new.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    if not scan.datasets:
        raise MedcamError(
            "A DICOM Secondary Capture needs a DICOM source (it joins the source's study); "
            f"this scan is {scan.kind!r}. Use the PNG figures instead."
        )
    img = np.asarray(image, np.float32)
    heat = np.asarray(heatmap, np.float32)
    if img.ndim == 2:
        img, heat = img[..., None], heat[..., None]
    ref = scan.datasets[0]
    if "WindowCenter" in ref and "WindowWidth" in ref:
        c = float(np.atleast_1d(ref.WindowCenter)[0])
        w = float(np.atleast_1d(ref.WindowWidth)[0])
        gray = window(img, c - w / 2, c + w / 2)
    else:
        gray = window(img)
    vmax = float(heat.max())
    series_uid = derived_uid(uid_seed, "series") if uid_seed is not None else generate_uid()
    out = []
    for k, ds in enumerate(scan.datasets):
        rgb = blend_rgb(gray[:, :, k].T, heat[:, :, k].T, vmax, alpha)
        sop_uid = derived_uid(uid_seed, "instance", str(k)) if uid_seed is not None else None
        identity = DicomIdentity(series_uid, sop_uid or generate_uid(), series_number, k + 1)
        kwargs = identity.highdicom_kwargs()
        for key in ("manufacturer_model_name", "software_versions", "device_serial_number"):
            kwargs.pop(key)
        spacing = ds.get("PixelSpacing")
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ds,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
            patient_orientation=_patient_orientation(ds),
            **kwargs,
        )
        sc.BurnedInAnnotation = "YES"
        sc.SeriesDescription = f"medcam {method} {label} overlay"[:64]
        sc.ImageComments = f"{method} heatmap ({label}) blended over the source image"[:10240]
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
