"""`medcam compare` end to end: DICOM visits with StudyDates, heatmaps computed by a model."""

from __future__ import annotations

import json

import pydicom
import pytest
from click.testing import CliRunner

from medcam.cli import main
from medcam.data.synthetic import Geometry, rigid_motion, torso_phantom, write_dicom_series

LESION = (-45.0, -10.0, 15.0)
VISITS = [  # StudyDate, lesion radius, motion, grid (coarse: 3-4 mm)
    ("20260105", 18.0, None, Geometry((90, 70, 44), (3.0, 3.0, 3.5), (-140.0, -100.0, -70.0))),
    ("20260306", 14.0, rigid_motion((2, -1, 4), (6, -4, 8)),
     Geometry((84, 74, 40), (3.2, 2.9, 3.8), (-135.0, -108.0, -72.0))),
    ("20260505", 10.0, rigid_motion((-2, 2, -3), (-5, 3, -6)),
     Geometry((92, 68, 46), (2.9, 3.1, 3.4), (-132.0, -98.0, -74.0))),
]  # fmt: skip


@pytest.fixture(scope="module")
def dicom_visits(tmp_path_factory):
    root = tmp_path_factory.mktemp("visits")
    folders = []
    study_uid = None
    for i, (date, radius, motion, g) in enumerate(VISITS):
        hu = torso_phantom(g, motion, LESION, radius, seed=i)
        folder = root / f"visit{i}"
        info = write_dicom_series(hu, g, folder, study_date=date, shuffle=True)
        study_uid = study_uid or info.study_uid
        folders.append(folder)
    return folders


@pytest.mark.slow
def test_compare_cli_with_model(dicom_visits, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["compare", *map(str, dicom_visits[::-1]), "--out", str(out),
         "--model", "tests.helpers:intensity_cam_3d", "--preprocess", "tests.helpers:lesion_window",
         "--layer", "conv", "--target", "0", "--format", "dicom-pm,json,html"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "Finding 1:" in result.output
    record = json.loads((out / "longitudinal.json").read_text())
    rows = record["rows"]
    assert [r["date"] for r in rows] == ["2026-01-05", "2026-03-06", "2026-05-05"]
    assert rows[0]["days"] == 0 and rows[2]["days"] == 120
    # IntensityCAM's heatmap is the lesion window of the image (plus partial-volume rims of
    # bone, which do not change): the activated volume shrinks with the lesion, visit by visit
    volumes = [r["volume_ml"] for r in rows]
    assert volumes[0] > volumes[1] > volumes[2] > 0
    assert all(r["volume_change_pct_prev"] < -10 for r in rows[1:])
    assert record["trends"]["volume_ml"]["per_30_days"] < 0
    # the lesion is finding 1 (largest at baseline), tracked at every visit, shrinking
    lesion = record["findings"][0]
    assert [v["status"] for v in lesion["visits"]] == ["present"] * 3
    assert lesion["visits"][2]["change_pct_baseline"] < -50
    assert record["provenance"]["method"] == "gradcam" and record["provenance"]["modality"] == "CT"
    # the difference map is also a DICOM Parametric Map on the baseline series
    pms = sorted(out.glob("difference_*_pm.dcm"))
    assert len(pms) == 2
    pm = pydicom.dcmread(pms[0])
    base = pydicom.dcmread(next(dicom_visits[0].iterdir()))
    assert pm.FrameOfReferenceUID == base.FrameOfReferenceUID
    assert pm.NumberOfFrames == VISITS[0][3].shape[2]


def test_compare_cli_manifest_errors(tmp_path, dicom_visits):
    manifest = tmp_path / "visits.csv"
    manifest.write_text("scan,when\nvisit0,2026-01-01\n")
    runner = CliRunner()
    bad_col = runner.invoke(
        main, ["compare", "--manifest", str(manifest), "--out", str(tmp_path / "o")]
    )
    assert bad_col.exit_code == 2 and "unknown column" in bad_col.output
    manifest.write_text(f"scan,date\n{dicom_visits[0]},2026-01-01\nmissing_folder,2026-02-01\n")
    missing = runner.invoke(
        main, ["compare", "--manifest", str(manifest), "--out", str(tmp_path / "o")]
    )
    assert (
        missing.exit_code == 2 and "line 3" in missing.output and "does not exist" in missing.output
    )
    manifest.write_text(f"scan,date\n{dicom_visits[0]},2026-01-01\n{dicom_visits[1]},2026-02-01\n")
    no_model = runner.invoke(
        main, ["compare", "--manifest", str(manifest), "--out", str(tmp_path / "o")]
    )
    assert no_model.exit_code == 2 and "No heatmap" in no_model.output
