"""Masks of the evidence (e.g. lesion segmentations) on a scan's grid, for scoring heatmaps.

:func:`mask_on_scan` reads a mask given as an array, a :class:`~medcam.io.Scan`, a label image
(NIfTI, NRRD, ...: anything :func:`medcam.load_scan` reads) or a DICOM Segmentation (SEG,
read with highdicom), and returns the boolean evidence ``(*scan_spatial)`` on the scan's grid:

- a grid with the same voxel centres in another axis order or direction is reoriented;
- a DICOM SEG covering only some slices (or a crop) of the scan is placed into it;
- any other grid is refused, naming the difference (voxel size, rotation, shape, shift).

Which voxels are the evidence: with ``label``, those equal to it (for a SEG: that segment
number); otherwise the nonzero voxels of a one-label mask, or the voxels ``>= 0.5`` of a
resampled (interpolated, non-integer) one. A mask holding several labels (segments) without
``label`` is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcam.errors import InputError, MedcamError
from medcam.io.scan import Scan, load_scan

__all__ = ["evidence", "mask_on_scan"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def evidence(values: torch.Tensor, label: int | None, what: str) -> torch.Tensor:
    """The boolean evidence of mask ``values``: voxels equal to ``label``; else the nonzero
    voxels of a one-label mask, or the voxels >= 0.5 of a resampled (non-integer) mask.

    ``what`` names the mask in error messages (e.g. ``"The mask of scan 3"``).
    """
    v = torch.as_tensor(values).detach().float().cpu()
    if not bool(torch.isfinite(v).all()):
        raise InputError(f"{what} has NaN or infinite values; give a label image.")
    if label is not None:
        hit = v == float(label)
        if not bool(hit.any()):
            found = sorted(set(torch.unique(v).tolist()) - {0.0})[:8]
            raise InputError(f"{what} has no voxel labelled {label} (its labels: {found}).")
        return hit
    if torch.equal(v, v.round()):
        labels = sorted(set(torch.unique(v).tolist()) - {0.0})
        if len(labels) > 1:
            shown = ", ".join(f"{x:g}" for x in labels[:8])
            raise InputError(
                f"{what} holds several labels ({shown}); say which one is the evidence "
                "(label=..., --mask-label N)."
            )
        return v != 0
    return v >= 0.5


def mask_on_scan(mask: Any, scan: Scan, label: int | None = None, *, what: str = "The mask"):
    """The boolean evidence ``(*scan_spatial)`` of ``mask`` on ``scan``'s grid (see the module).

    Arrays must be in medcam's array order for that scan, ``scan.image.shape[1:]`` (for DICOM
    and pictures (columns, rows[, slices]), the transpose of pydicom's / PIL's arrays).

    Raises
    ------
    InputError
        A mask that cannot be read, is not on the scan's grid, or whose evidence is ambiguous.
    """
    from medcam.space import _affine_nd, grid_differences, same_voxels

    if isinstance(mask, (torch.Tensor, np.ndarray)):
        m = torch.as_tensor(mask)
        if tuple(m.shape) != tuple(scan.spatial_shape):
            raise InputError(
                f"{what} has shape {tuple(m.shape)}, the scan {tuple(scan.spatial_shape)} "
                "(medcam's array order, scan.image.shape[1:]); draw the mask on the scan's grid."
            )
        return evidence(m, label, what)
    seg = None if isinstance(mask, Scan) else _seg_file(mask)
    if seg is not None:
        values, affine_ras, source = _read_seg(seg, label, what, scan)
        label = None if label is None else 1  # the segment was selected while reading
    else:
        image = mask if isinstance(mask, Scan) else _load(mask, what)
        if image.image.shape[0] != 1:
            raise InputError(f"{what} ({image.source}) has {image.image.shape[0]} channels; give "
                             "a single-channel label image.")  # fmt: skip
        data = image.image.as_tensor() if hasattr(image.image, "as_tensor") else image.image
        values, affine_ras, source = torch.as_tensor(data)[0], image.affine_ras, image.source
    what = f"{what} ({source})"
    nd = len(scan.spatial_shape)
    # a trailing one-voxel axis on one side only (a 2D picture as a one-slice volume, or the
    # other way round) is the same grid; any other difference in rank is not
    while values.ndim > nd and values.shape[-1] == 1:
        values = values[..., 0]
    while values.ndim < nd and scan.spatial_shape[values.ndim] == 1:
        values = values[..., None]
    if values.ndim != nd:
        raise InputError(
            f"{what} is {values.ndim}D {tuple(values.shape)}, the scan {nd}D "
            f"{tuple(scan.spatial_shape)}: give a mask on the scan's own grid."
        )
    placed = same_voxels(values[None].float(), affine_ras, scan)
    if placed is None:
        placed = _inside(values.float(), affine_ras, scan)
    if placed is None:
        diff = grid_differences(_affine_nd(affine_ras, nd), _affine_nd(scan.affine_ras, nd),
                                tuple(values.shape), tuple(scan.spatial_shape))  # fmt: skip
        raise InputError(
            f"{what} is not on the scan's grid: {diff}. Resample the mask onto the scan "
            "(nearest neighbour), e.g. with 3D Slicer's 'Resample Scalar/Vector/DWI Volume' or "
            "SimpleITK."
        )
    return evidence(placed[0], label, what)


def _load(path: Any, what: str) -> Scan:
    try:
        return load_scan(path)
    except MedcamError as err:
        raise InputError(f"{what}, {path}: {err} Give masks as label images (NIfTI, NRRD, ...) "
                         "or DICOM SEG on the scan's grid.") from err  # fmt: skip


def _is_seg(p: Path) -> bool:
    try:
        import pydicom

        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM
        return False
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def _seg_file(path: Any) -> Path | None:
    """The DICOM SEG file ``path`` is (or the one file of a folder, as PACS exports keep a
    series), else ``None``."""
    p = Path(str(path))
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
        p = files[0] if len(files) == 1 else p
    return p if p.is_file() and _is_seg(p) else None


def _read_seg(
    path: Path, label: int | None, what: str, scan: Scan
) -> tuple[torch.Tensor, np.ndarray, str]:
    """``(values (*S), voxel -> RAS affine, source)`` of one segment of a DICOM SEG: binary,
    1 inside the segment (``label`` is its segment number; needed when there are several).
    A SEG of another patient, frame of reference or series than a DICOM ``scan`` is refused."""
    import highdicom as hd

    what = f"{what} ({path})"
    try:
        seg = hd.seg.segread(path)
    except Exception as err:
        raise InputError(
            f"{what}: cannot read the DICOM SEG ({type(err).__name__}: {err})."
        ) from err
    _same_study(seg, scan, what)
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    if label is None and len(numbers) > 1:
        names = ", ".join(f"{s.SegmentNumber} ({s.SegmentLabel})" for s in seg.SegmentSequence)
        raise InputError(
            f"{what} holds several segments: {names}; say which one is the evidence "
            "(label=..., --mask-label N: the segment number)."
        )
    number = numbers[0] if label is None else int(label)
    if number not in numbers:
        raise InputError(f"{what} has no segment {number} (its segments: {numbers}).")
    try:
        volume = seg.get_volume(segment_numbers=[number], combine_segments=True, relabel=True)
    except (RuntimeError, ValueError) as err:  # frames that are not one regularly spaced stack
        raise InputError(
            f"{what}: its frames do not form one regularly spaced volume ({err}); medcam reads "
            "SEGs of one stack of parallel slices."
        ) from err
    # highdicom: array (slices, rows, columns), affine from those indices to LPS mm
    values = torch.as_tensor(np.asarray(volume.array) > 0)
    return values, _LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64), str(path)


def _inside(values: torch.Tensor, affine_ras: np.ndarray, scan: Scan) -> torch.Tensor | None:
    """``values`` on a grid whose voxels are a block of the scan's voxels (any axis order or
    direction: a SEG of some slices, a crop), placed into a zero map of the scan; else None."""
    from medcam.space import _affine_nd

    nd = len(scan.spatial_shape)
    if values.ndim != nd:
        return None

    a, b = _affine_nd(affine_ras, nd), _affine_nd(scan.affine_ras, nd)
    t = np.linalg.solve(b, a)  # index in the mask's grid -> index in the scan's
    r, offset = t[:nd, :nd], t[:nd, nd]
    axes = [int(np.argmax(np.abs(r[i]))) for i in range(nd)]
    if sorted(axes) != list(range(nd)):
        return None
    perm = np.zeros_like(r)
    for i, j in enumerate(axes):
        perm[i, j] = np.sign(r[i, j])
    extent = max(max(values.shape) - 1, 1)
    if np.abs(r - perm).max() * extent > 0.1 or np.abs(offset - np.round(offset)).max() > 0.1:
        return None  # not the scan's voxels (another spacing, a rotation, a sub-voxel shift)
    moved = values.permute(*axes)
    flips = [i for i in range(nd) if perm[i, axes[i]] < 0]
    if flips:
        moved = moved.flip(flips)
    starts = []
    for i in range(nd):
        n = moved.shape[i]
        start = round(float(offset[i])) - (n - 1 if perm[i, axes[i]] < 0 else 0)
        if start < 0 or start + n > scan.spatial_shape[i]:
            return None  # reaches outside the scan
        starts.append(start)
    out = torch.zeros(tuple(scan.spatial_shape), dtype=values.dtype)
    out[tuple(slice(s, s + n) for s, n in zip(starts, moved.shape, strict=True))] = moved
    return out[None]


def _same_study(seg: Any, scan: Scan, what: str) -> None:
    """A SEG drawn on another patient, frame of reference or series than the DICOM ``scan`` is
    refused (a swapped row in a case list): the geometry alone may well agree."""
    if not scan.datasets:
        return  # a NIfTI / picture scan: only the grid can be compared
    ds = scan.datasets[0]
    checks = [("patient", "PatientID"), ("frame of reference", "FrameOfReferenceUID")]
    referenced = [str(item.get("SeriesInstanceUID", ""))
                  for item in seg.get("ReferencedSeriesSequence", [])]  # fmt: skip
    series = str(ds.get("SeriesInstanceUID", ""))
    for name, keyword in checks:
        theirs, ours = str(seg.get(keyword, "")), str(ds.get(keyword, ""))
        if theirs and ours and theirs != ours:
            raise InputError(f"{what} belongs to another {name} than its scan ({theirs} vs "
                             f"{ours}): is the case list's row right?")  # fmt: skip
    if referenced and series and series not in referenced:
        raise InputError(f"{what} was drawn on series {', '.join(referenced)}, not on its scan's "
                         f"series {series}: is the case list's row right?")  # fmt: skip
