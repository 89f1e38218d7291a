"""DICOM Segmentation of a thresholded heatmap: "where the model looked" as a mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcam import __version__
from medcam.errors import MedcamError
from medcam.writers.dicom_common import (
    DicomIdentity,
    frames_from_volume,
    method_code,
    require_dicom_series,
    sort_frames_along_normal,
    uid_seed_for,
)
from medcam.writers.registry import CaseOutput, register_format

__all__ = ["build_segmentation", "write_segmentations"]


def build_segmentation(
    heatmap: np.ndarray,
    scan,
    *,
    threshold: float,
    label: str,
    method: str,
    identity: DicomIdentity,
    fractional: bool = False,
):
    """A DICOM SEG of ``heatmap (X, Y, Z) >= threshold`` on ``scan``'s series.

    Parameters
    ----------
    threshold:
        In the heatmap's units (raw, or [0, 1] after normalisation).
    fractional:
        Write a FRACTIONAL (probability) segment of ``heatmap / max`` instead of a BINARY mask
        of the thresholded map (Weasis and Slicer show it; OHIF rejects fractional SEGs).

    Every frame is written (no empty-frame omission), ordered ascending along the slice normal,
    so dcmqi's ``segimage2itkimage`` (3D Slicer) places the mask on the source grid; every frame
    references its source slice (and frame number, for an Enhanced multi-frame source), with
    the source's exact orientation and position values, as OHIF's loader matches them.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medcam.writers.dicom_common import copy_source_geometry, frames_for_source, source_images

    require_dicom_series(scan, "DICOM SEG")
    heat = np.asarray(heatmap, dtype=np.float32)
    if fractional:
        peak = float(heat.max())
        if peak <= 0:
            raise MedcamError("The heatmap is all zero; a fractional SEG would be empty.")
        pixels = np.clip(heat / peak, 0.0, 1.0)
    else:
        pixels = (heat >= threshold).astype(np.uint8)
    frames = frames_for_source(frames_from_volume(pixels), scan)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medcam {method}", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=f"{method} {label}"[:64],
        segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
        segmented_property_type=method_code(method),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor(53.2, 80.1, 67.2),  # red
    )
    kind = "FRACTIONAL" if fractional else "BINARY"
    seg = hd.seg.Segmentation(
        source_images=source_images(scan),
        pixel_array=frames,
        segmentation_type=kind,
        segment_descriptions=[segment],
        omit_empty_frames=False,
        content_label="HEATMAP",
        content_description=f"medcam {method} {label} >= {threshold:g}"[:64]
        if not fractional
        else f"medcam {method} {label} fraction of peak"[:64],
        content_creator_name="medcam^",
        **identity.highdicom_kwargs(),
    )
    seg.SeriesDescription = f"medcam {method} {label} {kind.lower()}"[:64]
    copy_source_geometry(seg, scan)
    sort_frames_along_normal(seg)
    return seg


@register_format("dicom-seg", needs="dicom-series", order=30,
                 description="DICOM SEG of the thresholded map on the source series")  # fmt: skip
def write_segmentations(out: CaseOutput) -> list[Path]:
    """One SEG ``<base>_seg.dcm`` per map: voxels at or above ``seg_threshold`` x the map's
    peak (BINARY), or ``map / peak`` (FRACTIONAL with ``fractional_seg``)."""
    paths = []
    fraction = float(out.options.get("seg_threshold", 0.5))
    for k, label in enumerate(out.labels):
        h = out.heat[k]
        peak = float(h.max())
        seg = build_segmentation(
            h,
            out.scan,
            threshold=fraction * peak if peak > 0 else 1.0,
            label=label,
            method=out.method,
            fractional=bool(out.options.get("fractional_seg", False)),
            identity=DicomIdentity.new(
                out.series_number(k, 2), seed=uid_seed_for(out.options, "dicom-seg", k)
            ),
        )
        paths.append(out.folder.write_file(f"{out.base(k)}_seg.dcm", lambda p, d=seg: d.save_as(p)))
    return paths
