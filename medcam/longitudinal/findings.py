"""Findings: separate activated regions, tracked across visits with a stable number and UID.

At each visit the activated voxels (heatmap >= threshold, on the visit's own grid) are split into
connected regions (6-connected; regions under ``min_volume_ml``, 0.5 mL by default, are not
tracked: specks of partial volume or noise would flood the list). Regions
of a follow-up are matched to the findings seen so far on the baseline grid, after registration:
a region continues a finding when it overlaps the finding's last activated region or its
centroid lies within ``match_distance_mm`` of the finding's last centroid. As in RECIST 1.1
follow-up and lesion-tracking tools:

* one-to-one matches (best overlap first) continue a finding ("present"; "reappeared" after a
  visit without it);
* further regions matching an already-continued finding are its fragments (volume summed,
  ``parts`` > 1: "split");
* a finding whose match was taken by another finding has "merged" into it (its volume is
  counted there);
* unmatched regions start new findings ("new"); an unmatched finding is "resolved" (no
  activation above the threshold where it was), or "not imaged" when its last position lies
  outside the follow-up's field of view: not seen is not gone.

Finding numbers follow the order of appearance (at baseline: largest first). Each finding has a
UID, derived from ``uid_seed`` and its number, that stays the same at every visit (the DICOM SR
TrackingUID) and across re-runs on the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medcam.longitudinal.metrics import trend_per_30_days

__all__ = ["Finding", "FindingVisit", "Region", "label_regions", "track_findings"]

PRESENT = ("present", "new", "reappeared")
SMALL = "too small to track"


@dataclass
class Region:
    """One connected activated region of one visit (own grid)."""

    label: int
    voxels: int
    volume_ml: float
    centroid_lps: np.ndarray  # heatmap-weighted, the visit's own LPS space
    centroid_base: np.ndarray  # the same point in baseline space
    peak: float

    @property
    def radius_mm(self) -> float:
        return float((3 * self.volume_ml * 1000 / (4 * np.pi)) ** (1 / 3))


@dataclass
class FindingVisit:
    """A finding at one visit.

    ``status``: "present", "new", "reappeared", "resolved", "not imaged", "merged" (its region
    is counted in finding ``merged_into``), "too small to track" (activation remains where it
    was, only in regions under the tracking size; its volume is measured on the baseline grid)
    or "not yet seen". ``volume_ml`` is 0 when resolved or not yet seen and ``None`` when not
    imaged or merged; changes are ``None`` where undefined (from zero, or without a value).
    """

    status: str
    volume_ml: float | None = None
    change_pct_baseline: float | None = None
    change_pct_previous: float | None = None
    centroid_lps: list[float] | None = None
    shift_mm: float | None = None
    peak: float | None = None
    parts: int = 0
    labels: list[int] = field(default_factory=list)
    merged_into: int | None = None
    borderline: bool = False
    note: str = ""


@dataclass
class Finding:
    """A tracked finding: its number, stable UID and one :class:`FindingVisit` per visit."""

    number: int
    uid: str
    first_visit: int
    visits: list[FindingVisit]
    trend_ml_per_30d: float | None = None
    trend_note: str = ""

    @property
    def name(self) -> str:
        return f"Finding {self.number}"


def label_regions(heat: np.ndarray, threshold: float, voxel_ml: float, min_volume_ml: float):
    """Connected regions of ``heat >= threshold``: ``(labels (X, Y, Z) int32, [(label, voxels,
    peak, weighted centroid index (3,))])``, regions smaller than ``min_volume_ml`` removed
    and labels renumbered 1..n by decreasing volume."""
    import SimpleITK as sitk

    heat = np.asarray(heat, np.float32)
    mask = heat >= threshold
    labels = np.zeros(heat.shape, np.int32)
    if not mask.any():
        return labels, []
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
    raw = np.transpose(sitk.GetArrayFromImage(sitk.ConnectedComponent(img, False)), (2, 1, 0))
    idx = np.nonzero(raw)
    lab = raw[idx]
    w = heat[idx].astype(np.float64)
    n = int(lab.max()) + 1
    counts = np.bincount(lab, minlength=n)
    wsum = np.bincount(lab, weights=w, minlength=n)
    cent = np.stack([np.bincount(lab, weights=w * idx[d], minlength=n) for d in range(3)], 1)
    peaks = np.zeros(n)
    np.maximum.at(peaks, lab, w)
    keep = [k for k in range(1, n) if counts[k] * voxel_ml >= min_volume_ml and counts[k] > 0]
    keep.sort(key=lambda k: (-counts[k], k))
    remap = np.zeros(n, np.int32)
    out = []
    for new, k in enumerate(keep, start=1):
        remap[k] = new
        out.append((new, int(counts[k]), float(peaks[k]), cent[k] / wsum[k]))
    labels = remap[raw]
    return labels, out


@dataclass
class _Track:
    number: int
    first_visit: int
    last_visit: int  # last visit where it was present
    last_labels: list[int]
    centroid_base: np.ndarray
    radius_mm: float
    statuses: dict[int, FindingVisit] = field(default_factory=dict)


def _inside(point_lps: np.ndarray, affine_lps: np.ndarray, shape) -> bool:
    idx = (np.linalg.inv(affine_lps) @ np.append(point_lps, 1.0))[:3]
    return bool(np.all(idx >= -0.5) and np.all(idx <= np.asarray(shape) - 0.5))


def _pct(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return 100.0 * (value - reference) / reference


def track_findings(
    regions: Sequence[Sequence[Region]],
    labels_on_base: Sequence[np.ndarray],
    on_base: Sequence[np.ndarray],
    days: Sequence[int],
    grids: Sequence[tuple[np.ndarray, tuple[int, ...]]],
    to_followup: Sequence,
    threshold: float,
    *,
    uid_seed: str,
    match_distance_mm: float = 10.0,
) -> list[Finding]:
    """Track regions across visits (baseline first).

    Parameters
    ----------
    regions:
        Per visit, its :class:`Region` list (labels as in ``labels_on_base``).
    labels_on_base:
        Per visit, its region labels resampled onto the baseline grid (nearest neighbour).
    on_base:
        Per visit, its heatmap on the baseline grid (to tell borderline calls).
    days:
        Days since baseline, per visit.
    grids:
        Per visit, ``(affine_lps, shape)`` of its own grid (field of view).
    to_followup:
        Per visit, a callable mapping baseline LPS points ``(N, 3)`` into that visit's space.
    threshold:
        The activation threshold (heatmap units).
    """
    from pydicom.uid import generate_uid

    tracks: list[_Track] = []
    n_visits = len(regions)
    base_voxel_ml = abs(float(np.linalg.det(grids[0][0][:3, :3]))) / 1000.0
    for v in range(n_visits):
        regs = list(regions[v])
        by_label = {r.label: r for r in regs}
        assigned: dict[int, list[int]] = {}  # track index -> region labels
        merged: dict[int, int] = {}  # track index -> track index it merged into
        if v == 0:
            pairs = []
        else:
            lab_b = labels_on_base[v]
            pairs = []
            for t_i, t in enumerate(tracks):
                t_mask = np.isin(labels_on_base[t.last_visit], t.last_labels)
                hits = np.bincount(lab_b[t_mask].ravel(), minlength=len(regs) + 1)
                t_size = max(int(t_mask.sum()), 1)
                for r in regs:
                    overlap = int(hits[r.label]) if r.label < len(hits) else 0
                    dist = float(np.linalg.norm(r.centroid_base - t.centroid_base))
                    if overlap > 0 or dist <= match_distance_mm:
                        frac = overlap / min(t_size, max(r.voxels, 1))
                        pairs.append((-frac, dist, t_i, r.label))
            pairs.sort()
            used_regions: set[int] = set()
            for _, _, t_i, lab in pairs:  # one-to-one, best first
                if t_i not in assigned and lab not in used_regions:
                    assigned[t_i] = [lab]
                    used_regions.add(lab)
            for _, _, t_i, lab in pairs:  # fragments of a continued finding
                if lab not in used_regions and t_i in assigned:
                    assigned[t_i].append(lab)
                    used_regions.add(lab)
            owner = {lab: t_i for t_i, labs in assigned.items() for lab in labs}
            for _, _, t_i, lab in pairs:  # findings whose region another finding took
                present_before = tracks[t_i].last_visit == v - 1
                if t_i not in assigned and t_i not in merged and lab in owner and present_before:
                    merged[t_i] = owner[lab]
        # regions that continue nothing start new findings (largest first: labels are sorted)
        taken = {lab for labs in assigned.values() for lab in labs}
        for r in regs:
            if r.label not in taken:
                tracks.append(_Track(len(tracks) + 1, v, v, [r.label], r.centroid_base,
                                     r.radius_mm))  # fmt: skip
                assigned[len(tracks) - 1] = [r.label]
        for t_i, t in enumerate(tracks):
            if t_i in assigned:
                labs = assigned[t_i]
                parts = [by_label[lab] for lab in labs]
                vol = float(sum(p.volume_ml for p in parts))
                w = np.array([p.volume_ml for p in parts])
                cen = (np.array([p.centroid_base for p in parts]) * w[:, None]).sum(0) / w.sum()
                peak = max(p.peak for p in parts)
                if t.first_visit == v:
                    status = "new" if v > 0 else "present"
                else:
                    before = t.statuses.get(v - 1)
                    gone = before is not None and before.status == "resolved"
                    status = "reappeared" if gone else "present"
                fv = FindingVisit(status, vol, centroid_lps=[round(float(c), 3) for c in cen],
                                  peak=peak, parts=len(parts), labels=list(labs))  # fmt: skip
                if status == "new" and peak < 1.25 * threshold:
                    fv.borderline = True
                    fv.note = f"peak {peak / threshold:.0%} of the threshold"
                t.last_visit, t.last_labels, t.centroid_base = v, list(labs), cen
                t.radius_mm = float((3 * vol * 1000 / (4 * np.pi)) ** (1 / 3))
                t.statuses[v] = fv
            elif v < t.first_visit:
                continue
            elif t_i in merged:
                t.statuses[v] = FindingVisit("merged", None, merged_into=tracks[merged[t_i]].number)
            else:
                affine, shape = grids[v]
                point = np.asarray(to_followup[v](t.centroid_base[None]))[0]
                if not _inside(point, affine, shape):
                    t.statuses[v] = FindingVisit("not imaged", None,
                                                 note="outside the field of view")  # fmt: skip
                    continue
                where = np.isin(labels_on_base[t.last_visit], t.last_labels)
                residual = float(on_base[v][where].max()) if where.any() else 0.0
                if residual >= threshold:  # still activated there: not resolved
                    covering = set(np.unique(labels_on_base[v][where]).tolist()) - {0}
                    owners = [tracks[i].number for i, labs in assigned.items()
                              if covering & set(labs)]  # fmt: skip
                    if owners:
                        t.statuses[v] = FindingVisit("merged", None, merged_into=min(owners))
                        continue
                    active = float((on_base[v][where] >= threshold).sum()) * base_voxel_ml
                    t.statuses[v] = FindingVisit(
                        SMALL, active, peak=residual,
                        note="activation remains there, in regions under the tracking size "
                        "(volume on the baseline grid)",
                    )  # fmt: skip
                    continue
                fv = FindingVisit("resolved", 0.0, peak=residual)
                if residual >= 0.8 * threshold:
                    fv.borderline = True
                    fv.note = f"heat there reaches {residual / threshold:.0%} of the threshold"
                t.statuses[v] = fv
    findings = []
    for t in tracks:
        visits = []
        for v in range(n_visits):
            visits.append(t.statuses.get(v) or FindingVisit("not yet seen", 0.0))
        first = visits[t.first_visit]
        base_vol = visits[0].volume_ml
        prev: float | None = None
        for v, fv in enumerate(visits):
            if v > 0 and fv.volume_ml is not None:
                fv.change_pct_baseline = _pct(fv.volume_ml, base_vol) if v else None
                fv.change_pct_previous = _pct(fv.volume_ml, prev)
            if fv.centroid_lps is not None and first.centroid_lps is not None:
                fv.shift_mm = float(np.linalg.norm(np.subtract(fv.centroid_lps,
                                                               first.centroid_lps)))  # fmt: skip
            if fv.volume_ml is not None:
                prev = fv.volume_ml
        measured = [(days[v], fv.volume_ml) for v, fv in enumerate(visits)
                    if fv.volume_ml is not None]  # fmt: skip
        slope, note = trend_per_30_days([d for d, _ in measured], [x for _, x in measured])
        uid = generate_uid(entropy_srcs=[uid_seed, "finding", str(t.number)])
        findings.append(Finding(t.number, uid, t.first_visit, visits, slope, note))
    return findings
