"""``medcam explain dimse://AET@host:port --study UID --store`` (C-FIND, C-GET / C-MOVE,
C-STORE) against a real Orthanc."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from medcam.cli import main
from medcam.errors import PacsError
from tests.orthanc import (
    AET,
    DEMO_MODEL_ARGS,
    assert_results_in_study,
    demo_spec,
    free_port,
    local_heatmap,
    make_study,
    orthanc,  # noqa: F401 - fixture
)

pytestmark = pytest.mark.slow


def test_explain_study_over_dimse_with_c_get(orthanc, tmp_path):  # noqa: F811
    ct, scout = make_study(tmp_path)
    orthanc.upload(ct.files + scout.files)
    args = [
        "explain",
        orthanc.dimse,
        "--study",
        ct.study_uid,
        *DEMO_MODEL_ARGS,
        "--store",
        "--ae-title",
        "MEDCAM_TEST",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "1 series explained, 1 skipped" in result.output
    assert_results_in_study(orthanc, ct, local_heatmap(ct))


def test_c_move_and_store_to_dicomweb(orthanc, tmp_path, monkeypatch):  # noqa: F811
    """Fetch with C-MOVE (the PACS knows medcam's AE title and port), store with STOW-RS."""
    from medcam.pipeline import ExplainSettings, Pipeline, explain_study
    from medcam.sinks import open_sink
    from medcam.sources import SeriesFilter, open_source
    from tests.orthanc import PASSWORD, USER

    monkeypatch.setenv("MEDCAM_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDCAM_DICOMWEB_PASSWORD", PASSWORD)
    ct, _ = make_study(tmp_path, scout=False)
    orthanc.upload(ct.files)
    port = free_port()
    orthanc.add_modality("medcam-move", "MEDCAM_MOVE", port)
    source = open_source(orthanc.dimse, calling_ae="MEDCAM_MOVE", retrieve="move", move_port=port)
    pipeline = Pipeline(
        demo_spec(), ExplainSettings(), [open_sink(orthanc.dicomweb)], log=lambda m: None
    )
    records = explain_study(
        source, ct.study_uid, pipeline, series_filter=SeriesFilter(modalities=["CT"])
    )
    assert [r["status"] for r in records] == ["done"]
    assert_results_in_study(orthanc, ct)


def test_dimse_errors(orthanc, tmp_path):  # noqa: F811
    from medcam.sources import open_source

    # wrong peer AE title: Orthanc (DicomCheckCalledAet) rejects the association
    wrong = orthanc.dimse.replace(AET, "NOT_ORTHANC")
    with pytest.raises(PacsError, match="rejected the association"):
        open_source(wrong).check()
    # nobody listens
    with pytest.raises(PacsError, match="Cannot reach the DICOM peer"):
        open_source(f"dimse://{AET}@127.0.0.1:{free_port()}", timeout=5).check()
    # bad addresses and AE titles
    for bad in (
        "dimse://127.0.0.1:104",
        "dimse://A@host",
        "dimse://TOO_LONG_AE_TITLE_X@h:1",
        "dimse://A:pw@h:1",
    ):
        with pytest.raises(PacsError):
            open_source(bad)
    result = CliRunner().invoke(
        main,
        [
            "explain",
            orthanc.dimse,
            "--study",
            "1.2.3",
            *DEMO_MODEL_ARGS,
            "--store",
            "--ae-title",
            "A\\B",
        ],
    )
    assert result.exit_code == 2 and "is not a DICOM AE title" in result.output
