"""``medcam explain dicomweb+http://... --study UID --store`` against a real Orthanc."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from medcam.cli import main
from medcam.data.synthetic import LPS_TO_RAS  # noqa: F401 - documents the frame convention
from tests.orthanc import (
    DEMO_MODEL_ARGS,
    LESION_LPS,
    assert_results_in_study,
    local_heatmap,
    make_study,
    orthanc,  # noqa: F401 - fixture
    pacs_env,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.slow


def _explain(server, study_uid, *extra):
    args = ["explain", server.dicomweb, "--study", study_uid, *DEMO_MODEL_ARGS, "--store", *extra]
    return CliRunner().invoke(main, args)


def test_explain_study_over_dicomweb(orthanc, pacs_env, tmp_path):  # noqa: F811
    ct, scout = make_study(tmp_path)
    orthanc.upload(ct.files + scout.files)
    result = _explain(orthanc, ct.study_uid, "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    # the scout is skipped with its reason (a 3D model's outputs cannot sit on one 2D image)
    assert "1 series explained, 1 skipped" in result.output
    assert "scout" not in result.output.lower() or "skip" in result.output
    heat = local_heatmap(ct)
    stored = assert_results_in_study(orthanc, ct, heat)
    # the map's peak is at the lesion (world coordinates from the stored PM's own geometry)
    pm = stored["pm"]
    k = int(np.argmax(pm.pixel_array.reshape(len(ct.files), -1).max(axis=1)))
    frame = pm.PerFrameFunctionalGroupsSequence[k]
    row, col = np.unravel_index(int(np.argmax(pm.pixel_array[k])), pm.pixel_array[k].shape)
    iop = np.array(
        [
            float(v)
            for v in pm.SharedFunctionalGroupsSequence[0]
            .PlaneOrientationSequence[0]
            .ImageOrientationPatient
        ]
    )
    spacing = [
        float(v) for v in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    ]
    origin = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
    peak = origin + iop[:3] * spacing[1] * col + iop[3:] * spacing[0] * row
    assert np.linalg.norm(peak - np.array(LESION_LPS)) < 25
    # the case folder is kept with --out, named without identifiers
    cases = [p.name for p in (tmp_path / "out").iterdir()]
    assert len(cases) == 1 and cases[0].startswith("series-")

    # explaining the study again stores nothing twice (medcam's results are not explained,
    # and the same result has the same UIDs)
    before = orthanc.instance_count()
    result = _explain(orthanc, ct.study_uid)
    assert result.exit_code == 0, result.output
    assert "a medcam result" in result.output
    assert orthanc.instance_count() == before
    assert_results_in_study(orthanc, ct)


def test_series_filters(orthanc, pacs_env, tmp_path):  # noqa: F811
    ct, scout = make_study(tmp_path)
    orthanc.upload(ct.files + scout.files)
    before = orthanc.instance_count()
    # a series the model cannot take, asked for by UID: a clear error, nothing stored
    result = _explain(orthanc, ct.study_uid, "--series", scout.series_uid)
    assert result.exit_code == 2
    assert "medcam: error:" in result.output and "dicom-pm" in result.output
    assert "Traceback" not in result.output
    assert orthanc.instance_count() == before
    # a modality or description that matches nothing: refused before any model runs
    result = _explain(orthanc, ct.study_uid, "--modality", "MR")
    assert result.exit_code == 2 and "No series of study" in result.output
    result = _explain(orthanc, ct.study_uid, "--series-description", "^chest")
    assert result.exit_code == 2 and "does not match" in result.output
    result = _explain(orthanc, ct.study_uid, "--series", "1.2.3.4")
    assert result.exit_code == 2 and "holds no series" in result.output
    result = _explain(orthanc, "1.2.3.999", "--modality", "CT")
    assert result.exit_code == 2 and "holds no study" in result.output
    assert orthanc.instance_count() == before


def test_wrong_credentials_and_unreachable(orthanc, monkeypatch, tmp_path):  # noqa: F811
    from tests.orthanc import free_port

    ct, _ = make_study(tmp_path, scout=False)
    orthanc.upload(ct.files)
    before = orthanc.instance_count()
    monkeypatch.setenv("MEDCAM_DICOMWEB_USER", "medcam")
    monkeypatch.setenv("MEDCAM_DICOMWEB_PASSWORD", "wrong")
    result = _explain(orthanc, ct.study_uid)
    assert result.exit_code == 2
    assert "refused the credentials (HTTP 401)" in result.output
    assert "wrong" not in result.output  # the secret is never printed
    # a bearer token from a file (the server here only knows basic auth: refused as well)
    token = tmp_path / "token"
    token.write_text("not-a-valid-token\n")
    monkeypatch.delenv("MEDCAM_DICOMWEB_USER")
    monkeypatch.delenv("MEDCAM_DICOMWEB_PASSWORD")
    monkeypatch.setenv("MEDCAM_DICOMWEB_TOKEN_FILE", str(token))
    result = _explain(orthanc, ct.study_uid)
    assert result.exit_code == 2 and "HTTP 401" in result.output
    assert "not-a-valid-token" not in result.output
    # nobody listens on this port
    address = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    result = CliRunner().invoke(
        main, ["explain", address, "--study", ct.study_uid, *DEMO_MODEL_ARGS, "--store"]
    )
    assert result.exit_code == 2 and "Cannot reach the DICOMweb server" in result.output
    assert orthanc.instance_count() == before
    # there is no command-line secret
    result = CliRunner().invoke(main, ["explain", orthanc.dicomweb, "--token", "x"])
    assert result.exit_code == 2 and "No such option" in result.output
