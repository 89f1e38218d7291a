"""The cases follow-up imaging is made of: resolved and new lesions, diffuse heat, a blank or a
rescaled visit, findings that grow, vanish, appear, split and leave the field of view.

Every expected number is derived from the phantom's construction (sphere radii, positions,
motions), never from the code under test.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from medcam.data.synthetic import Geometry
from medcam.longitudinal import Limits, UnreliableComparisonError, compare
from medcam.longitudinal import metrics as M
from medcam.longitudinal.report import finding_summary, visit_summary
from tests.longitudinal.phantoms import MOTIONS, Visit, build, grid, scaled, truth_volume_ml

L1 = (-45.0, -10.0, 15.0)  # liver
L2 = (50.0, 20.0, -40.0)  # left side, lower
L3 = (-20.0, 40.0, 60.0)  # another place
SAME = Geometry((56, 48, 44), (5.5, 5.0, 6.0), (-150.0, -118.0, -129.0))  # one grid, no motion


def _same_grid(*findings_per_visit, diffuse=(), days=(0, 30, 60, 90)):
    """Visits on one grid without motion (registration='none' is then exact)."""
    visits = []
    for i, found in enumerate(findings_per_visit):
        d = diffuse[i] if diffuse else 0.0
        visits.append(Visit(days[i], SAME, None, dict(found), diffuse=d))
    return build(visits)


def test_resolved_lesion_is_reported_as_such_not_as_a_shift():
    tps = _same_grid({"a": (L1, 18.0)}, {})
    result = compare(tps, registration="none")
    base, follow = result.rows
    assert base["volume_ml"] == pytest.approx(truth_volume_ml(18.0), rel=0.05)
    assert follow["volume_ml"] == 0 and follow["activation"] == "no activation"
    assert follow["centroid_shift_mm"] is None and follow["peak_shift_mm"] is None
    assert follow["centroid_lps"] is None and follow["volume_change_pct"] == -100.0
    (f,) = result.findings
    assert [v.status for v in f.visits] == ["present", "resolved"]
    assert f.visits[1].volume_ml == 0.0 and f.trend_ml_per_30d < 0
    text = finding_summary(f, result)
    assert "resolved" in text and "Finding 1" in text
    assert "no activation" in visit_summary(follow)  # the CLI line formats None values


def test_new_lesion_over_diffuse_baseline_uses_the_maximum_over_all_visits():
    radius = 16.7  # 19.5 mL
    tps = _same_grid({}, {"new": (L2, radius)}, diffuse=(0.05, 0.05))
    result = compare(tps, registration="none")
    # the threshold is half of the new lesion's peak (1.0), not of the diffuse baseline (0.05)
    assert result.threshold == pytest.approx(0.5)
    assert "maximum over all visits" in result.threshold_rule
    base, follow = result.rows
    assert base["volume_ml"] == 0 and base["centroid_lps"] is None
    assert follow["volume_ml"] == pytest.approx(truth_volume_ml(radius), rel=0.05)
    assert follow["volume_change_pct"] is None  # a change from nothing is "new", not a percent
    (f,) = result.findings
    assert f.first_visit == 1 and [v.status for v in f.visits] == ["not yet seen", "new"]
    assert f.visits[1].change_pct_baseline is None
    assert "new on" in finding_summary(f, result)
    # the old default (half the baseline's maximum) would have counted the whole body
    old = M.activated_volume_ml(tps[1].heatmap, tps[1].affine_lps, 0.5 * 0.05)
    assert old > 10 * truth_volume_ml(radius)


def test_diffuse_heat_does_not_move_the_centroid():
    # 5 % heat over the whole body; the follow-up's field of view ends lower (z > -60 mm), so
    # the diffuse part of the map changes while the lesion does not move
    base = Visit(0, SAME, None, {"a": (L1, 16.0)}, diffuse=0.05)
    short = Geometry((56, 48, 24), (5.5, 5.0, 6.0), (-150.0, -118.0, -60.0))
    follow = Visit(30, short, None, {"a": (L1, 13.0)}, diffuse=0.05)
    tps = build([base, follow])
    result = compare(tps, registration="none")
    # sub-voxel (voxels are 5-6 mm; a discrete sphere's centroid is off by a fraction of one)
    assert result.rows[1]["centroid_shift_mm"] < 1.0
    np.testing.assert_allclose(result.rows[1]["centroid_lps"], L1, atol=1.0)
    # proof the test can fail: the whole-map centroid follows the diffuse heat
    c0 = M.weighted_centroid(tps[0].heatmap, tps[0].affine_lps)
    c1 = M.weighted_centroid(tps[1].heatmap, tps[1].affine_lps)
    assert np.linalg.norm(c0 - c1) > 5.0 and np.linalg.norm(c0 - L1) > 20.0


def test_findings_are_tracked_with_stable_numbers_and_uids():
    r1 = 14.0
    grown = r1 * 1.4 ** (1 / 3)  # +40 % volume
    tps = _same_grid(
        {"a": (L1, r1), "b": (L2, 11.0)},
        {"a": (L1, grown), "b": (L2, 11.0)},
        {"a": (L1, grown), "c": (L3, 12.0)},
    )
    result = compare(tps, registration="none")
    f1, f2, f3 = result.findings
    assert (f1.number, f2.number, f3.number) == (1, 2, 3)  # 1 = largest at baseline
    assert [v.status for v in f1.visits] == ["present", "present", "present"]
    assert f1.visits[1].change_pct_baseline == pytest.approx(40.0, abs=6.0)
    assert f1.visits[2].change_pct_previous == pytest.approx(0.0, abs=1e-9)
    assert [v.status for v in f2.visits] == ["present", "present", "resolved"]
    assert [v.status for v in f3.visits] == ["not yet seen", "not yet seen", "new"]
    np.testing.assert_allclose(f3.visits[2].centroid_lps, L3, atol=1.0)
    assert len({f.uid for f in result.findings}) == 3
    # a re-run on the same data gives the same UIDs (the SR tracking identifiers)
    again = compare(tps, registration="none")
    assert [f.uid for f in again.findings] == [f.uid for f in result.findings]
    # "finding 1 grew 40 %" and "finding 3 is new", in the sentence the report prints
    said = re.search(r"([+\u2212]\d+) % vs baseline", finding_summary(f1, result))
    assert float(said.group(1).replace("\u2212", "-")) == pytest.approx(40.0, abs=6.0)
    assert finding_summary(f3, result).startswith("Finding 3: new on 2026-03-06")


def test_a_split_finding_keeps_its_number_and_sums_its_parts():
    a, b = (-45.0, -10.0, 5.0), (-45.0, -10.0, 35.0)  # 30 mm apart along z
    tps = _same_grid({"big": ((-45.0, -10.0, 20.0), 22.0)}, {"p": (a, 9.0), "q": (b, 9.0)})
    result = compare(tps, registration="none")
    (f,) = result.findings
    assert f.visits[1].parts == 2 and f.visits[1].status == "present"
    assert f.visits[1].volume_ml == pytest.approx(2 * truth_volume_ml(9.0), rel=0.1)


def test_not_imaged_is_not_resolved():
    base = Visit(0, SAME, None, {"a": (L1, 14.0), "b": (L2, 12.0)})
    # the follow-up covers only z > -10 mm: finding b (z = -40) is outside its field of view
    small = Geometry((56, 48, 24), (5.5, 5.0, 6.0), (-150.0, -118.0, -9.0))
    follow = Visit(40, small, None, {"a": (L1, 14.0), "b": (L2, 12.0)})
    result = compare(build([base, follow]), registration="none")
    fa, fb = result.findings
    assert fa.visits[1].status == "present" and fb.visits[1].status == "not imaged"
    assert fb.visits[1].volume_ml is None
    assert any(f.kind == "coverage" and "Finding 2" in f.message for f in result.flags)
    assert "not imaged" in finding_summary(fb, result)


def test_no_activation_anywhere_is_said_not_crashed():
    tps = _same_grid({}, {})
    result = compare(tps, registration="none")
    assert result.threshold is None and not result.findings
    assert all(r["volume_ml"] == 0 and r["dice"] is None for r in result.rows)
    assert any("no visit has any positive heat" in f.message for f in result.flags)


def test_trend_sign_follows_the_data():
    days = [0, 7, 14, 49]
    # grew to 2.5x, then fell 38 % below baseline: Theil-Sen alone says "+", the data do not
    up_down = [10.0, 24.0, 25.0, 6.2]
    slope, _ = M.theil_sen(np.array(days), np.array(up_down))
    assert slope > 0  # the misleading number the report must not print as a trend
    per30, note = M.trend_per_30_days(days, up_down)
    assert per30 is None and "rose" in note and "then fell" in note
    shrinking = [10.0, 8.0, 7.0, 6.0]
    per30, note = M.trend_per_30_days(days, shrinking)
    assert per30 < 0 and note == "monotone"
    assert M.trend_per_30_days([0], [1.0])[0] is None


@pytest.fixture(scope="module")
def moved_series():
    """Baseline, a clean follow-up, a follow-up rescaled by +4 % and a blank follow-up."""
    visits = [
        Visit(0, grid(0), None, {"a": (L1, 16.0)}),
        Visit(21, grid(1), MOTIONS[1], {"a": (L1, 15.0)}),
        Visit(35, grid(2), scaled(MOTIONS[2], 1.04), {"a": (L1, 14.0)}),
        Visit(49, grid(3), MOTIONS[3], {"a": (L1, 13.0)}, blank=True),
    ]
    return build(visits)


@pytest.fixture(scope="module")
def moved_result(moved_series):
    return compare(moved_series)


@pytest.mark.slow
def test_clean_follow_up_is_not_flagged(moved_result):
    clean = moved_result.rows[1]
    assert clean["flags"] == []
    assert clean["registration_similarity"] > 0.9
    assert clean["registration_disagreement_mm"] < 1.0
    assert clean["centroid_shift_mm"] < 1.0


@pytest.mark.slow
def test_rescaled_visit_is_flagged(moved_result):
    row = moved_result.rows[2]
    assert row["registration_scale"] == pytest.approx(1.04, abs=0.005)
    assert row["registration_disagreement_mm"] > Limits().max_disagreement_mm
    assert any("anatomy scaled by +" in f for f in row["flags"])


@pytest.mark.slow
def test_blank_visit_is_flagged_and_strict_refuses(moved_series, moved_result, tmp_path):
    row = moved_result.rows[3]
    assert row["registration_similarity"] < 0.2
    assert any("images disagree after registration" in f for f in row["flags"])
    record_flags = [f for f in moved_result.flags if f.visit == row["visit"]]
    assert record_flags and all(f.kind in ("registration", "threshold") for f in record_flags)
    with pytest.raises(UnreliableComparisonError, match="images disagree"):
        compare([moved_series[0], moved_series[3]], strict=True, out=tmp_path / "strict")
    assert not (tmp_path / "strict").exists()  # refused before anything was written


@pytest.mark.slow
def test_flags_reach_json_and_html(moved_result, tmp_path):
    from medcam.longitudinal.report import write_report

    written = write_report(moved_result, tmp_path, ["json", "html"])
    text = written["json"][0].read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert {f["visit"] for f in record["flags"]} == {r["visit"] for r in moved_result.rows[2:]}
    page = written["html"][0].read_text()
    assert "Check before use" in page and "anatomy scaled by +" in page
