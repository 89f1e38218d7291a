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

from medcam.data.synthetic import LPS_TO_RAS, rigid_motion
from medcam.errors import InputError
from medcam.longitudinal import Timepoint, compare, register
from medcam.longitudinal.registration import to_sitk
from tests.longitudinal.phantoms import MOTIONS, Visit, build, grid, truth_volume_ml

LESION = (-45.0, -10.0, 15.0)  # patient coordinates, in the liver
BASE_DATE = datetime.date(2026, 1, 5)
# days, lesion radius (mm), patient motion (12-17 degrees, 20-37 mm), own anisotropic grid
VISITS = [
    (0, 17.0, MOTIONS[0], grid(0, n=72, spacing=4.5)),
    (20, 15.5, MOTIONS[1], grid(1, n=72, spacing=4.5)),
    (35, 14.0, MOTIONS[2], grid(2, n=72, spacing=4.5)),
    (49, 12.5, MOTIONS[3], grid(3, n=72, spacing=4.5)),
]


@pytest.fixture(scope="module")
def visits() -> list[Timepoint]:
    series = [Visit(d, g, m, {"lesion": (LESION, r)}) for d, r, m, g in VISITS]
    return build(series, probabilities=[0.9 - 0.1 * i for i in range(4)])


@pytest.fixture(scope="module")
def registered(visits, tmp_path_factory):
    out = tmp_path_factory.mktemp("longitudinal")
    formats = ["nifti", "png", "csv", "json", "html"]
    return compare(visits[::-1], threshold=0.5, out=out, formats=formats), out  # any order


@pytest.mark.slow
def test_registration_recovers_known_motion(registered, visits):
    result, _ = registered
    base = VISITS[0][3]
    pts = base.world_points_lps()[visits[0].image > -500][::300]
    for (_, _, motion, _), reg, row in zip(VISITS[1:], result.registrations, result.rows[1:],
                                           strict=True):  # fmt: skip
        truth = pts @ motion[:3, :3].T + motion[:3, 3]
        assert np.linalg.norm(reg.map_points(pts) - truth, axis=1).mean() <= 0.5
        # measured quality: consistent, rigid and affine agree, nothing flagged
        assert reg.inverse_consistency_mm < 1e-6  # closed-form inverse of a rigid transform
        assert row["registration_similarity"] > 0.9
        assert row["registration_disagreement_mm"] < 1.0
        assert row["registration_scale"] == pytest.approx(1.0, abs=0.005)
        assert row["flags"] == []
    assert result.flags == []


@pytest.mark.slow
def test_volume_centroid_and_trend_match_the_truth(registered):
    result, _ = registered
    r0 = VISITS[0][1]
    for (days, radius, _, _), row in zip(VISITS, result.rows, strict=True):
        assert row["days"] == days
        assert row["volume_ml"] == pytest.approx(truth_volume_ml(radius), rel=0.04)
        if days:
            true_pct = 100 * (radius**3 - r0**3) / r0**3
            assert abs(row["volume_change_pct"] - true_pct) <= 3.0  # percentage points
        assert row["centroid_shift_mm"] <= 0.6  # the lesion shrinks in place
    # Theil-Sen slope of the volume: the median of pairwise slopes of the true volumes
    true_ml = [truth_volume_ml(r) for _, r, _, _ in VISITS]
    days = [d for d, _, _, _ in VISITS]
    pair = [
        (true_ml[j] - true_ml[i]) / (days[j] - days[i]) for i in range(4) for j in range(i + 1, 4)
    ]
    per30 = result.trends["volume_ml"]["per_30_days"]
    assert per30 < 0 and per30 == pytest.approx(30 * np.median(pair), rel=0.06)
    assert result.trends["probability"]["per_30_days"] < 0
    # Dice falls as the lesion shrinks: (2 r^3) / (r0^3 + r^3) for nested spheres
    for (_, radius, _, _), row in zip(VISITS[1:], result.rows[1:], strict=True):
        assert row["dice"] == pytest.approx(2 * radius**3 / (r0**3 + radius**3), abs=0.04)
    # one finding, tracked at every visit, with the same trend
    (finding,) = result.findings
    assert [v.status for v in finding.visits] == ["present"] * 4
    assert finding.trend_ml_per_30d == pytest.approx(per30, rel=1e-6)


def test_no_registration_control_reports_the_false_shift(visits):
    control = compare(visits, registration="none", threshold=0.5)
    shifts = [row["centroid_shift_mm"] for row in control.rows[1:]]
    assert min(shifts) > 5.0  # the patient moved, not the lesion: proves the test can fail
    # the activated volume is measured on each visit's own grid: registration-independent
    assert [r["volume_ml"] for r in control.rows] == pytest.approx(
        [truth_volume_ml(r) for _, r, _, _ in VISITS], rel=0.04
    )
    assert all("not registered" in r["flags"][0] for r in control.rows[1:])


@pytest.mark.slow
def test_outputs(registered, visits):
    result, out = registered
    names = {p.name for p in out.iterdir()}
    expected = {"longitudinal.csv", "longitudinal.json", "visits.png", "registration.png",
                "findings.png", "trend.png", "report.html"}  # fmt: skip
    assert expected <= names
    diffs = sorted(out.glob("difference_*.nii.gz"))
    assert len(diffs) == 3 and len(sorted(out.glob("difference_*.png"))) == 3
    img = nib.load(diffs[-1])
    assert img.shape == visits[0].heatmap.shape
    np.testing.assert_allclose(img.affine, LPS_TO_RAS @ visits[0].affine_lps, atol=1e-5)
    assert float(np.asarray(img.dataobj).min()) < -0.9  # the lesion shrank: negative change
    # strict JSON: no NaN anywhere
    text = (out / "longitudinal.json").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["threshold"] == 0.5 and len(record["rows"]) == 4
    assert record["rows"][0]["volume_change_pct"] is None  # baseline: nothing to compare
    assert "centroid_shift_mm" in record["metrics"] and record["findings"][0]["uid"]
    assert "2026-02-23" in (out / "longitudinal.csv").read_text()
    # the transforms: SimpleITK reads them back and they map points as the registration does
    pts = VISITS[0][3].world_points_lps()[visits[0].image > -500][::5000]
    for row, reg in zip(result.rows[1:], result.registrations, strict=True):
        tfm = sitk.ReadTransform(str(out / f"registration_{row['visit']}.tfm"))
        moved = np.array([tfm.TransformPoint([float(v) for v in p]) for p in pts])
        np.testing.assert_allclose(moved, reg.map_points(pts), atol=1e-4)


def test_region_sums_with_a_label_map(visits):
    labels = np.zeros(visits[0].heatmap.shape, np.int16)
    labels[visits[0].heatmap > 0] = 1  # the baseline lesion
    result = compare(visits[:2], threshold=0.5, label_map=labels, registration="none")
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
    with pytest.raises(InputError, match="share the date"):
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


@pytest.mark.slow
def test_deformable_is_opt_in_and_runs(visits):
    result = compare(visits[:2], registration="deformable", threshold=0.5)
    reg = result.registrations[0]
    assert reg.kind == "deformable"
    # the B-spline has no closed-form inverse: the fixed-point inverse must undo map_points
    pts = VISITS[0][3].world_points_lps()[visits[0].image > -500][::5000]
    np.testing.assert_allclose(reg.inverse_points(reg.map_points(pts)), pts, atol=1e-2)
    assert reg.inverse_consistency_mm < 0.05  # measured on the B-spline itself
    assert reg.check is not None and result.rows[1]["registration_disagreement_mm"] < 2.0
    assert result.rows[1]["centroid_shift_mm"] < 2.0
    r0, r1 = VISITS[0][1], VISITS[1][1]
    assert abs(result.rows[1]["volume_change_pct"] - 100 * (r1**3 - r0**3) / r0**3) <= 3.0
