"""A real Orthanc (DICOMweb + DIMSE) on free loopback ports with a throw-away storage folder.

Tests import the fixtures they need (``from tests.orthanc import orthanc, pacs_env``). The
server is stopped after its tests, also when they fail; without the ``orthanc`` and
``orthanc-dicomweb`` packages the tests skip (and fail under ``MEDCAM_TEST_STRICT``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.external import missing, require_tool

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medcam", "s3cret-for-tests"
AET = "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc process; ``stop()`` / ``start()`` keep its storage (a restart)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.config = root / "orthanc.json"
        config = {
            "Name": "medcam-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            "DicomCheckCalledAet": True,
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {},
            "StableAge": 1,
            "HttpTimeout": 30,
        }
        self.config.write_text(json.dumps(config))

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://{AET}@127.0.0.1:{self.dicom_port}"

    def start(self) -> None:
        import requests

        log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.http}/system", auth=(USER, PASSWORD), timeout=1).ok:
                    return
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self, crash: bool = False) -> None:
        """Stop the server (``crash``: kill it at once, as a power cut would)."""
        if self.proc is not None and self.proc.poll() is None and crash:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def rest(self, method: str, path: str, **kwargs):
        import requests

        r = requests.request(
            method, f"{self.http}{path}", auth=(USER, PASSWORD), timeout=60, **kwargs
        )
        r.raise_for_status()
        return r.json() if r.content and "json" in r.headers.get("content-type", "") else r

    def upload(self, files) -> None:
        for f in files:
            self.rest("POST", "/instances", data=Path(f).read_bytes())

    def add_modality(self, name: str, aet: str, port: int) -> None:
        self.rest(
            "PUT", f"/modalities/{name}", json={"AET": aet, "Host": "127.0.0.1", "Port": port}
        )

    def study_id(self, study_uid: str) -> str:
        found = self.rest("POST", "/tools/lookup", data=study_uid)
        ids = [f["ID"] for f in found if f["Type"] == "Study"]
        assert ids, f"no study {study_uid} in Orthanc"
        return ids[0]

    def series_of(self, study_uid: str) -> dict[str, list]:
        """SeriesInstanceUID -> the series' instances as pydicom datasets (full files)."""
        import io

        import pydicom

        out = {}
        for series in self.rest("GET", f"/studies/{self.study_id(study_uid)}/series"):
            uid = series["MainDicomTags"]["SeriesInstanceUID"]
            out[uid] = [
                pydicom.dcmread(io.BytesIO(self.rest("GET", f"/instances/{i}/file").content))
                for i in series["Instances"]
            ]
        return out

    def instance_count(self) -> int:
        return len(self.rest("GET", "/instances"))


def _require_orthanc() -> None:
    require_tool("Orthanc")
    if not PLUGIN.exists():
        missing(f"{PLUGIN} is missing (apt-get install -y orthanc-dicomweb)")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc shared by a module's tests (each test uploads its own study)."""
    _require_orthanc()
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_orthanc(tmp_path):
    """An Orthanc of its own, for tests that stop and restart the server."""
    _require_orthanc()
    root = tmp_path / "orthanc"
    root.mkdir()
    server = Orthanc(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pacs_env(monkeypatch):
    """The test server's credentials in the environment, the way users pass them."""
    for name in ("TOKEN", "TOKEN_FILE", "PASSWORD_FILE"):
        monkeypatch.delenv(f"MEDCAM_DICOMWEB_{name}", raising=False)
    monkeypatch.setenv("MEDCAM_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDCAM_DICOMWEB_PASSWORD", PASSWORD)


def demo_geometry_small():
    """The demo's oblique CT geometry, smaller (64 x 64 x 20 voxels of 3 x 3 x 5 mm)."""
    from medcam.data.synthetic import Geometry, rotation

    r = rotation((4.0, 0.0, 6.0))
    shape, spacing = (64, 64, 20), (3.0, 3.0, 5.0)
    half = r @ (np.array(shape, float) - 1) * np.array(spacing) / 2
    return Geometry(shape, spacing, tuple(-half), tuple(r[:, 0]), tuple(r[:, 1]))


LESION_LPS = (-30.0, -10.0, 10.0)


def make_study(folder: Path, *, scout: bool = True):
    """The demo's synthetic CT (a lesion in the body) as a DICOM series, plus a one-image
    "scout" series in the same study (a 3D model cannot take it). Returns (ct, scout)."""
    from medcam.data.demo import ct_phantom
    from medcam.data.synthetic import Geometry, write_dicom_series

    g = demo_geometry_small()
    ct = write_dicom_series(
        ct_phantom(g, LESION_LPS), g, folder / "ct", series_description="CT abdomen"
    )
    scout_info = None
    if scout:
        g2 = Geometry((64, 64, 1), (3.0, 3.0, 5.0))
        scout_info = write_dicom_series(
            ct_phantom(g2, None),
            g2,
            folder / "scout",
            study_uid=ct.study_uid,
            series_description="scout",
        )
    return ct, scout_info


def demo_spec():
    """The shipped demo classifier with its preprocessing (a real, small model)."""
    from medcam.data.demo import demo_classifier, demo_preprocess, load_demo_weights
    from medcam.runner import ModelSpec

    net = load_demo_weights(demo_classifier(), "classifier")
    return ModelSpec(net, demo_preprocess(), "demo classifier")


DEMO_MODEL_ARGS = [
    "--model",
    "medcam.data.demo:demo_classifier",
    "--weights",
    str(Path(__file__).parent.parent / "medcam/data/weights/demo_classifier.pt"),
    "--preprocess",
    "medcam.data.demo:demo_preprocess",
]


def _ipp(item) -> tuple:
    return tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)


def assert_results_in_study(server: Orthanc, ct, heat: np.ndarray | None = None) -> dict:
    """Check in the server that the study of ``ct`` holds one Parametric Map, one SEG and one
    Secondary Capture series of medcam, on the source's grid, each frame referencing the source
    slice at its position; with ``heat (X, Y, Z)`` (the map computed locally) the stored map's
    values too. Returns {"pm", "seg", "sc"} datasets."""
    import pydicom

    source = [pydicom.dcmread(f) for f in ct.files]
    position_of = {
        ds.SOPInstanceUID: tuple(round(float(v), 3) for v in ds.ImagePositionPatient)
        for ds in source
    }
    iop0 = np.array([float(v) for v in source[0].ImageOrientationPatient])
    normal = np.cross(iop0[:3], iop0[3:])
    ordered = sorted(position_of.values(), key=lambda p: float(np.dot(p, normal)))
    slice_of = {p: k for k, p in enumerate(ordered)}  # slice k of the (X, Y, Z) volume
    results: dict[str, list] = {}
    for uid, instances in server.series_of(ct.study_uid).items():
        first = instances[0]
        if uid == ct.series_uid or first.get("Manufacturer") != "medcam":
            continue
        results.setdefault(first.SOPClassUID.name, []).append(instances)
    assert sorted(results) == [
        "Parametric Map Storage",
        "Secondary Capture Image Storage",
        "Segmentation Storage",
    ], sorted(results)
    assert all(len(v) == 1 for v in results.values()), "a result series is stored twice"
    pm = results["Parametric Map Storage"][0]
    seg = results["Segmentation Storage"][0]
    sc = results["Secondary Capture Image Storage"][0]
    assert len(pm) == 1 and len(seg) == 1 and len(sc) == len(source)
    for ds in [pm[0], seg[0], *sc]:
        assert ds.StudyInstanceUID == ct.study_uid and ds.PatientID == source[0].PatientID
        assert ds.SeriesInstanceUID != ct.series_uid
    for ds in (pm[0], seg[0]):
        assert ds.FrameOfReferenceUID == ct.frame_of_reference_uid
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
        assert (int(ds.Rows), int(ds.Columns)) == (int(source[0].Rows), int(source[0].Columns))
        assert int(ds.NumberOfFrames) == len(source)
        iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
        # equal to DS precision (the synthetic source writes more than DS's 16 characters)
        np.testing.assert_allclose(
            [float(v) for v in iop.ImageOrientationPatient],
            [float(v) for v in source[0].ImageOrientationPatient],
            atol=1e-12,
        )
        frames = ds.PerFrameFunctionalGroupsSequence
        assert {_ipp(f) for f in frames} == set(position_of.values())
        for f in frames:  # each frame references the source slice at its own position
            ref = f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            assert position_of[ref] == _ipp(f)
    if heat is not None:
        values = pm[0].pixel_array  # (frames, rows, columns)
        for f, frame in zip(pm[0].PerFrameFunctionalGroupsSequence, values, strict=True):
            expected = heat[:, :, slice_of[_ipp(f)]].T
            np.testing.assert_allclose(frame, expected, rtol=1e-5, atol=1e-6 * heat.max())
        mask = seg[0].pixel_array.astype(bool)
        expected = heat >= 0.5 * heat.max()
        assert int(mask.sum()) == int(expected.sum()) > 0
    for ds in sc:
        assert (int(ds.Rows), int(ds.Columns)) == (int(source[0].Rows), int(source[0].Columns))
        assert ds.BurnedInAnnotation == "YES"
    assert len({ds.SeriesInstanceUID for ds in sc}) == 1
    return {"pm": pm[0], "seg": seg[0], "sc": sc}


def local_heatmap(ct) -> np.ndarray:
    """The demo classifier's map of ``ct``, computed here from the files: ``(X, Y, Z)``."""
    import medcam

    spec = demo_spec()
    ex = medcam.explain_scan(spec.network, ct.folder, preprocess=spec.preprocess)
    return ex.heatmap[0].numpy()
