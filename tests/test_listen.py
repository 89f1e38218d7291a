"""``medcam listen``: the AI node receives series by C-STORE, explains complete series, stores
results; its journal survives restarts; one bad series never stops it."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from medcam.cli import main
from medcam.errors import MedcamError, PacsError
from medcam.listen import Listener
from medcam.pipeline import ExplainSettings, Pipeline
from medcam.sinks import Sink, WrittenCase
from medcam.sinks.folder import FolderSink
from tests.orthanc import (
    assert_results_in_study,
    demo_spec,
    free_port,
    local_heatmap,
    make_study,
    orthanc,  # noqa: F401 - fixture
    pacs_env,  # noqa: F401 - fixture
)


class CountingSink(Sink):
    """A folder sink that counts deliveries; ``fail_after_send`` loses the first answer."""

    def __init__(self, path: Path, fail_after_send: int = 0) -> None:
        self.folder = FolderSink(path)
        self.address = str(path)
        self.sent: list[str] = []
        self.fail_after_send = fail_after_send

    def send(self, case: WrittenCase) -> int:
        n = self.folder.send(case)
        self.sent.append(case.name)
        if self.fail_after_send:
            self.fail_after_send -= 1
            raise PacsError("the destination's answer was lost")
        return n


@pytest.fixture(scope="module")
def spec():
    return demo_spec()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("study"))


def send(port: int, files, calling: str = "PACS") -> list[int]:
    """C-STORE ``files`` to the node the way a PACS would; the status of each."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for sop_class in {pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID for f in files}:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDCAM")
    assert assoc.is_established, "the node refused the association"
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def node(spec, state, sink, **kwargs) -> Listener:
    pipeline = Pipeline(spec, ExplainSettings(), [sink], log=lambda m: None)
    kwargs.setdefault("quiet_period", 0.5)
    listener = Listener(pipeline, state, port=free_port(), host="127.0.0.1",
                        log=lambda m: None, retry_delay=0.2, **kwargs)  # fmt: skip
    listener.start()
    return listener


def wait_idle(listener: Listener, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    time.sleep(0.2)
    while time.monotonic() < deadline:
        if listener.idle():
            return
        time.sleep(0.2)
    raise AssertionError(f"the node did not finish: {listener.journal.jobs()}")


def states(listener: Listener) -> list[str]:
    return [j["state"] for j in listener.journal.jobs()]


@pytest.mark.slow
def test_restart_neither_loses_nor_resends(spec, study, tmp_path):
    ct, _ = study
    state, sink = tmp_path / "state", CountingSink(tmp_path / "results")
    # 1. the series arrives, the node stops before the series is complete
    a = node(spec, state, sink, quiet_period=3600)
    assert send(a.port, ct.files) == [0] * len(ct.files)
    a.stop()
    assert len(list((state / "inbox").glob("*/*.dcm"))) == len(ct.files)  # on disk
    # 2. after a restart it is completed, explained and delivered once
    b = node(spec, state, sink)
    wait_idle(b)
    assert states(b) == ["done"] and len(sink.sent) == 1
    b.stop()
    assert not list((state / "inbox").iterdir()) and not list((state / "outbox").iterdir())
    # 3. another restart sends nothing again
    c = node(spec, state, sink)
    wait_idle(c)
    assert len(sink.sent) == 1
    # 4. the PACS sends the very same series again: recognised, nothing sent twice
    assert send(c.port, ct.files) == [0] * len(ct.files)
    wait_idle(c)
    assert states(c) == ["done", "duplicate"] and len(sink.sent) == 1
    c.stop()


@pytest.mark.slow
def test_lost_answer_is_resent_after_restart_with_the_same_uids(spec, study, tmp_path):
    ct, _ = study
    state = tmp_path / "state"
    flaky = CountingSink(tmp_path / "results", fail_after_send=1)
    a = node(spec, state, flaky, quiet_period=0.3)
    a.retry_delay = 3600  # the retry is not due before the restart
    send(a.port, ct.files)
    deadline = time.monotonic() + 60
    while not flaky.sent and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    a.stop()
    from medcam.listen import Journal

    journal = Journal(state / "journal.sqlite3")  # read the journal as the next run will
    job = journal.jobs()[0]
    journal.close()
    assert job["state"] == "explained" and job["attempts"] == 1 and "lost" in job["error"]
    first = sorted(p.name for p in (tmp_path / "results").rglob("*.dcm"))
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for p in (tmp_path / "results").rglob("*.dcm")}  # fmt: skip
    sink = CountingSink(tmp_path / "results")
    b = node(spec, state, sink)
    b.journal.set(job["key"], next_try=0)  # due now
    wait_idle(b)
    assert states(b) == ["done"] and len(sink.sent) == 1
    b.stop()
    # the resend is the same result (same files, same UIDs): the destination has one copy
    assert sorted(p.name for p in (tmp_path / "results").rglob("*.dcm")) == first
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for p in (tmp_path / "results").rglob("*.dcm")} == uids  # fmt: skip


@pytest.mark.slow
def test_bad_series_does_not_stop_the_node(spec, study, tmp_path):
    ct, scout = study
    sink = CountingSink(tmp_path / "results")
    n = node(spec, tmp_path / "state", sink)
    send(n.port, scout.files)  # one 2D image: a Parametric Map cannot sit on it
    wait_idle(n)
    send(n.port, ct.files)
    wait_idle(n)
    # a routing rule that sends medcam's own results back: refused, no result of a result
    overlays = sorted((tmp_path / "results").rglob("*_sc/*.dcm"))
    assert send(n.port, overlays) == [0] * len(overlays)
    wait_idle(n)
    jobs = n.journal.jobs()
    assert [j["state"] for j in jobs] == ["failed", "done", "failed"]
    assert "dicom-pm" in jobs[0]["error"] and len(sink.sent) == 1
    assert "is a medcam result" in jobs[2]["error"]
    assert list((tmp_path / "state" / "inbox").iterdir())  # the failed series is kept
    n.stop()
    result = CliRunner().invoke(main, ["listen", "--store-to", "x", "--status",
                                       "--state", str(tmp_path / "state")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 done, 2 failed" in result.output and "failed: series ..." in result.output


def test_bounded_queue_and_callers(spec, study, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ct, scout = study
    n = node(spec, tmp_path / "state", CountingSink(tmp_path / "r"), quiet_period=3600,
             max_series=1, allowed_callers=["PACS"])  # fmt: skip
    try:
        assert send(n.port, ct.files[:2]) == [0, 0]
        assert send(n.port, scout.files) == [0xA700]  # a second series: out of resources
        assert send(n.port, ct.files[2:4]) == [0, 0]  # the first series goes on
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", n.port, ae_title="MEDCAM")
        assert assoc.is_rejected  # an AE title that may not send
        assoc = ae.associate("127.0.0.1", n.port, ae_title="NOT_MEDCAM")
        assert not assoc.is_established
    finally:
        n.stop()
    with pytest.raises(MedcamError, match="AE title"):
        Listener(Pipeline(spec, ExplainSettings()), tmp_path / "s2", ae_title="X" * 17)


@pytest.mark.slow
def test_orthanc_routes_a_series_to_the_node(orthanc, pacs_env, spec, tmp_path):  # noqa: F811
    from medcam.sinks import open_sink

    ct, _ = make_study(tmp_path, scout=False)
    orthanc.upload(ct.files)
    pipeline = Pipeline(spec, ExplainSettings(), [open_sink(orthanc.dicomweb)], log=lambda m: None)
    listener = Listener(pipeline, tmp_path / "state", port=free_port(), host="127.0.0.1",
                        quiet_period=0.5, log=lambda m: None)  # fmt: skip
    listener.start()
    try:
        orthanc.add_modality("medcam", "MEDCAM", listener.port)
        found = orthanc.rest("POST", "/tools/lookup", data=ct.series_uid)
        series_id = next(f["ID"] for f in found if f["Type"] == "Series")
        # what a routing rule does: Orthanc sends the series to the node
        orthanc.rest("POST", "/modalities/medcam/store",
                     json={"Resources": [series_id], "Synchronous": True})  # fmt: skip
        wait_idle(listener)
        assert states(listener) == ["done"]
    finally:
        listener.stop()
    assert_results_in_study(orthanc, ct, local_heatmap(ct))


def test_listen_command(spec, study, tmp_path, monkeypatch):
    """``medcam listen`` wires the options into a node (serving is replaced by one round:
    receive a series, deliver its results, stop)."""
    from tests.orthanc import DEMO_MODEL_ARGS

    ct, _ = study
    port, results = free_port(), tmp_path / "results"
    seen = {}

    def one_round(self):
        seen.update(ae=self.ae_title, port=self.port, quiet=self.quiet_period)
        seen.update(formats=list(self.pipeline.settings.formats), callers=self.allowed_callers)
        self.start()
        try:
            assert send(self.port, ct.files, calling="PACS") == [0] * len(ct.files)
            wait_idle(self)
        finally:
            self.stop()

    monkeypatch.setattr(Listener, "serve_forever", one_round)
    result = CliRunner().invoke(main, [
        "listen", "--store-to", str(results), "--port", str(port), "--bind", "127.0.0.1",
        "--ae-title", "MEDCAM", "--allow-ae", "PACS", "--state", str(tmp_path / "state"),
        "--quiet-period", "0.5", "--format", "dicom-pm,dicom-seg", *DEMO_MODEL_ARGS,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen == {"ae": "MEDCAM", "port": port, "quiet": 0.5, "callers": ["PACS"],
                    "formats": ["dicom-pm", "dicom-seg"]}  # fmt: skip
    assert len(list(results.rglob("*_pm.dcm"))) == 1 and len(list(results.rglob("*_seg.dcm"))) == 1
    assert "listening as MEDCAM" in result.output and "result instances delivered" in result.output
    assert "Phantom" not in result.output and "MEDCAM-PHANTOM" not in result.output  # no PHI
    # a destination that cannot be used is refused before the model loads
    args = ["listen", "--store-to", f"dimse://X@127.0.0.1:{free_port()}",
            "--state", str(tmp_path / "s2"), *DEMO_MODEL_ARGS]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Cannot reach the DICOM peer" in result.output
