"""Write a scan's heatmaps in the chosen formats, atomically, with a JSON sidecar."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcam import __version__
from medcam.errors import MedcamError
from medcam.io.output import OutputDir, safe_name

__all__ = ["FORMATS", "case_name", "model_identity", "write_outputs"]

FORMATS = ("nifti", "dicom-pm", "dicom-seg", "dicom-sc", "png", "json")
DEFAULT_FORMATS = ("nifti", "png", "json")


def case_name(scan, template: str | None = None) -> str:
    """File-name stem for a case: ``template`` filled from the first DICOM header, or a hash.

    ``template`` may use DICOM keywords, e.g. ``"{SeriesInstanceUID}"``; values are
    sanitised (no path separators, no ``..``), so a tag cannot make a path leave the output
    folder. The default, ``case-<first 12 hex of the input's SHA-256>``, holds no identifier.
    """
    if template is None:
        return f"case-{scan.sha256[:12]}" if scan.sha256 else "case"
    fields: dict[str, str] = {}
    if scan.datasets:
        ds = scan.datasets[0]
        for elem in ds:
            if elem.keyword and elem.VR not in ("SQ", "OB", "OW", "OF", "OD", "UN"):
                fields[elem.keyword] = str(elem.value)
    try:
        raw = template.format_map(fields)
    except KeyError as err:
        raise MedcamError(f"Case-name template {template!r}: the scan has no {err} tag.") from err
    return safe_name(raw)


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Class, parameter count and SHA-256 of the state dict (weights identify the model)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "state_dict_sha256": h.hexdigest(),
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"medcam-monai": __version__}
    for pkg in ("torch", "monai", "numpy", "pydicom", "highdicom", "nibabel", "SimpleITK"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _draw_png(path: Path, *, image, heat, affine, title: str, alpha: float) -> None:
    from medcam.writers.figures import save_figure_2d, save_figure_3d

    if heat.ndim == 3:
        save_figure_3d(image, heat, affine, path, title=title, alpha=alpha)
    else:
        save_figure_2d(image, heat, path, title=title, alpha=max(alpha, 0.5))


def write_outputs(
    explanation,
    out_dir: str | Path,
    formats: Sequence[str] = DEFAULT_FORMATS,
    *,
    model: torch.nn.Module | None = None,
    case: str | None = None,
    seg_threshold: float = 0.5,
    fractional_seg: bool = False,
    alpha: float = 0.4,
    series_number_base: int = 9000,
) -> dict[str, list[Path]]:
    """Write ``explanation`` (a :class:`medcam.ScanExplanation`) to ``out_dir``.

    Parameters
    ----------
    formats:
        Any of ``"nifti"``, ``"dicom-pm"``, ``"dicom-seg"``, ``"dicom-sc"``, ``"png"``,
        ``"json"``. DICOM formats need a DICOM source; they are checked before anything is
        written.
    model:
        Recorded in the sidecar (class, parameter count, weights hash).
    case:
        File-name stem, e.g. a cohort case id (sanitised); default ``case-<input hash>``.
    seg_threshold:
        DICOM SEG (binary): voxels at or above this fraction of each map's maximum.
    fractional_seg:
        Write the SEG as FRACTIONAL (``map / max``) instead of BINARY.

    Returns
    -------
    dict
        Format -> written paths. The input is never modified: the folder is checked up front,
        each file is written under a temporary name and renamed, and a path equal to an input
        file is refused.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise MedcamError(f"Unknown output format(s) {unknown}; choose from {', '.join(FORMATS)}.")
    scan = explanation.scan
    if {"dicom-pm", "dicom-seg"} & set(formats):
        from medcam.writers.dicom_common import require_dicom_series

        require_dicom_series(scan, "DICOM Parametric Map / SEG")
    if "dicom-sc" in formats and not scan.datasets:
        raise MedcamError(
            f"dicom-sc needs a DICOM source, but this scan is {scan.kind!r}; use png instead."
        )
    out = OutputDir(out_dir, scan.input_files)
    stem = safe_name(case) if case is not None else case_name(scan)
    heat = explanation.heatmap.detach().cpu().numpy().astype(np.float32)
    image = None  # the scan itself, copied to the host only for the pictures that show it
    if {"png", "dicom-sc"} & set(formats):
        image = scan.image.detach().cpu().numpy().mean(axis=0)  # channels averaged (RGB -> grey)
    method = explanation.cam.method
    written: dict[str, list[Path]] = {f: [] for f in formats}
    layer_text = "+".join(explanation.cam.layers)
    for k, label in enumerate(explanation.target_labels):
        base = f"{stem}_{safe_name(method)}_{label}"
        h = heat[k]
        if "nifti" in formats:
            from medcam.writers.nifti import heatmap_to_nifti, nifti_bytes

            img = heatmap_to_nifti(
                h,
                scan.affine_ras,
                intent_name=method,
                codes=scan.nifti_codes,
                description=f"medcam {method} {label} {layer_text}",
            )
            data = nifti_bytes(img)
            written["nifti"].append(
                out.write_file(f"{base}.nii.gz", lambda p, d=data: p.write_bytes(d))
            )
        if "dicom-pm" in formats:
            from medcam.writers.dicom_common import DicomIdentity
            from medcam.writers.dicom_pm import build_parametric_map

            pm = build_parametric_map(
                h,
                scan,
                method=method,
                label=label,
                identity=DicomIdentity.new(series_number_base + 10 * k + 1),
            )
            written["dicom-pm"].append(
                out.write_file(f"{base}_pm.dcm", lambda p, d=pm: d.save_as(p))
            )
        if "dicom-seg" in formats:
            from medcam.writers.dicom_common import DicomIdentity
            from medcam.writers.dicom_seg import build_segmentation

            peak = float(h.max())
            seg = build_segmentation(
                h,
                scan,
                threshold=seg_threshold * peak if peak > 0 else 1.0,
                label=label,
                method=method,
                fractional=fractional_seg,
                identity=DicomIdentity.new(series_number_base + 10 * k + 2),
            )
            written["dicom-seg"].append(
                out.write_file(f"{base}_seg.dcm", lambda p, d=seg: d.save_as(p))
            )
        if "dicom-sc" in formats:
            from medcam.writers.dicom_sc import build_secondary_captures

            images = build_secondary_captures(
                image,
                h,
                scan,
                label=label,
                method=method,
                series_number=series_number_base + 10 * k + 3,
                alpha=alpha,
            )
            with out.folder(f"{base}_sc") as tmp:
                for i, sc in enumerate(images):
                    sc.save_as(tmp / f"sc_{i + 1:04d}.dcm")
            written["dicom-sc"].append(out.path / f"{base}_sc")
        if "png" in formats:
            title = f"{method} · {label} · layer {layer_text}"
            fs = explanation.cam.feature_shapes
            title += f" · grid {'/'.join('x'.join(map(str, s)) for s in fs.values())}"
            draw = partial(_draw_png, image=image, heat=h, affine=scan.affine_ras, title=title,
                           alpha=alpha)  # fmt: skip
            written["png"].append(out.write_file(f"{base}.png", draw))
    if "json" in formats:
        record = {
            "case": stem,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "input": {
                "kind": scan.kind,
                "sha256": scan.sha256,
                "shape": list(scan.spatial_shape),
                "affine_ras": scan.affine_ras.tolist(),
                "files": len(scan.input_files),
            },
            "model": model_identity(model) if model is not None else None,
            "explanation": explanation.metadata(),
            "outputs": {
                "seg_threshold_fraction_of_peak": seg_threshold if "dicom-seg" in formats else None,
                "files": {f: [p.name for p in v] for f, v in written.items() if f != "json"},
            },
            "versions": _versions(),
        }
        text = json.dumps(record, indent=2, default=str)
        written["json"].append(out.write_file(f"{stem}.json", lambda p: p.write_text(text)))
    return written
