"""``medcam demo``: the main job end to end on built-in synthetic data, offline.

A CT-like phantom with a lesion is synthesised in physical space and written as a DICOM
series and a NIfTI file; the shipped demo classifier explains the DICOM series (every output
format) and the demo segmenter explains the NIfTI (segmentation target); the heatmaps land on
the original grids, and the summary says how far the heatmap peak is from the lesion.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medcam.data.synthetic import LPS_TO_RAS, Geometry, rotation

__all__ = ["run_demo"]

LESION_OFFSET_MM = (
    -38.0,
    -14.0,
    18.0,
)  # from the field-of-view centre, LPS (patient right/anterior)


def demo_geometry() -> Geometry:
    """160 x 160 x 48 voxels of 1.2 x 1.2 x 3 mm, tilted a few degrees (oblique slices)."""
    r = rotation((4.0, 0.0, 6.0))
    shape, spacing = (160, 160, 48), (1.2, 1.2, 3.0)
    half = r @ (np.array(shape, float) - 1) * np.array(spacing) / 2
    return Geometry(shape, spacing, tuple(-half), tuple(r[:, 0]), tuple(r[:, 1]))


def _peak_distance_mm(heat: np.ndarray, affine_lps: np.ndarray, truth: np.ndarray) -> float:
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    world = affine_lps @ np.append(np.asarray(peak, float), 1.0)
    return float(np.linalg.norm(world[:3] - truth))


def run_demo(out: str | Path, *, device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """Run the demo into ``out``; returns a summary dict (also printed through ``log``).

    Layout: ``out/inputs/dicom/`` and ``out/inputs/phantom.nii.gz`` (the synthetic scan),
    ``out/classifier/`` (NIfTI, DICOM PM/SEG/SC, PNG, JSON of the DenseNet classifier),
    ``out/segmenter/`` (NIfTI, PNG, JSON of the UNet, lesion class over its predicted region).
    """
    import torch

    from medcam.data.demo import (
        ct_phantom,
        demo_classifier,
        demo_preprocess,
        demo_segmenter,
        load_demo_weights,
    )
    from medcam.data.synthetic import write_dicom_series
    from medcam.engine.targets import SegmentationTarget
    from medcam.io.output import OutputDir
    from medcam.io.scan import load_scan
    from medcam.space import explain_scan
    from medcam.writers.nifti import heatmap_to_nifti, nifti_bytes
    from medcam.writers.outputs import write_outputs

    t0 = time.perf_counter()
    out = Path(out)
    OutputDir(out)  # checked (created, writable) before any work
    geometry = demo_geometry()
    centre = geometry.affine_lps[:3] @ np.append((np.array(geometry.shape) - 1) / 2, 1.0)
    lesion = centre + np.array(LESION_OFFSET_MM)
    log(f"[1/4] synthesising a CT phantom {geometry.shape} at {geometry.spacing} mm (oblique)")
    hu = ct_phantom(geometry, lesion, 12.0)
    inputs = OutputDir(out / "inputs")
    with inputs.folder("dicom") as tmp:
        write_dicom_series(
            hu, geometry, tmp, series_description="medcam demo phantom", shuffle=True
        )
    nii = heatmap_to_nifti(hu, LPS_TO_RAS @ geometry.affine_lps, intent_name="none",
                           description="medcam demo phantom (HU)")  # fmt: skip
    nii.header.set_intent("none")
    data = nifti_bytes(nii)
    inputs.write_file("phantom.nii.gz", lambda p: p.write_bytes(data))

    log("[2/4] classifier (MONAI DenseNet 3D, shipped weights) on the DICOM series")
    dev = torch.device(device)
    clf = load_demo_weights(demo_classifier(), "classifier").to(dev)
    scan = load_scan(out / "inputs" / "dicom")
    cls_ex = explain_scan(clf, scan, preprocess=demo_preprocess(), target="pred")
    every_format = ["nifti", "dicom-pm", "dicom-seg", "dicom-sc", "png", "json"]
    written = write_outputs(cls_ex, out, every_format, model=clf, case="classifier")
    probs = cls_ex.probabilities() or [float("nan")]
    cls_dist = _peak_distance_mm(cls_ex.heatmap[0].cpu().numpy(), scan.affine_lps, lesion)

    log("[3/4] segmenter (MONAI UNet 3D) on the NIfTI: LayerCAM of the lesion class over its "
        "predicted region")  # fmt: skip
    seg = load_demo_weights(demo_segmenter(), "segmenter").to(dev)
    nii_scan = load_scan(out / "inputs" / "phantom.nii.gz")
    # element-wise methods (LayerCAM, HiResCAM) localise in segmentation networks; Grad-CAM's
    # volume-averaged channel weights do not (docs/bundles.md)
    seg_ex = explain_scan(seg, nii_scan, preprocess=demo_preprocess(), method="layercam",
                          target=SegmentationTarget(1))  # fmt: skip
    seg_written = write_outputs(seg_ex, out, ["nifti", "png", "json"], model=seg,
                                case="segmenter")  # fmt: skip
    seg_dist = _peak_distance_mm(seg_ex.heatmap[0].cpu().numpy(), nii_scan.affine_lps, lesion)
    summary = {
        "out": str(out.resolve()),
        "predicted_class": int(cls_ex.cam.classes[0, 0]),
        "probability": round(float(probs[0]), 4),
        "layer": " + ".join(cls_ex.cam.layers),
        "feature_grid": " + ".join(
            "x".join(map(str, cls_ex.cam.feature_shapes[n])) for n in cls_ex.cam.layers
        ),
        "fusion": cls_ex.cam.fusion,
        "classifier_peak_to_lesion_mm": round(cls_dist, 1),
        "segmenter_layer": seg_ex.cam.layers[0],
        "segmenter_peak_to_lesion_mm": round(seg_dist, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log("[4/4] done")
    log(
        f"  classifier: class {summary['predicted_class']} (p = {summary['probability']:.3f}), "
        f"layer {summary['layer']} (grid {summary['feature_grid']}"
        f"{', ' + summary['fusion'] + ' fusion' if summary['fusion'] else ''}); heatmap peak "
        f"{summary['classifier_peak_to_lesion_mm']} mm from the lesion centre"
    )
    log(
        f"  segmenter: layer {summary['segmenter_layer']}; heatmap peak "
        f"{summary['segmenter_peak_to_lesion_mm']} mm from the lesion centre"
    )
    log(f"Outputs in {out.resolve()}:")
    log("  inputs/dicom/, inputs/phantom.nii.gz   the synthetic scan")
    for fmt, paths in {**written, **{f"segmenter {k}": v for k, v in seg_written.items()}}.items():
        for p in paths:
            log(f"  {p.relative_to(out)}   ({fmt})")
    log(
        "Look: open the PNGs; in 3D Slicer load inputs/dicom with classifier/*_pm.dcm (needs "
        "QuantitativeReporting) or drag in classifier/*.nii.gz over inputs/phantom.nii.gz; in "
        "OHIF the PM, SEG and SC series sit in the phantom's study."
    )
    return summary
