"""Sinks: a folder (the case transaction), STOW-RS and C-STORE, including a server that goes
down mid-store and a retry that completes the job without duplicates."""

from __future__ import annotations

import pydicom
import pytest

from medcam.errors import OutputError, PacsError
from medcam.pipeline import ExplainSettings, Pipeline, explain_study
from medcam.sinks import WrittenCase, open_sink, sink_kinds
from medcam.sinks.cstore import CStoreSink
from medcam.sinks.folder import FolderSink
from medcam.sinks.stow import StowSink
from medcam.sources import open_source
from tests.orthanc import (
    assert_results_in_study,
    demo_spec,
    fresh_orthanc,  # noqa: F401 - fixture
    make_study,
    pacs_env,  # noqa: F401 - fixture
)


@pytest.fixture(scope="module")
def written_case(tmp_path_factory):
    """A case folder written by the pipeline (no sinks): PM, SEG, SC and JSON of a demo CT."""
    tmp = tmp_path_factory.mktemp("case")
    ct, _ = make_study(tmp, scout=False)
    pipeline = Pipeline(
        demo_spec(), ExplainSettings(formats=["dicom-pm", "dicom-seg", "dicom-sc", "json"])
    )
    return ct, pipeline.explain(ct.folder, tmp / "out", "case-a")


def test_kinds_and_written_case(written_case):
    ct, case = written_case
    assert {"folder", "dicomweb+http", "dicomweb+https", "dimse"} <= set(sink_kinds())
    assert isinstance(open_sink("/tmp/x"), FolderSink)
    assert case.study_uid == ct.study_uid
    groups = case.dicom_series()  # one group per derived series; the JSON is not DICOM
    assert sorted(len(g) for g in groups) == [1, 1, len(ct.files)]
    for group in groups:
        series = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in group}
        assert len(series) == 1


def test_folder_sink_is_a_transaction(written_case, tmp_path):
    _, case = written_case
    sink = open_sink(str(tmp_path / "dest"))
    sink.check()
    n = sink.send(case)
    files = sorted(p.relative_to(tmp_path / "dest") for p in (tmp_path / "dest").rglob("*"))
    assert n == sum(1 for p in case.folder.rglob("*") if p.is_file())
    sink.send(case)  # again: replaced as a whole, one copy
    assert sorted(p.relative_to(tmp_path / "dest") for p in (tmp_path / "dest").rglob("*")) == files
    assert not [p for p in (tmp_path / "dest").iterdir() if p.name.startswith(".")]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        open_sink(str(blocker / "sub")).check()


def test_same_result_same_uids(written_case, tmp_path):
    """The pipeline's results carry UIDs derived from sources + model + settings."""
    ct, case = written_case
    pipeline = Pipeline(
        demo_spec(), ExplainSettings(formats=["dicom-pm", "dicom-seg", "dicom-sc", "json"])
    )
    again = pipeline.explain(ct.folder, tmp_path, "case-b")

    def uids(c: WrittenCase):
        return sorted(
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for g in c.dicom_series()
            for p in g
        )

    assert uids(again) == uids(case)
    other = Pipeline(
        demo_spec(),
        ExplainSettings(formats=["dicom-pm", "dicom-seg", "dicom-sc"], method="gradcam++"),
    )
    changed = other.explain(ct.folder, tmp_path, "case-c")
    assert not set(uids(changed)) & set(uids(case))


@pytest.mark.slow
def test_server_down_mid_store_then_retry(fresh_orthanc, pacs_env, tmp_path, monkeypatch):  # noqa: F811
    server = fresh_orthanc
    for kind, sink_cls, method in (
        ("stow", StowSink, "_store_series"),
        ("cstore", CStoreSink, "_store"),
    ):
        ct, _ = make_study(tmp_path / kind, scout=False)
        server.upload(ct.files)
        address = server.dicomweb if kind == "stow" else server.dimse
        original = getattr(sink_cls, method)
        calls = []

        def failing(self, *args, _original=original, _calls=calls):
            if len(_calls) == 2:  # the server dies after two stores
                server.stop(crash=True)
            _calls.append(1)
            return _original(self, *args)

        monkeypatch.setattr(sink_cls, method, failing)
        # a dead peer is noticed by the socket closing or, at the latest, by the timeout
        sink = open_sink(address, attempts=1, timeout=5)
        pipeline = Pipeline(demo_spec(), ExplainSettings(), [sink], log=lambda m: None)
        with pytest.raises(PacsError) as info:
            explain_study(open_source(server.dicomweb), ct.study_uid, pipeline)
        message = str(info.value)
        assert "retry" in message and "nothing is stored twice" in message
        assert (
            "Stored 2 of the 3 result series" in message
            if kind == "stow"
            else "went away" in message
        )
        monkeypatch.setattr(sink_cls, method, original)
        server.start()
        # the retry completes the job: every result once, nothing twice
        pipeline = Pipeline(
            demo_spec(), ExplainSettings(), [open_sink(address)], log=lambda m: None
        )
        records = explain_study(open_source(server.dicomweb), ct.study_uid, pipeline)
        assert [r["status"] for r in records if r["series"] == ct.series_uid] == ["done"]
        assert {r["detail"] for r in records if r["status"] == "skipped"} <= {"a medcam result"}
        assert_results_in_study(server, ct)
