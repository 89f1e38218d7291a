"""Longitudinal comparison on phantoms with known motion and a lesion shrinking by known amounts.

Each visit has its own grid (spacing, field of view) and the patient moved by a known rigid
motion; the heatmap covers the lesion exactly (a sphere of known radius), so every metric has a
closed-form answer.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medcam.data.synthetic import (
    LPS_TO_RAS,
    Geometry,
    rigid_motion,
    sphere_heatmap,
    torso_phantom,
)
from medcam.errors import InputError
from medcam.longitudinal import Timepoint, compare, register
from medcam.longitudinal.registration import to_sitk

LESION = (-45.0, -10.0, 15.0)  # patient coordinates, in the liver
BASE_DATE = datetime.date(2026, 1, 5)
VISITS = [  # days, lesion radius (mm), patient motion, grid
    (0, 16.0, None, Geometry((120, 96, 64), (2.0, 2.0, 2.5), (-140.0, -100.0, -70.0))),
    (60, 14.0, rigid_motion((3, -2, 5), (8, -5, 12)),
     Geometry((110, 100, 56), (2.2, 2.1, 3.0), (-135.0, -110.0, -75.0))),
    (120, 12.0, rigid_motion((-2, 3, -4), (-6, 4, -9)),
     Geometry((126, 92, 70), (1.9, 2.2, 2.2), (-130.0, -95.0, -72.0))),
    (180, 10.0, rigid_motion((1, 1, -3), (5, 8, -4)),
     Geometry((116, 98, 60), (2.1, 2.0, 2.8), (-138.0, -102.0, -80.0))),
]  # fmt: skip


@pytest.fixture(scope="module")
def visits() -> list[Timepoint]:
    out = []
    for i, (days, radius, motion, g) in enumerate(VISITS):
        image = torso_phantom(g, motion, LESION, radius, seed=i)
        heat = sphere_heatmap(g, LESION, radius, motion)
        date = BASE_DATE + datetime.timedelta(days=days)
        provenance = {"patient": "P1", "method": "gradcam"}
        out.append(
            Timepoint(image, g.affine_lps, heat, date, provenance, probability=0.9 - 0.1 * i)
        )
    return out


@pytest.fixture(scope="module")
def registered(visits, tmp_path_factory):
    out = tmp_path_factory.mktemp("longitudinal")
    return compare(visits[::-1], threshold=0.5, out=out), out  # any order: sorted by date


def test_registration_recovers_known_motion(registered, visits):
    result, _ = registered
    base = VISITS[0][3]
    pts = base.world_points_lps()[visits[0].image > -500][::300]
    errors = []
    for (_, _, motion, _), reg in zip(VISITS[1:], result.registrations, strict=True):
        truth = pts @ motion[:3, :3].T + motion[:3, 3]
        errors.append(np.linalg.norm(reg.map_points(pts) - truth, axis=1).mean())
        assert reg.round_trip_mm < 0.5
    assert np.mean(errors) <= 0.5 and max(errors) <= 0.5


def test_volume_centroid_and_trend_match_the_truth(registered):
    result, _ = registered
    r0 = VISITS[0][1]
    for (days, radius, _, _), row in zip(VISITS, result.rows, strict=True):
        assert row["days"] == days
        true_ml = 4 / 3 * np.pi * radius**3 / 1000
        assert row["volume_ml"] == pytest.approx(true_ml, rel=0.03)
        true_pct = 100 * (radius**3 - r0**3) / r0**3
        assert abs(row["volume_change_pct"] - true_pct) <= 2.0  # percentage points
        assert row["centroid_shift_mm"] <= 0.5  # the lesion shrinks in place
    # Theil-Sen slope of the volume: the median of pairwise slopes of the true volumes
    true_ml = [4 / 3 * np.pi * r**3 / 1000 for _, r, _, _ in VISITS]
    days = [d for d, _, _, _ in VISITS]
    pair = [
        (true_ml[j] - true_ml[i]) / (days[j] - days[i]) for i in range(4) for j in range(i + 1, 4)
    ]
    slope = result.trends["volume_ml"]["slope_per_day"]
    assert slope < 0 and slope == pytest.approx(np.median(pair), rel=0.05)
    assert result.trends["probability"]["slope_per_day"] == pytest.approx(-0.1 / 60, rel=1e-6)
    # Dice falls as the lesion shrinks: (2 r^3) / (r0^3 + r^3) for nested spheres
    for (_, radius, _, _), row in zip(VISITS[1:], result.rows[1:], strict=True):
        assert row["dice"] == pytest.approx(2 * radius**3 / (r0**3 + radius**3), abs=0.03)


def test_no_registration_control_reports_the_false_shift(visits):
    control = compare(visits, registration="none", threshold=0.5)
    shifts = [row["centroid_shift_mm"] for row in control.rows[1:]]
    assert min(shifts) > 5.0  # the patient moved, not the lesion: proves the test can fail
    # the activated volume is measured on each visit's own grid: registration-independent
    assert [r["volume_ml"] for r in control.rows] == pytest.approx(
        [4 / 3 * np.pi * r**3 / 1000 for _, r, _, _ in VISITS], rel=0.03
    )


def test_outputs(registered, visits):
    _, out = registered
    names = {p.name for p in out.iterdir()}
    assert {
        "longitudinal.csv",
        "longitudinal.json",
        "trends.png",
        "visits.png",
        "report.html",
    } <= names
    diffs = sorted(out.glob("difference_*.nii.gz"))
    assert len(diffs) == 3
    img = nib.load(diffs[-1])
    assert img.shape == visits[0].heatmap.shape
    np.testing.assert_allclose(img.affine, LPS_TO_RAS @ visits[0].affine_lps, atol=1e-5)
    assert float(np.asarray(img.dataobj).min()) < -0.9  # the lesion shrank: negative change
    record = json.loads((out / "longitudinal.json").read_text())
    assert record["threshold"] == 0.5 and len(record["rows"]) == 4
    assert "centroid_shift_mm" in record["metrics"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "What each metric measures" in page
    assert "2026-07-04" in (out / "longitudinal.csv").read_text()


def test_region_sums_with_a_label_map(visits):
    labels = np.zeros(visits[0].heatmap.shape, np.int16)
    labels[visits[0].heatmap > 0] = 1  # the baseline lesion
    result = compare(visits[:2], threshold=0.5, label_map=labels)
    base_sum = result.rows[0]["region_1_sum"]
    assert base_sum == pytest.approx(float(visits[0].heatmap.sum() * visits[0].voxel_volume_ml))
    assert result.rows[1]["region_1_sum"] < base_sum


def test_mixed_visits_are_refused(visits):
    other = Timepoint(visits[1].image, visits[1].affine_lps, visits[1].heatmap,
                      visits[1].date, {"patient": "P2", "method": "gradcam"})  # fmt: skip
    with pytest.raises(InputError, match="mix patients"):
        compare([visits[0], other])
    layercam = Timepoint(visits[1].image, visits[1].affine_lps, visits[1].heatmap,
                         visits[1].date, {"patient": "P1", "method": "layercam"})  # fmt: skip
    with pytest.raises(InputError, match="mix CAM methods"):
        compare([visits[0], layercam])
    with pytest.raises(InputError, match="at least one follow-up"):
        compare([visits[0]])
    with pytest.raises(InputError, match="share a date"):
        compare([visits[0], Timepoint(visits[1].image, visits[1].affine_lps, visits[1].heatmap,
                                      visits[0].date, {"patient": "P1"})])  # fmt: skip


def test_nibabel_brain_moved_by_a_known_transform():
    data_dir = Path(nib.__file__).parent / "tests" / "data"
    img = nib.load(data_dir / "anatomical.nii")
    data = np.asarray(img.dataobj, np.float32)
    aff = LPS_TO_RAS @ img.affine
    centre = (aff @ np.append((np.array(data.shape) - 1) / 2, 1.0))[:3]
    motion = rigid_motion((4, -3, 6), (3, -4, 2), centre)
    inv = np.linalg.inv(motion)
    pull = sitk.AffineTransform(3)
    pull.SetMatrix(inv[:3, :3].flatten().tolist())
    pull.SetTranslation(inv[:3, 3].tolist())
    moved_aff = aff.copy()
    moved_aff[:3, 3] += [-3.0, 2.0, 1.0]  # and a different grid
    ref = to_sitk(np.zeros(data.shape, np.float32), moved_aff)
    moved = sitk.Resample(to_sitk(data, aff), ref, pull, sitk.sitkLinear, 0.0)
    follow = np.transpose(sitk.GetArrayFromImage(moved), (2, 1, 0))
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(to_sitk(data, aff))
    reg = register(data, aff, follow, moved_aff, body_threshold=otsu.GetThreshold())
    pts = np.argwhere(data > otsu.GetThreshold())[::10] @ aff[:3, :3].T + aff[:3, 3]
    truth = pts @ motion[:3, :3].T + motion[:3, 3]
    assert np.linalg.norm(reg.map_points(pts) - truth, axis=1).mean() < 1.0


def test_deformable_is_opt_in_and_runs(visits):
    result = compare(visits[:2], registration="deformable", threshold=0.5)
    reg = result.registrations[0]
    assert reg.kind == "deformable"
    # the B-spline has no closed-form inverse: the fixed-point inverse must undo map_points
    pts = VISITS[0][3].world_points_lps()[visits[0].image > -500][::5000]
    np.testing.assert_allclose(reg.inverse_points(reg.map_points(pts)), pts, atol=1e-2)
    assert result.rows[1]["centroid_shift_mm"] < 2.0
    assert abs(result.rows[1]["volume_change_pct"] - 100 * (14**3 - 16**3) / 16**3) <= 2.0
