"""NIfTI heatmaps that overlay on the source scan in 3D Slicer, ITK-SNAP and nibabel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcam.writers.registry import CaseOutput, register_format

__all__ = ["heatmap_to_nifti", "nifti_bytes", "write_nifti"]

NIFTI_XFORM_SCANNER_ANAT = 1


def heatmap_to_nifti(
    heatmap: np.ndarray,
    affine_ras: np.ndarray,
    *,
    intent_name: str = "GradCAM",
    codes: tuple[int, int] | None = None,
    description: str = "medcam heatmap",
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
    img.header["cal_min"] = float(data.min()) if data.size else 0.0
    img.header["cal_max"] = float(data.max()) if data.size else 0.0
    img.header["descrip"] = description[:79].encode()
    return img


def nifti_bytes(img, compress: bool = True) -> bytes:
    """The file content of ``img``: ``.nii.gz`` (gzip, reproducible) or plain ``.nii``."""
    import gzip

    data = img.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


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
        )
        data = nifti_bytes(img)
        name = f"{out.base(k)}.nii.gz"
        paths.append(out.folder.write_file(name, lambda p, d=data: p.write_bytes(d)))
    return paths
