"""Metrics comparing heatmaps across visits; each says what it measures.

Conventions: heatmaps are ``(X, Y, Z)`` on their scan's grid with a voxel-to-LPS affine;
positions are LPS mm; an activated voxel is one whose heatmap value is at or above a threshold
in the heatmap's own units (the same absolute threshold for every visit, so raw, un-normalised
maps are compared on one scale). A number that does not exist (the centroid of an empty map, a
percent change from zero) is ``None``, never a placeholder.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "METRIC_DESCRIPTIONS",
    "activated_volume_ml",
    "dice_iou",
    "peak_position",
    "pearson_spearman",
    "region_sums",
    "theil_sen",
    "thresholded_centroid",
    "trend_per_30_days",
    "weighted_centroid",
]

METRIC_DESCRIPTIONS = {
    "days": "Days since the baseline visit.",
    "probability": "Model probability of the explained class at this visit.",
    "volume_ml": "Activated volume: mL of tissue where the heatmap >= threshold, counted on the "
    "visit's own grid (no resampling). 0 means no activation above the threshold.",
    "findings": "Number of separate activated regions (findings) at this visit.",
    "volume_change_pct": "Activated volume change vs the baseline, in percent (absent when the "
    "baseline has no activation: a change from nothing is 'new', not a percentage).",
    "volume_change_pct_prev": "Activated volume change vs the previous visit, in percent.",
    "centroid_lps": "Heatmap-weighted centroid of the activated region (heatmap >= threshold), "
    "LPS mm in baseline space; absent when nothing is activated.",
    "centroid_shift_mm": "Distance (mm) between the activated-region centroids of this visit "
    "and the baseline, after mapping this visit into baseline space with the registration: "
    "where the model looks moved by this much relative to the anatomy. Absent when either "
    "visit has no activation.",
    "centroid_shift_mm_prev": "Same as centroid_shift_mm, vs the previous visit.",
    "peak_shift_mm": "Distance (mm) between the heatmap maxima, in baseline space (sensitive to "
    "noise; the centroid is the robust one). Absent when either map is empty.",
    "dice": "Dice overlap of the activated regions on the baseline grid: 1 = same region, 0 = "
    "disjoint. A shrinking lesion lowers it even when the model looks at the same place. Absent "
    "when neither visit has activation.",
    "iou": "Intersection over union of the activated regions, on the baseline grid.",
    "dice_prev": "Dice overlap with the previous visit.",
    "pearson": "Pearson correlation of the heatmaps inside the baseline body mask, on the "
    "baseline grid: similarity of the whole pattern, insensitive to overall scale.",
    "spearman": "Spearman rank correlation of the heatmaps inside the body mask: like Pearson, "
    "robust to monotone rescaling; barely moves when a small lesion shrinks.",
    "heat_sum": "Sum of heatmap values times voxel volume (value x mL): total evidence.",
    "threshold_sensitivity": "Change of the activated volume, as a fraction of itself, when the "
    "threshold moves from +10 % to -10 %: near 0.1-0.5 for compact activations, above 1 when "
    "diffuse heat sits near the threshold (the volume is then a property of the threshold).",
    "registration_similarity": "Pearson correlation of the baseline image and the registered "
    "follow-up inside the baseline body (1 = aligned up to a linear intensity change).",
    "registration_disagreement_mm": "Largest distance between where the rigid and the affine "
    "registrations put the findings (or the body centre): where the result depends on the "
    "transform model.",
    "registration_scale": "Linear scale of the affine registration (1.04: the follow-up's anatomy "
    "is 4 % larger; volumes then differ by about 12 % for that reason alone).",
    "registration_inverse_consistency_mm": "Mean distance by which the transform's inverse "
    "composed with it misses the identity (0 for rigid/affine; the B-spline inverse's residual).",
    "registration_coverage": "Fraction of the baseline body inside the follow-up's field of view.",
    "registration_metric": "The optimiser's final metric (correlation: -NCC^2; lower is better).",
}


def activated_volume_ml(heat: np.ndarray, affine_lps: np.ndarray, threshold: float) -> float:
    """mL of voxels with ``heat >= threshold`` on the map's own grid."""
    voxel_ml = abs(float(np.linalg.det(affine_lps[:3, :3]))) / 1000.0
    return float((np.asarray(heat) >= threshold).sum()) * voxel_ml


def weighted_centroid(heat: np.ndarray, affine_lps: np.ndarray) -> np.ndarray | None:
    """Heatmap-weighted centroid (negative values ignored), LPS mm; ``None`` for an empty map."""
    w = np.clip(np.asarray(heat, np.float64), 0, None)
    total = w.sum()
    if total <= 0:
        return None
    c = [(w.sum(axis=tuple(a for a in range(3) if a != d)) * np.arange(n)).sum() / total
         for d, n in enumerate(w.shape)]  # fmt: skip
    return (affine_lps @ np.append(c, 1.0))[:3]


def thresholded_centroid(
    heat: np.ndarray, affine_lps: np.ndarray, threshold: float
) -> np.ndarray | None:
    """Heatmap-weighted centroid of the voxels ``>= threshold`` (LPS mm), ``None`` if none.

    Diffuse low heat elsewhere does not pull it: 5 % background over a torso moved the
    whole-map centroid 11 mm off a lesion that did not move.
    """
    heat = np.asarray(heat, np.float64)
    return weighted_centroid(np.where(heat >= threshold, heat, 0.0), affine_lps)


def peak_position(heat: np.ndarray, affine_lps: np.ndarray) -> np.ndarray | None:
    """LPS position of the heatmap maximum; ``None`` when the map has no positive value."""
    heat = np.asarray(heat)
    if not heat.size or float(heat.max()) <= 0:
        return None
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return (affine_lps @ np.append(np.asarray(peak, float), 1.0))[:3]


def dice_iou(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """Dice and IoU of two boolean masks on one grid; ``None`` when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    if total == 0:
        return None, None
    union = np.logical_or(a, b).sum()
    return float(2 * inter / total), float(inter / union)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def pearson_spearman(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None):
    """Pearson and Spearman correlation of two maps on one grid, inside ``mask``.

    ``nan`` when either map is constant there (a correlation does not exist).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a, b = a.ravel(), b.ravel()
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan"), float("nan")
    pearson = float(np.corrcoef(a, b)[0, 1])
    spearman = float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
    return pearson, spearman


def region_sums(heat: np.ndarray, labels: np.ndarray, voxel_ml: float) -> dict[int, float]:
    """Sum of heatmap x mL in each non-zero label of ``labels`` (same grid)."""
    out = {}
    for lab in np.unique(labels):
        if lab != 0:
            out[int(lab)] = float(np.asarray(heat)[labels == lab].sum() * voxel_ml)
    return out


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Theil-Sen line: the median of pairwise slopes, and the median intercept.

    Robust to one outlying visit; NaN with fewer than two distinct x values.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx != 0
    if not ok.any():
        return float("nan"), float("nan")
    slope = float(np.median((y[j] - y[i])[ok] / dx[ok]))
    return slope, float(np.median(y - slope * x))


def trend_per_30_days(days, values) -> tuple[float | None, str]:
    """Theil-Sen slope x 30 of ``values`` vs ``days``, only when its sign agrees with the data.

    Returns ``(slope per 30 days, note)``. The slope is ``None`` when fewer than two visits have
    a value, or when its sign contradicts the net change from the first to the last visit
    (e.g. a lesion that grew to 2.4x and then fell 38 % below baseline: Theil-Sen's median of
    pairwise slopes is positive, the course is not); the note then describes the course.
    """
    pairs = [(float(d), float(v)) for d, v in zip(days, values, strict=True)
             if v is not None and math.isfinite(float(v))]  # fmt: skip
    if len(pairs) < 2 or len({d for d, _ in pairs}) < 2:
        return None, "one measurement: no trend"
    d = np.array([p[0] for p in pairs])
    v = np.array([p[1] for p in pairs])
    slope, _ = theil_sen(d, v)
    net = v[-1] - v[0]
    scale = max(float(np.abs(v).max()), 1e-12)
    steps = np.diff(v)
    monotone = bool((steps >= -1e-9 * scale).all() or (steps <= 1e-9 * scale).all())
    flat = abs(net) <= 1e-9 * scale
    if flat and monotone:
        return 0.0, "stable"
    if flat or np.sign(slope) != np.sign(net):
        k = int(np.argmax(v)) if (slope > 0 or net < 0 or flat) else int(np.argmin(v))
        if flat and abs(v[k] - v[0]) <= 1e-9 * scale:
            k = int(np.argmin(v))
        turn = "rose" if v[k] >= v[0] else "fell"
        then = "fell" if turn == "rose" else "rose"
        return None, f"no single trend: {turn} until day {d[k]:g}, then {then}"
    if monotone:
        return float(slope * 30.0), "monotone"
    hi, lo = int(np.argmax(v)), int(np.argmin(v))
    extreme = f"highest on day {d[hi]:g}" if 0 < hi < len(v) - 1 else f"lowest on day {d[lo]:g}"
    note = f"not monotone: {extreme}"
    return float(slope * 30.0), note
