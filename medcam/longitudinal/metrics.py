"""Metrics comparing heatmaps across visits; each says what it measures.

Conventions: heatmaps are ``(X, Y, Z)`` on their scan's grid with a voxel-to-LPS affine;
positions are LPS mm; an activated voxel is one whose heatmap value is at or above a threshold
in the heatmap's own units (the same absolute threshold for every visit, so raw, un-normalised
maps are compared on one scale).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "METRIC_DESCRIPTIONS",
    "activated_volume_ml",
    "dice_iou",
    "peak_position",
    "pearson_spearman",
    "region_sums",
    "theil_sen",
    "weighted_centroid",
]

METRIC_DESCRIPTIONS = {
    "days": "Days since the baseline visit.",
    "probability": "Model probability of the explained class at this visit.",
    "volume_ml": "Activated volume: mL of tissue where the heatmap >= threshold, counted on the "
    "visit's own grid (no resampling).",
    "volume_change_pct": "Activated volume change vs the baseline, in percent.",
    "volume_change_pct_prev": "Activated volume change vs the previous visit, in percent.",
    "centroid_shift_mm": "Distance (mm) between the heatmap-weighted centroids of this visit and "
    "the baseline, after mapping this visit into baseline space with the registration: where "
    "the model looks moved by this much relative to the anatomy.",
    "centroid_shift_mm_prev": "Same as centroid_shift_mm, vs the previous visit.",
    "peak_shift_mm": "Distance (mm) between the heatmap maxima, in baseline space (sensitive to "
    "noise; the centroid is the robust one).",
    "dice": "Dice overlap of the activated regions (>= threshold), on the baseline grid: 1 = "
    "same region, 0 = disjoint. A shrinking lesion lowers it even when the model looks at the "
    "same place.",
    "iou": "Intersection over union of the activated regions, on the baseline grid.",
    "pearson": "Pearson correlation of the heatmaps inside the baseline body mask, on the "
    "baseline grid: similarity of the whole pattern, insensitive to overall scale.",
    "spearman": "Spearman rank correlation of the heatmaps inside the body mask: like Pearson, "
    "robust to monotone rescaling; barely moves when a small lesion shrinks.",
    "heat_sum": "Sum of heatmap values times voxel volume (value x mL): total evidence.",
    "registration_metric": "Final Mattes mutual information of the registration (lower = better).",
    "registration_round_trip_mm": "Mean distance (mm) by which forward and backward "
    "registrations composed miss the identity, over the body: a consistency check.",
}


def activated_volume_ml(heat: np.ndarray, affine_lps: np.ndarray, threshold: float) -> float:
    """mL of voxels with ``heat >= threshold`` on the map's own grid."""
    voxel_ml = abs(float(np.linalg.det(affine_lps[:3, :3]))) / 1000.0
    return float((np.asarray(heat) >= threshold).sum()) * voxel_ml


def weighted_centroid(heat: np.ndarray, affine_lps: np.ndarray) -> np.ndarray:
    """Heatmap-weighted centroid (negative values ignored), LPS mm; NaN for an empty map."""
    w = np.clip(np.asarray(heat, np.float64), 0, None)
    total = w.sum()
    if total <= 0:
        return np.full(3, np.nan)
    idx = [np.arange(n, dtype=np.float64) for n in w.shape]
    c = np.array([
        (w.sum(axis=tuple(a for a in range(3) if a != d)) * idx[d]).sum() / total for d in range(3)
    ])  # fmt: skip
    return (affine_lps @ np.append(c, 1.0))[:3]


def peak_position(heat: np.ndarray, affine_lps: np.ndarray) -> np.ndarray:
    """LPS position of the heatmap maximum."""
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return (affine_lps @ np.append(np.asarray(peak, float), 1.0))[:3]


def dice_iou(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks on one grid (1, 1 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    inter, total = np.logical_and(a, b).sum(), a.sum() + b.sum()
    union = np.logical_or(a, b).sum()
    if total == 0:
        return 1.0, 1.0
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
    """Pearson and Spearman correlation of two maps on one grid, inside ``mask``."""
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
