"""Input handling: dates (ISO or DICOM only, errors name the visit), output formats checked
before any work, DICOM dates read strictly."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from click.testing import CliRunner

from medcam.cli import main
from medcam.data.synthetic import Geometry
from medcam.errors import InputError
from medcam.longitudinal import Timepoint, compare, parse_date
from medcam.longitudinal.timepoint import dicom_date
from medcam.runner import read_manifest
from tests.longitudinal.phantoms import Visit, build


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2020-01-25", datetime.date(2020, 1, 25)), ("20200125", datetime.date(2020, 1, 25)),
     (" 2020-01-25 ", datetime.date(2020, 1, 25)),
     (datetime.datetime(2020, 1, 25, 13, 5), datetime.date(2020, 1, 25))],
)  # fmt: skip
def test_iso_and_dicom_dates_are_read(text, expected):
    assert parse_date(text, "v1") == expected


@pytest.mark.parametrize("text", ["2020-1-25", "2020-12-5", "25/01/2020", "2020.01.25",
                                  "20201305", "2020-02-30", "", "yesterday"])  # fmt: skip
def test_other_dates_are_refused_naming_the_visit(text):
    # "2020-1-25" used to become 2020-12-05 (dashes stripped, digits re-cut)
    with pytest.raises(InputError, match="visit 'follow-up 2'"):
        parse_date(text, "follow-up 2")


def test_timepoint_and_dicom_dates_are_strict():
    img = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(InputError, match="2020-1-25"):
        Timepoint(img, np.eye(4), img, "2020-1-25", label="week 3")

    class Header(dict):
        pass

    assert dicom_date([Header(StudyDate="20200125")]) == datetime.date(2020, 1, 25)
    assert dicom_date([Header(StudyDate="", AcquisitionDate="20200126")]) == datetime.date(
        2020, 1, 26
    )
    with pytest.raises(InputError, match=r"visit 'ct3 \(StudyDate\)'"):
        dicom_date([Header(StudyDate="2020.01.25")], "ct3")
    assert dicom_date([Header()]) is None


def test_manifest_dates_are_checked_with_their_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    manifest = tmp_path / "visits.csv"
    manifest.write_text("scan,date\na,2020-01-25\nb,2020-1-25\n")
    with pytest.raises(InputError, match=r"visits.csv, line 3"):
        read_manifest(manifest)
    manifest.write_text("scan,date,label\na,20200125,baseline\nb,2020-03-01,\n")
    rows = read_manifest(manifest)
    assert [r["date"] for r in rows] == ["20200125", "2020-03-01"]
    assert rows[0]["label"] == "baseline"


def test_cli_bad_date_fails_before_any_model_runs(tmp_path):
    for name in ("v0", "v1"):
        (tmp_path / name).mkdir()
    result = CliRunner().invoke(
        main,
        ["compare", str(tmp_path / "v0"), str(tmp_path / "v1"), "--dates", "2020-01-25,2020-2-1",
         "--out", str(tmp_path / "out"), "--model", "medcam.does_not:exist"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "2020-2-1" in result.output and "v1" in result.output
    assert "Traceback" not in result.output


def test_formats_are_checked_before_registration(tmp_path):
    grid = Geometry((24, 20, 16), (12.0, 12.0, 14.0), (-140.0, -110.0, -110.0))
    tps = build([Visit(0, grid, None, {"a": ((-45.0, -10.0, 15.0), 20.0)}),
                 Visit(30, grid, None, {"a": ((-45.0, -10.0, 15.0), 18.0)})])  # fmt: skip
    with pytest.raises(InputError, match="Unknown longitudinal output format"):
        compare(tps, out=tmp_path, formats=["nifti", "tiff"])
    with pytest.raises(InputError, match="not a DICOM series"):
        compare(tps, out=tmp_path, formats=["dicom-pm"])
    with pytest.raises(InputError, match="dicom-sr needs DICOM visits"):
        compare(tps, out=tmp_path, formats=["dicom-sr"])
    assert not any(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # the bad date, on purpose
def test_bad_dicom_study_date_fails_before_any_model_runs(tmp_path, monkeypatch):
    from medcam.data.synthetic import write_dicom_series

    grid = Geometry((12, 10, 6), (20.0, 20.0, 30.0), (-110.0, -90.0, -75.0))
    volume = np.zeros(grid.shape, np.float32)
    write_dicom_series(volume, grid, tmp_path / "visit0", study_date="20200125")
    write_dicom_series(volume, grid, tmp_path / "visit1", study_date="2020.03.01")

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran before the dates were checked")

    monkeypatch.setattr("medcam.space.explain_scan", no_model)
    result = CliRunner().invoke(
        main,
        ["compare", str(tmp_path / "visit0"), str(tmp_path / "visit1"), "--out",
         str(tmp_path / "out"), "--model", "tests.helpers:intensity_cam_3d"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "visit1 (StudyDate)" in result.output and "2020.03.01" in result.output
