"""Compare one patient's heatmaps across visits: register, measure, trend, write."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcam.errors import InputError
from medcam.longitudinal import metrics as M
from medcam.longitudinal.registration import Registration, register, to_sitk
from medcam.longitudinal.timepoint import COMPARABLE, Timepoint

__all__ = ["LongitudinalResult", "compare"]

TREND_METRICS = ("volume_ml", "heat_sum", "centroid_shift_mm", "dice", "pearson", "probability")


@dataclass
class LongitudinalResult:
    """Per-visit metrics, trends and the maps on the baseline grid.

    Attributes
    ----------
    rows:
        One dict per visit (baseline first), keys as in :data:`METRIC_DESCRIPTIONS`.
    trends:
        Per metric: Theil-Sen ``slope_per_day`` and ``intercept`` vs days since baseline.
    registrations:
        One :class:`Registration` per follow-up.
    on_baseline:
        Each visit's heatmap resampled onto the baseline grid ``(X, Y, Z)``.
    difference_maps:
        ``follow-up - baseline`` on the baseline grid, one per follow-up.
    threshold:
        The absolute activation threshold used for every visit.
    outputs:
        Written files by kind (when ``out`` was given).
    """

    rows: list[dict[str, Any]]
    trends: dict[str, dict[str, float]]
    registrations: list[Registration]
    on_baseline: list[np.ndarray]
    difference_maps: list[np.ndarray]
    threshold: float
    baseline: Timepoint
    timepoints: list[Timepoint]
    outputs: dict[str, list[Path]] = field(default_factory=dict)


def _check_comparable(timepoints: Sequence[Timepoint]) -> None:
    if len(timepoints) < 2:
        raise InputError("A longitudinal comparison needs a baseline and at least one follow-up.")
    for key in COMPARABLE:
        values = {str(tp.provenance.get(key)) for tp in timepoints if tp.provenance.get(key)}
        if len(values) > 1:
            what = {"patient": "patients", "modality": "modalities", "model": "models",
                    "layers": "target layers", "method": "CAM methods", "target": "targets",
                    "normalization": "normalisations"}[key]  # fmt: skip
            raise InputError(
                f"The visits mix {what}: {sorted(values)}. Heatmaps are comparable only from one "
                "patient, one modality, and one model / layer / method / target / normalisation; "
                "recompute them with the same settings."
            )
    dates = [tp.date for tp in timepoints]
    if len(set(dates)) != len(dates):
        raise InputError(f"Two visits share a date ({sorted(dates)}); give distinct dates.")


def _resample(heat: np.ndarray, tp: Timepoint, baseline: Timepoint, reg: Registration):
    import SimpleITK as sitk

    moving = to_sitk(heat, tp.affine_lps)
    reference = to_sitk(np.zeros(baseline.heatmap.shape, np.float32), baseline.affine_lps)
    out = sitk.Resample(moving, reference, reg.transform, sitk.sitkLinear, 0.0)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def _pct(value: float, reference: float) -> float | None:
    """Percent change; None when the reference volume is zero (undefined)."""
    return 100.0 * (value - reference) / reference if reference else None


def compare(
    timepoints: Sequence[Timepoint],
    *,
    registration: str = "rigid",
    threshold: float | None = None,
    body_threshold: float | None = -500.0,
    label_map: np.ndarray | None = None,
    out: str | Path | None = None,
    formats: Sequence[str] = ("nifti", "dicom-pm", "csv", "json", "png", "html"),
) -> LongitudinalResult:
    """Compare visits of one patient (the earliest is the baseline).

    Parameters
    ----------
    timepoints:
        :class:`Timepoint` objects, any order.
    registration:
        ``"rigid"`` (default), ``"affine"``, ``"deformable"`` (opt-in) or ``"none"`` (the
        no-registration control: positions are compared in scanner coordinates).
    threshold:
        Absolute heatmap value that counts as activated, for every visit; default half the
        baseline's maximum.
    body_threshold:
        CT body mask (HU) for registration and correlations; ``None`` for MR (then Otsu).
    label_map:
        ``(X, Y, Z)`` integer regions on the baseline grid, for per-region sums.
    out:
        Folder for the difference maps, tables, plots and HTML report (``None``: nothing written).
    """
    tps = sorted(timepoints, key=lambda t: t.date)
    _check_comparable(tps)
    base = tps[0]
    thr = float(threshold) if threshold is not None else 0.5 * float(base.heatmap.max())
    if not thr > 0:
        raise InputError("The baseline heatmap is all zero; give an explicit threshold.")
    if body_threshold is None:
        import SimpleITK as sitk

        otsu = sitk.OtsuThresholdImageFilter()
        otsu.Execute(to_sitk(base.image, base.affine_lps))
        body_threshold = float(otsu.GetThreshold())
    body = base.image > body_threshold
    regs = [register(base.image, base.affine_lps, base.image, base.affine_lps, kind="none")]
    on_base = [base.heatmap.astype(np.float32)]
    for tp in tps[1:]:
        reg = register(base.image, base.affine_lps, tp.image, tp.affine_lps, kind=registration,
                       body_threshold=body_threshold)  # fmt: skip
        regs.append(reg)
        on_base.append(_resample(tp.heatmap, tp, base, reg))
    centroids = [M.weighted_centroid(tp.heatmap, tp.affine_lps) for tp in tps]
    peaks = [M.peak_position(tp.heatmap, tp.affine_lps) for tp in tps]
    # positions of each visit mapped into baseline space
    cen_b = [c if i == 0 else regs[i].inverse_points(c)[0] for i, c in enumerate(centroids)]
    peak_b = [p if i == 0 else regs[i].inverse_points(p)[0] for i, p in enumerate(peaks)]
    active = [m >= thr for m in on_base]
    rows: list[dict[str, Any]] = []
    for i, tp in enumerate(tps):
        vol = M.activated_volume_ml(tp.heatmap, tp.affine_lps, thr)
        dice, iou = M.dice_iou(active[0], active[i])
        pearson, spearman = M.pearson_spearman(on_base[0], on_base[i], body)
        row: dict[str, Any] = {
            "visit": tp.label,
            "date": tp.date.isoformat(),
            "days": (tp.date - base.date).days,
            "probability": tp.probability,
            "volume_ml": vol,
            "heat_sum": float(np.clip(tp.heatmap, 0, None).sum() * tp.voxel_volume_ml),
            "centroid_lps": [round(float(v), 3) for v in cen_b[i]],
            "centroid_shift_mm": float(np.linalg.norm(cen_b[i] - cen_b[0])),
            "peak_shift_mm": float(np.linalg.norm(peak_b[i] - peak_b[0])),
            "dice": dice,
            "iou": iou,
            "pearson": pearson,
            "spearman": spearman,
            "registration": regs[i].kind if i else "baseline",
            "registration_metric": regs[i].final_metric,
            "registration_round_trip_mm": regs[i].round_trip_mm,
        }
        if i:
            prev = rows[-1]
            row["volume_change_pct"] = _pct(vol, rows[0]["volume_ml"])
            row["volume_change_pct_prev"] = _pct(vol, prev["volume_ml"])
            row["centroid_shift_mm_prev"] = float(np.linalg.norm(cen_b[i] - cen_b[i - 1]))
            row["dice_prev"] = M.dice_iou(active[i - 1], active[i])[0]
        else:
            row.update(volume_change_pct=0.0, volume_change_pct_prev=None,
                       centroid_shift_mm_prev=None, dice_prev=None)  # fmt: skip
        if label_map is not None:
            sums = M.region_sums(on_base[i], label_map, base.voxel_volume_ml)
            row.update({f"region_{k}_sum": v for k, v in sums.items()})
        rows.append(row)
    days = np.array([r["days"] for r in rows], float)
    trends = {}
    for key in TREND_METRICS:
        values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], float)
        slope, intercept = M.theil_sen(days, values)
        trends[key] = {"slope_per_day": slope, "intercept": intercept}
    result = LongitudinalResult(
        rows=rows,
        trends=trends,
        registrations=regs[1:],
        on_baseline=on_base,
        difference_maps=[m - on_base[0] for m in on_base[1:]],
        threshold=thr,
        baseline=base,
        timepoints=tps,
    )
    if out is not None:
        from medcam.longitudinal.report import write_report

        result.outputs = write_report(result, out, formats)
    return result
