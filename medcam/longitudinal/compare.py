"""Compare one patient's heatmaps across visits: register, measure, track findings, flag, write."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcam.errors import InputError
from medcam.longitudinal import metrics as M
from medcam.longitudinal.findings import Finding, Region, label_regions, track_findings
from medcam.longitudinal.quality import Flag, Limits, UnreliableComparisonError, registration_flags
from medcam.longitudinal.registration import (
    Registration,
    body_mask,
    from_sitk,
    register,
    to_sitk,
)
from medcam.longitudinal.timepoint import COMPARABLE, Timepoint

__all__ = ["LongitudinalResult", "compare"]

TREND_METRICS = ("volume_ml", "heat_sum", "centroid_shift_mm", "dice", "pearson", "probability")
DEFAULT_FORMATS = ("nifti", "dicom-pm", "png", "dicom-sr", "csv", "json", "html")


@dataclass
class LongitudinalResult:
    """Per-visit metrics, tracked findings, quality flags and the maps on the baseline grid.

    Attributes
    ----------
    rows:
        One dict per visit (baseline first), keys as in :data:`METRIC_DESCRIPTIONS`; a value
        that does not exist is ``None``.
    findings:
        Tracked findings (:class:`~medcam.longitudinal.findings.Finding`), stable numbers/UIDs.
    trends:
        Per metric: Theil-Sen ``per_30_days`` (``None`` when its sign would contradict the data)
        and a ``note`` on the course.
    registrations:
        One :class:`Registration` per follow-up.
    flags:
        Reasons to doubt a visit's numbers (registration, threshold, coverage).
    on_baseline:
        Each visit's heatmap resampled onto the baseline grid ``(X, Y, Z)``.
    difference_maps:
        ``follow-up - baseline`` on the baseline grid, one per follow-up.
    threshold:
        The absolute activation threshold used for every visit (``None``: no visit has any
        positive heat).
    threshold_rule:
        How it was chosen, in words.
    display_index:
        Baseline voxel through which the pictures are drawn: the maximum over all visits.
    outputs:
        Written files by kind (when ``out`` was given).
    """

    rows: list[dict[str, Any]]
    findings: list[Finding]
    trends: dict[str, dict[str, Any]]
    registrations: list[Registration]
    flags: list[Flag]
    on_baseline: list[np.ndarray]
    difference_maps: list[np.ndarray]
    threshold: float | None
    threshold_rule: str
    baseline: Timepoint
    timepoints: list[Timepoint]
    limits: Limits
    display_index: tuple[int, int, int]
    labels_on_baseline: list[np.ndarray] = field(default_factory=list)
    own_labels: list[np.ndarray] = field(default_factory=list)
    registration_kind: str = "rigid"
    outputs: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [r["visit"] for r in self.rows]


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
    seen: dict[Any, str] = {}
    for tp in timepoints:
        if tp.date in seen:
            raise InputError(
                f"Visits {seen[tp.date]!r} and {tp.label!r} share the date {tp.date.isoformat()}; "
                "give each visit its own date (one comparison per study date)."
            )
        seen[tp.date] = tp.label
    for tp in timepoints:
        if not np.isfinite(tp.heatmap).all():
            raise InputError(f"The heatmap of visit {tp.label!r} contains NaN or infinite values.")


def _threshold(tps: Sequence[Timepoint], threshold: float | None, fraction: float):
    maxima = [float(np.max(tp.heatmap)) for tp in tps]
    top = int(np.argmax(maxima))
    if threshold is not None:
        if not threshold > 0:
            raise InputError(f"The threshold must be positive (got {threshold}).")
        return float(threshold), f"{threshold:g} (given, heatmap units)"
    if not 0 < fraction <= 1:
        raise InputError(f"threshold_fraction must be in (0, 1] (got {fraction}).")
    if maxima[top] <= 0:
        return None, "none: no visit has any positive heat"
    value = fraction * maxima[top]
    return value, (f"{fraction:g} × the maximum over all visits ({maxima[top]:.4g} at "
                   f"{tps[top].label}) = {value:.4g} heatmap units")  # fmt: skip


def _reference(base: Timepoint):
    return to_sitk(np.zeros(base.heatmap.shape, np.float32), base.affine_lps)


def _resample(array: np.ndarray, tp: Timepoint, reference, reg: Registration, nearest=False):
    import SimpleITK as sitk

    moving = to_sitk(array.astype(np.float32), tp.affine_lps)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return from_sitk(sitk.Resample(moving, reference, reg.transform, interp, 0.0))


def _regions(tp: Timepoint, reg: Registration | None, thr: float, min_ml: float):
    labels, found = label_regions(tp.heatmap, thr, tp.voxel_volume_ml, min_ml)
    regions = []
    for lab, voxels, peak, c_idx in found:
        c = (tp.affine_lps @ np.append(c_idx, 1.0))[:3]
        cb = c if reg is None else reg.inverse_points(c)[0]
        regions.append(Region(lab, voxels, voxels * tp.voxel_volume_ml, c, cb, peak))
    return labels, regions


def _opt(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _dist(a, b) -> float | None:
    return None if a is None or b is None else float(np.linalg.norm(np.subtract(a, b)))


def _pct(value: float, reference: float) -> float | None:
    """Percent change; None when the reference volume is zero (undefined: 'new')."""
    return 100.0 * (value - reference) / reference if reference > 0 else None


def compare(
    timepoints: Sequence[Timepoint],
    *,
    registration: str = "rigid",
    threshold: float | None = None,
    threshold_fraction: float = 0.5,
    body_threshold: float | None = -500.0,
    metric: str = "correlation",
    label_map: np.ndarray | None = None,
    limits: Limits | None = None,
    strict: bool = False,
    min_finding_ml: float = 0.5,
    match_distance_mm: float = 10.0,
    out: str | Path | None = None,
    formats: Sequence[str] | None = None,
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
        Absolute heatmap value that counts as activated, for every visit. Default:
        ``threshold_fraction`` x the maximum over **all** visits (so a new lesion over a
        diffuse baseline is measured against the lesion, not against the diffuse heat).
    body_threshold:
        CT body mask (HU) for registration and correlations; ``None`` for MR (then Otsu).
    metric:
        Registration metric, ``"correlation"`` or ``"mattes"`` (see :func:`register`).
    label_map:
        ``(X, Y, Z)`` integer regions on the baseline grid, for per-region sums.
    limits:
        When a visit is flagged (:class:`Limits`).
    strict:
        Raise :class:`UnreliableComparisonError` instead of returning flagged numbers.
    min_finding_ml:
        Activated regions smaller than this are not tracked as findings (still counted in the
        visit's activated volume). Default 0.5 mL: a 10 mm sphere, RECIST's smallest measurable
        lesion; smaller specks (partial-volume rims, noise) would flood the tracking.
    match_distance_mm:
        A follow-up region continues a finding when they overlap or their centroids are
        closer than this (baseline space).
    out:
        Folder for the outputs (``None``: nothing written).
    formats:
        Which outputs: ``nifti``, ``dicom-pm``, ``png`` (difference maps), ``dicom-sr`` (SEG of
        the findings + TID 1500 measurement report per DICOM visit), ``csv``, ``json``,
        ``html``; default all that apply (DICOM ones only for DICOM visits).
    """
    limits = limits or Limits()
    tps = sorted(timepoints, key=lambda t: t.date)
    _check_comparable(tps)
    base = tps[0]
    thr, rule = _threshold(tps, threshold, threshold_fraction)
    if formats is not None:
        from medcam.longitudinal.report import check_formats

        check_formats(formats, tps)
    t_eff = thr if thr is not None else math.inf
    body = from_sitk(body_mask(to_sitk(base.image, base.affine_lps), body_threshold)).astype(bool)
    reference = _reference(base)
    regs: list[Registration] = []
    on_base = [base.heatmap.astype(np.float32)]
    for tp in tps[1:]:
        reg = register(base.image, base.affine_lps, tp.image, tp.affine_lps, kind=registration,
                       body_threshold=body_threshold, metric=metric)  # fmt: skip
        regs.append(reg)
        on_base.append(_resample(tp.heatmap, tp, reference, reg))
    # findings: regions on each visit's own grid, matched in baseline space
    own_labels, regions, labels_b = [], [], []
    for i, tp in enumerate(tps):
        reg = regs[i - 1] if i else None
        labels, regs_i = _regions(tp, reg, t_eff, min_finding_ml)
        own_labels.append(labels)
        regions.append(regs_i)
        labels_b.append(labels if i == 0 else np.rint(
            _resample(labels, tp, reference, reg, nearest=True)).astype(np.int32))  # fmt: skip
    days = [(tp.date - base.date).days for tp in tps]
    to_follow = [lambda p: np.atleast_2d(p)] + [r.map_points for r in regs]
    findings = track_findings(
        regions, labels_b, on_base, days, [(tp.affine_lps, tp.heatmap.shape) for tp in tps],
        to_follow, t_eff, uid_seed=_uid_seed(tps), match_distance_mm=match_distance_mm,
    )  # fmt: skip
    # where the activation is (baseline space): the points the registration must get right
    points = [np.asarray(fv.centroid_lps) for f in findings for fv in f.visits
              if fv.centroid_lps is not None]  # fmt: skip
    if not points:
        idx = np.argwhere(body).mean(axis=0) if body.any() else (np.array(body.shape) - 1) / 2
        points = [(base.affine_lps @ np.append(idx, 1.0))[:3]]
    points = np.array(points)
    rows = _rows(tps, regs, on_base, body, t_eff, regions, label_map, points)
    flags = _flags(tps, regs, rows, findings, limits, thr)
    trends = {}
    for key in TREND_METRICS:
        per30, note = M.trend_per_30_days(days, [r.get(key) for r in rows])
        trends[key] = {"per_30_days": per30, "note": note,
                       "slope_per_day": None if per30 is None else per30 / 30.0}  # fmt: skip
    peak_map = np.max(np.stack(on_base), axis=0)
    if float(peak_map.max()) > 0:
        display = tuple(int(v) for v in np.unravel_index(int(np.argmax(peak_map)), peak_map.shape))
    else:
        display = tuple(
            round(v)
            for v in (
                np.argwhere(body).mean(axis=0) if body.any() else (np.array(body.shape) - 1) / 2
            )
        )
    result = LongitudinalResult(
        rows=rows, findings=findings, trends=trends, registrations=regs, flags=flags,
        on_baseline=on_base, difference_maps=[m - on_base[0] for m in on_base[1:]],
        threshold=thr, threshold_rule=rule, baseline=base, timepoints=tps, limits=limits,
        display_index=display, labels_on_baseline=labels_b, own_labels=own_labels,
        registration_kind=registration,
    )  # fmt: skip
    serious = [f for f in flags if f.kind in ("registration", "threshold")]
    if strict and serious:
        raise UnreliableComparisonError(
            "Refusing to report (strict): "
            + "; ".join(str(f) for f in serious)
            + ". Rerun without --strict to get the report with its registration check images."
        )
    if out is not None:
        from medcam.longitudinal.report import write_report

        result.outputs = write_report(result, out, formats)
    return result


def _uid_seed(tps: Sequence[Timepoint]) -> str:
    base = tps[0]
    study = ""
    if base.scan is not None and getattr(base.scan, "datasets", None):
        study = str(base.scan.datasets[0].get("StudyInstanceUID", ""))
    prov = base.provenance
    parts = [str(prov.get(k)) for k in ("patient", "model", "layers", "method", "target")]
    return "|".join([*parts, base.date.isoformat(), study])


def _rows(tps, regs, on_base, body, thr, regions, label_map, points) -> list[dict[str, Any]]:
    base = tps[0]
    active = [m >= thr for m in on_base]
    cen_b, peak_b = [], []
    for i, tp in enumerate(tps):
        c = M.thresholded_centroid(tp.heatmap, tp.affine_lps, thr)
        p = M.peak_position(tp.heatmap, tp.affine_lps)
        if i:
            c = None if c is None else regs[i - 1].inverse_points(c)[0]
            p = None if p is None else regs[i - 1].inverse_points(p)[0]
        cen_b.append(c)
        peak_b.append(p)
    rows: list[dict[str, Any]] = []
    for i, tp in enumerate(tps):
        vol = M.activated_volume_ml(tp.heatmap, tp.affine_lps, thr)
        sens = None
        if vol > 0 and math.isfinite(thr):
            lo = M.activated_volume_ml(tp.heatmap, tp.affine_lps, 0.9 * thr)
            hi = M.activated_volume_ml(tp.heatmap, tp.affine_lps, 1.1 * thr)
            sens = (lo - hi) / vol
        dice, iou = M.dice_iou(active[0], active[i])
        pearson, spearman = M.pearson_spearman(on_base[0], on_base[i], body)
        row: dict[str, Any] = {
            "visit": tp.label,
            "date": tp.date.isoformat(),
            "days": (tp.date - base.date).days,
            "probability": tp.probability,
            "volume_ml": vol,
            "activation": "activated" if vol > 0 else "no activation",
            "findings": len(regions[i]),
            "heat_sum": float(np.clip(tp.heatmap, 0, None).sum() * tp.voxel_volume_ml),
            "centroid_lps": None if cen_b[i] is None else [round(float(v), 3) for v in cen_b[i]],
            "centroid_shift_mm": _dist(cen_b[i], cen_b[0]),
            "peak_shift_mm": _dist(peak_b[i], peak_b[0]),
            "dice": dice,
            "iou": iou,
            "pearson": _opt(pearson),
            "spearman": _opt(spearman),
            "threshold_sensitivity": sens,
        }
        if i:
            reg = regs[i - 1]
            prev = rows[-1]
            row.update(
                volume_change_pct=_pct(vol, rows[0]["volume_ml"]),
                volume_change_pct_prev=_pct(vol, prev["volume_ml"]),
                centroid_shift_mm_prev=_dist(cen_b[i], cen_b[i - 1]),
                dice_prev=M.dice_iou(active[i - 1], active[i])[0],
                registration=reg.kind,
                registration_failed=reg.failed,
                registration_similarity=_opt(reg.similarity),
                registration_disagreement_mm=_opt(reg.disagreement_mm(points)),
                registration_scale=_opt(reg.scale),
                registration_inverse_consistency_mm=_opt(reg.inverse_consistency_mm),
                registration_coverage=_opt(reg.coverage),
                registration_metric=_opt(reg.final_metric),
                registration_seconds=round(reg.seconds, 3),
            )  # fmt: skip
        else:
            row.update(
                volume_change_pct=None,
                volume_change_pct_prev=None,
                centroid_shift_mm_prev=None,
                dice_prev=None,
                registration="baseline",
            )
        if label_map is not None:
            sums = M.region_sums(on_base[i], label_map, base.voxel_volume_ml)
            row.update({f"region_{k}_sum": v for k, v in sums.items()})
        row["flags"] = []
        rows.append(row)
    return rows


def _flags(tps, regs, rows, findings, limits: Limits, thr) -> list[Flag]:
    flags: list[Flag] = []
    for i, (tp, row) in enumerate(zip(tps, rows, strict=True)):
        if i:
            dis = row["registration_disagreement_mm"]
            flags += registration_flags(tp.label, regs[i - 1], math.nan if dis is None else dis,
                                        limits)  # fmt: skip
        sens = row["threshold_sensitivity"]
        if sens is not None and sens > limits.max_threshold_sensitivity:
            flags.append(Flag(tp.label, "threshold",
                              f"activated volume depends on the threshold: it changes by "
                              f"{100 * sens:.0f} % of itself when the threshold moves +-10 % "
                              "(diffuse heat near the threshold)"))  # fmt: skip
    for f in findings:
        for i, fv in enumerate(f.visits):
            label = tps[i].label
            if fv.borderline:
                flags.append(
                    Flag(
                        label, "threshold", f"{f.name} called {fv.status} but {fv.note}: borderline"
                    )
                )
            if fv.status == "not imaged":
                flags.append(Flag(label, "coverage",
                                  f"{f.name} lies outside this visit's field of view: not "
                                  "assessable (not 'resolved')"))  # fmt: skip
    if thr is None:
        flags.append(Flag(tps[0].label, "threshold", "no visit has any positive heat: nothing "
                          "to measure"))  # fmt: skip
    by_visit: dict[str, list[str]] = {}
    for fl in flags:
        by_visit.setdefault(fl.visit, []).append(fl.message)
    for row in rows:
        row["flags"] = by_visit.get(row["visit"], [])
    return flags
