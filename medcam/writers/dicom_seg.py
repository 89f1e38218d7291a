"""DICOM Segmentation of a thresholded heatmap: "where the model looked" as a mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcam import __version__
from medcam.errors import MedcamError
from medcam.writers.dicom_common import (
    DicomIdentity,
    FramePixels,
    attach_pixels,
    file_frame_slices,
    header_only,
    method_code,
    require_dicom_series,
    sort_frames_along_normal,
    uid_seed_for,
    volume_frames,
    write_dataset,
)
from medcam.writers.registry import CaseOutput, register_format

__all__ = ["build_segmentation", "write_segmentations"]

#: MaximumFractionalValue of a FRACTIONAL SEG (highdicom's default, 8 bits).
MAX_FRACTIONAL = 255


def build_segmentation(
    heatmap: np.ndarray,
    scan,
    *,
    threshold: float,
    label: str,
    method: str,
    identity: DicomIdentity,
    fractional: bool = False,
    peak: float | None = None,
    stream: bool = False,
):
    """A DICOM SEG of ``heatmap (X, Y, Z) >= threshold`` on ``scan``'s series.

    Parameters
    ----------
    threshold:
        In the heatmap's units (raw, or [0, 1] after normalisation).
    fractional:
        Write a FRACTIONAL (probability) segment of ``heatmap / max`` instead of a BINARY mask
        of the thresholded map (Weasis and Slicer show it; OHIF rejects fractional SEGs).
    peak:
        The map's maximum, when the caller knows it.
    stream:
        Return ``(dataset without pixel data, FramePixels)`` for
        :func:`~medcam.writers.dicom_common.write_dataset`, which packs and writes the frames
        slab by slab from ``heatmap`` (the same file, no mask volume in memory); by default
        the complete dataset.

    Every frame is written (no empty-frame omission), ordered ascending along the slice normal,
    so dcmqi's ``segimage2itkimage`` (3D Slicer) places the mask on the source grid; every frame
    references its source slice (and frame number, for an Enhanced multi-frame source), with
    the source's exact orientation and position values, as OHIF's loader matches them.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medcam.writers.dicom_common import copy_source_geometry, source_images

    require_dicom_series(scan, "DICOM SEG")
    heat = np.asarray(heatmap, dtype=np.float32)
    if fractional:
        peak = float(heat.max()) if peak is None else peak
        if peak <= 0:
            raise MedcamError("The heatmap is all zero; a fractional SEG would be empty.")
    columns, rows, n = heat.shape
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
    # the header only: the pixel data is written from the map (FramePixels below)
    seg = header_only(hd.seg.Segmentation)(
        source_images=source_images(scan),
        pixel_array=_zero_frames(n, rows, columns),
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
    slices = file_frame_slices(seg, scan)
    if fractional:
        pixels = FramePixels(
            "PixelData",
            _even(n * rows * columns),
            lambda: _fractional_chunks(heat, slices, peak, n * rows * columns),
        )
    else:
        pixels = FramePixels("PixelData", _even(-(-n * rows * columns // 8)),
                             lambda: _binary_chunks(heat, slices, threshold))  # fmt: skip
    if stream:
        return seg, pixels
    attach_pixels(seg, pixels)
    return seg


def _zero_frames(n: int, rows: int, columns: int) -> np.ndarray:
    """``(n, rows, columns)`` uint8 zeros in the memory of one frame (highdicom scales
    FRACTIONAL frames in place, which leaves them zero: so the array is writeable)."""
    zero = np.zeros((rows, columns), np.uint8)
    return np.lib.stride_tricks.as_strided(
        zero, shape=(n, rows, columns), strides=(0, columns, 1), writeable=True
    )


def _even(length: int) -> int:
    return length + length % 2


def _fractional_chunks(heat: np.ndarray, slices: np.ndarray, peak: float, size: int):
    """FRACTIONAL frames as highdicom encodes them: ``round(clip(map / peak, 0, 1) * 255)``."""
    for block in volume_frames(heat, slices):
        fraction = np.clip(block / np.float32(peak), 0.0, 1.0)
        yield np.around(fraction * float(MAX_FRACTIONAL)).astype(np.uint8)
    if size % 2:
        yield b"\x00"


def _binary_chunks(heat: np.ndarray, slices: np.ndarray, threshold: float):
    """BINARY frames: one bit per pixel, little bit order, packed across frame boundaries (as
    DICOM and highdicom do: a frame need not start on a byte)."""
    carry = np.zeros(0, dtype=bool)
    total = 0
    for block in volume_frames(heat, slices):
        bits = (block >= threshold).reshape(-1)
        if carry.size:
            bits = np.concatenate([carry, bits])
        whole = bits.size - bits.size % 8
        packed = np.packbits(bits[:whole], bitorder="little")
        total += packed.size
        carry = bits[whole:]
        yield packed
    if carry.size:
        total += 1
        yield np.packbits(carry, bitorder="little")
    if total % 2:
        yield b"\x00"


@register_format("dicom-seg", needs="dicom-series", order=30,
                 description="DICOM SEG of the thresholded map on the source series")  # fmt: skip
def write_segmentations(out: CaseOutput) -> list[Path]:
    """One SEG ``<base>_seg.dcm`` per map: voxels at or above ``seg_threshold`` x the map's
    peak (BINARY), or ``map / peak`` (FRACTIONAL with ``fractional_seg``)."""
    paths = []
    fraction = float(out.options.get("seg_threshold", 0.5))
    for k, label in enumerate(out.labels):
        peak = out.value_range(k)[1]
        seg, pixels = build_segmentation(
            out.heat[k],
            out.scan,
            threshold=fraction * peak if peak > 0 else 1.0,
            label=label,
            method=out.method,
            fractional=bool(out.options.get("fractional_seg", False)),
            identity=DicomIdentity.new(
                out.series_number(k, 2), seed=uid_seed_for(out.options, "dicom-seg", k)
            ),
            peak=peak,
            stream=True,
        )
        name = f"{out.base(k)}_seg.dcm"
        paths.append(out.folder.write_file(name, lambda p, d=seg, x=pixels: write_dataset(d, x, p)))
    return paths
