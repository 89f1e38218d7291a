"""DICOM outputs of a comparison: per visit a SEG of its findings and a TID 1500 Measurement
Report (checked by dciodvfy, read back with highdicom), tracking identifiers stable across
visits; the difference map as a Parametric Map; a source without type-2 tags never crashes."""

from __future__ import annotations

import hashlib
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medcam.data.synthetic import Geometry
from medcam.longitudinal import compare
from tests.external import require_tool
from tests.longitudinal.phantoms import Visit, dicom_visits

GRID = Geometry((40, 36, 22), (8.0, 7.0, 9.0), (-156.0, -122.0, -95.0))
L1, L2, L3 = (-45.0, -10.0, 15.0), (50.0, 20.0, -40.0), (-20.0, 40.0, 60.0)
VISITS = [
    Visit(0, GRID, None, {"a": (L1, 20.0), "b": (L2, 16.0)}),
    Visit(30, GRID, None, {"a": (L1, 23.0), "b": (L2, 16.0), "c": (L3, 15.0)}),
    Visit(60, GRID, None, {"a": (L1, 25.0), "c": (L3, 15.0)}),
]
pytestmark = pytest.mark.slow  # DICOM series written and read back, ~5 s

STRIPPED = ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName")


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    # the baseline series lacks type-2 patient/study attributes (as some exports do)
    folders, tps = dicom_visits(root, VISITS, strip=STRIPPED)
    before = [_digest(f) for f in folders]
    out = root / "out"
    result = compare(tps, registration="none", out=out,
                     formats=["dicom-sr", "dicom-pm", "nifti", "json"])  # fmt: skip
    return folders, tps, result, out, before


def test_inputs_without_type2_tags_are_not_modified(written):
    folders, _, _, out, before = written
    assert [_digest(f) for f in folders] == before
    ds = pydicom.dcmread(next(folders[0].iterdir()))
    assert all(k not in ds for k in STRIPPED)
    pm = pydicom.dcmread(sorted(out.glob("difference_*_pm.dcm"))[0])
    assert pm.PatientBirthDate == "" and pm.PatientSex == ""  # present, empty (type 2)
    assert pm.FrameOfReferenceUID == ds.FrameOfReferenceUID


def test_seg_and_sr_per_visit_with_stable_tracking_uids(written):
    _, tps, result, out, _ = written
    _, f2, f3 = result.findings
    assert [v.status for v in f2.visits] == ["present", "present", "resolved"]
    assert [v.status for v in f3.visits] == ["not yet seen", "new", "present"]
    seen: dict[str, set[str]] = {}
    for i, tp in enumerate(tps):
        label = result.rows[i]["visit"]
        seg = pydicom.dcmread(out / f"findings_{label}_seg.dcm")
        sr = hd.sr.srread(out / f"findings_{label}_sr.dcm")
        source = tp.scan.datasets[0]
        # both live in the visit's own study and frame of reference, and reference its series
        assert sr.StudyInstanceUID == seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        evidence = {s.SeriesInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                    for s in item.ReferencedSeriesSequence}  # fmt: skip
        assert {source.SeriesInstanceUID, seg.SeriesInstanceUID} <= evidence
        segments = {int(d.SegmentNumber): d for d in seg.SegmentSequence}
        present = [f for f in result.findings if f.visits[i].status in ("present", "new")]
        assert len(segments) == len(present)
        groups = sr.content.get_volumetric_roi_measurement_groups()
        assert len(groups) == len(present)
        for g in groups:
            finding = next(f for f in result.findings if f.uid == g.tracking_uid)
            seen.setdefault(finding.name, set()).add(g.tracking_uid)
            assert g.tracking_identifier == finding.name
            (volume,) = g.get_measurements(name=codes.SCT.Volume)
            assert volume.unit.value == "mL"
            assert volume.value == pytest.approx(finding.visits[i].volume_ml, rel=1e-6)
            ref = g.referenced_segment
            assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            (number,) = ref.referenced_segment_numbers
            assert segments[number].TrackingUID == finding.uid
            # the segment holds exactly the finding's voxels: its volume is the measurement
            frames = hd.seg.segread(out / f"findings_{label}_seg.dcm").get_volume(
                segment_numbers=[number], combine_segments=True
            )  # fmt: skip
            voxel_ml = tp.voxel_volume_ml
            assert np.count_nonzero(frames.array) * voxel_ml == pytest.approx(volume.value)
    # one UID per finding, the same at every visit it was measured
    assert all(len(uids) == 1 for uids in seen.values()) and len(seen) == 3
    # the resolved finding is still reported (0 mL), under its own tracking UID
    last = hd.sr.srread(out / f"findings_{result.rows[2]['visit']}_sr.dcm")
    (resolved,) = last.content.get_image_measurement_groups()
    assert resolved.tracking_uid == f2.uid
    assert resolved.get_measurements(name=codes.SCT.Volume)[0].value == 0.0
    absent = [item for item in _walk(last.ContentSequence)
              if "ConceptCodeSequence" in item
              and item.ConceptCodeSequence[0].CodeValue == codes.SCT.Absent.value]  # fmt: skip
    assert absent and absent[0].ConceptNameCodeSequence[0].CodeMeaning == "Finding"


def _walk(sequence):
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_dciodvfy_accepts_every_dicom_output(written):
    dciodvfy = require_tool("dciodvfy")
    *_, out, _ = written
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 3 + 3 + 2  # SEG + SR per visit, a PM per follow-up
    for path in files:
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"
