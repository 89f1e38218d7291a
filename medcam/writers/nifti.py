"""NIfTI heatmaps that overlay on the source scan in 3D Slicer, ITK-SNAP and nibabel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcam.writers.registry import CaseOutput, register_format, slab_zyx

__all__ = ["heatmap_to_nifti", "nifti_bytes", "write_nifti", "write_nifti_file"]

NIFTI_XFORM_SCANNER_ANAT = 1


def heatmap_to_nifti(
    heatmap: np.ndarray,
    affine_ras: np.ndarray,
    *,
    intent_name: str = "GradCAM",
    codes: tuple[int, int] | None = None,
    description: str = "medcam heatmap",
    value_range: tuple[float, float] | None = None,
):
    """Build a fresh ``Nifti1Image`` for one map.

    Parameters
    ----------
    heatmap:
        ``(X, Y[, Z])`` float map on the source grid.
    affine_ras:
        The source's 4x4 voxel-to-RAS affine; written into both the sform and the qform.
    codes:
        ``(sform_code, qform_code)`` of a NIfTI source; zero codes (or ``None``) become 1
        (scanner anatomical), so viewers never ignore the transform.
    value_range:
        The map's ``(min, max)`` for cal_min/cal_max, when the caller knows it.

    Notes
    -----
    The header is built from scratch (copying the source header kept e.g. big-endian dtypes):
    float32 little-endian, slope 1 / intercept 0, units mm, intent "estimate" with the method's
    name, cal_min/cal_max set to the data range.
    """
    import nibabel as nib

    data = np.asarray(heatmap, dtype="<f4")
    img = nib.Nifti1Image(data, affine=None)
    sform_code, qform_code = codes or (0, 0)
    img.header.set_sform(affine_ras, code=int(sform_code) or NIFTI_XFORM_SCANNER_ANAT)
    img.header.set_qform(affine_ras, code=int(qform_code) or NIFTI_XFORM_SCANNER_ANAT)
    img.header.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    img.header.set_intent("estimate", name=intent_name[:16])
    if value_range is None:
        value_range = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = value_range
    img.header["descrip"] = description[:79].encode()
    return img


#: gzip level of ``.nii.gz`` output: nibabel's own default. Level 6 takes about 3x as long
#: on a float map for files a few per cent smaller.
COMPRESS_LEVEL = 1


def nifti_bytes(img, compress: bool = True) -> bytes:
    """The file content of ``img``: ``.nii.gz`` (gzip, reproducible) or plain ``.nii``."""
    import io

    buffer = io.BytesIO()
    write_nifti_file(img, buffer, compress=compress)
    return buffer.getvalue()


def write_nifti_file(img, target, compress: bool = True) -> None:
    """Write ``img`` to ``target`` (a path or a binary file object) as ``.nii.gz`` (gzip
    without a name or time stamp, so the bytes depend on the data only) or plain ``.nii``.

    The voxels are streamed (nibabel writes the array slice by slice, through the compressor)
    rather than assembled into one in-memory file first.
    """
    import contextlib
    import gzip

    with contextlib.ExitStack() as stack:
        f = target
        if not hasattr(target, "write"):
            f = stack.enter_context(open(target, "wb"))
        if compress:
            f = stack.enter_context(
                gzip.GzipFile(filename="", mode="wb", compresslevel=COMPRESS_LEVEL, fileobj=f,
                              mtime=0)
            )  # fmt: skip
        if not _write_in_slabs(img, f):
            img.to_file_map(img.make_file_map({"image": f, "header": f}))


def _write_in_slabs(img, f) -> bool:
    """Write a float32 map (slope 1, intercept 0) as nibabel would, its voxels in Fortran
    order taken slab by slab (a few slices reordered at a time). nibabel itself gathers each
    slice of a C-ordered volume element by element; a C-ordered 512 x 512 x 300 map took
    ~5x as long. Returns ``False`` (nothing written) for anything else, which nibabel writes.
    """
    import nibabel as nib

    data = np.asanyarray(img.dataobj)
    header = img.header
    if (
        not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))
        or data.ndim not in (2, 3)
        or data.flags.f_contiguous
        or data.dtype != np.dtype("<f4")
        or header.get_data_dtype() != np.dtype("<f4")
        or tuple(float(v) for v in header.get_slope_inter()) != (1.0, 0.0)
    ):
        return False
    img.update_header()
    start = f.tell()
    header.write_to(f)  # the header and its extensions, as nibabel writes them
    offset = int(header.get_data_offset())
    f.write(b"\x00" * (offset - (f.tell() - start)))
    volume = data if data.ndim == 3 else data[:, :, None]
    step = max(1, (32 << 20) // max(1, volume[:, :, 0].nbytes))
    for z0 in range(0, volume.shape[2], step):
        f.write(slab_zyx(volume, z0, min(z0 + step, volume.shape[2])))
    return True


@register_format("nifti", order=10, description="NIfTI map on the scan grid")
def write_nifti(out: CaseOutput) -> list[Path]:
    """One ``<stem>_<method>_<label>.nii.gz`` per map, on the source affine."""
    paths = []
    scan = out.scan
    for k, label in enumerate(out.labels):
        img = heatmap_to_nifti(
            out.heat[k],
            scan.affine_ras,
            intent_name=out.method,
            codes=scan.nifti_codes,
            description=f"medcam {out.method} {label} {out.layer_text}",
            value_range=out.value_range(k),
        )
        name = f"{out.base(k)}.nii.gz"
        paths.append(out.folder.write_file(name, lambda p, i=img: write_nifti_file(i, p)))
    return paths
