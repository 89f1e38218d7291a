"""DICOM Parametric Map of a heatmap on the source series' grid (OHIF, 3D Slicer via dcmqi)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcam.writers.dicom_common import (
    DicomIdentity,
    frames_from_volume,
    method_code,
    require_dicom_series,
    sort_frames_along_normal,
    uid_seed_for,
)
from medcam.writers.registry import CaseOutput, register_format

__all__ = ["build_parametric_map", "write_parametric_maps"]


def build_parametric_map(
    heatmap: np.ndarray,
    scan,
    *,
    method: str,
    label: str,
    identity: DicomIdentity,
    description: str = "",
):
    """A float32 Parametric Map of ``heatmap (X, Y, Z)`` on ``scan``'s DICOM series.

    Real values are stored directly (slope 1, intercept 0: OHIF ignores the Real World Value
    Mapping, Slicer reads it), with the mapping's quantity set to the DICOM code for the method
    (DCM 130403 Gradient-weighted class activation, 130402 Class activation, 130404
    Saliency). Study, patient and frame of reference are the source's; series and instance
    are new; every frame references its source slice (SOP instance, and frame number for an
    Enhanced multi-frame source).

    What the viewers need (checked in tests against dcmqi, 3D Slicer's loader, and
    ``@cornerstonejs/adapters``, OHIF's loader): a FrameAnatomySequence in the shared functional
    groups (dcmqi crashes without it); frames ordered ascending along the slice normal (dcmqi
    puts frame k on slice k from the lowest position; OHIF copies frame k onto slice k of its
    volume, sorted the same way); ImageOrientationPatient and every ImagePositionPatient
    written as the source's exact values (OHIF's Parametric Map loader compares orientations
    for equality). The window is the map's range with VOI LUT function ``LINEAR_EXACT``
    (DICOM requires it for a window width below 1).
    """
    import highdicom as hd
    from pydicom import Dataset
    from pydicom.sr.codedict import codes

    from medcam.writers.dicom_common import copy_source_geometry, frames_for_source, source_images

    require_dicom_series(scan, "DICOM Parametric Map")
    frames = frames_for_source(frames_from_volume(np.asarray(heatmap, dtype=np.float32)), scan)
    lo, hi = float(frames.min()), float(frames.max())
    if hi <= lo:
        hi = lo + 1.0
    code = method_code(method)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=method[:16],
        lut_explanation=f"{code.meaning} ({label})"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(lo, hi),
        intercept=0.0,
        slope=1.0,
        quantity_definition=code,
    )
    pm = hd.pm.ParametricMap(
        source_images=source_images(scan),
        pixel_array=frames,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=(lo + hi) / 2,
                window_width=hi - lo,
                voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
            )
        ],
        content_label="HEATMAP",
        content_description=(description or f"medcam {method} {label}")[:64],
        content_creator_name="medcam^",
        **identity.highdicom_kwargs(),
    )
    pm.SeriesDescription = (description or f"medcam {method} {label}")[:64]
    anatomy = Dataset()
    anatomy.FrameLaterality = "U"
    anatomy.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.SCT.EntireBody)]
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    copy_source_geometry(pm, scan)
    sort_frames_along_normal(pm)
    return pm


@register_format("dicom-pm", needs="dicom-series", order=20,
                 description="DICOM Parametric Map on the source series")  # fmt: skip
def write_parametric_maps(out: CaseOutput) -> list[Path]:
    """One float32 Parametric Map ``<base>_pm.dcm`` per map, in the source's study."""
    paths = []
    for k, label in enumerate(out.labels):
        seed = uid_seed_for(out.options, "dicom-pm", k)
        identity = DicomIdentity.new(out.series_number(k, 1), seed=seed)
        pm = build_parametric_map(out.heat[k], out.scan, method=out.method, label=label,
                                  identity=identity)  # fmt: skip
        paths.append(out.folder.write_file(f"{out.base(k)}_pm.dcm", lambda p, d=pm: d.save_as(p)))
    return paths
