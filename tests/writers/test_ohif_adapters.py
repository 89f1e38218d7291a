"""medcam's Parametric Map and SEG load in OHIF's loader, on the right slices.

OHIF v3 reads derived objects with ``@cornerstonejs/adapters`` (pinned in tests/js); the Node
script tests/js/ohif_load.mjs calls it the way OHIF does, with the source volume's imageIds in
the order Cornerstone sorts them, and returns what the viewer would show on each slice. Each
slice is compared with the heatmap on the source slice it lands on.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.external import missing, require_tool

JS = Path(__file__).resolve().parents[1] / "js"


def ohif_load(tmp: Path, sources: list[Path], pm: Path | None, segs: list[Path]) -> dict:
    """Run tests/js/ohif_load.mjs; the report plus ``pm`` (Z, rows, cols) and ``segs``."""
    node = require_tool("node")
    if not (JS / "node_modules" / "@cornerstonejs" / "adapters").is_dir():
        missing("tests/js/node_modules is missing (npm ci --prefix tests/js)")
    request = {
        "sources": [str(p) for p in sources],
        "pm": str(pm) if pm else None,
        "seg": [str(p) for p in segs],
        "out": str(tmp),
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        [node, str(JS / "ohif_load.mjs"), str(tmp / "request.json")],
        capture_output=True, text=True, cwd=JS, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    vol = report["volume"]
    shape = (len(vol["slices"]), vol["rows"], vol["columns"])
    if report.get("pm", {}).get("loaded"):
        report["pm_pixels"] = np.fromfile(tmp / "pm.f32", "<f4").reshape(shape)
    report["seg_pixels"] = [
        np.fromfile(tmp / f"seg{i}.u8", np.uint8).reshape(shape) if s["loaded"] else None
        for i, s in enumerate(report["seg"])
    ]
    return report


def check_geometry(report: dict, case) -> None:
    """OHIF's volume is the scan's grid: same slice order, positions, orientation, spacing; the
    PM frame OHIF puts on each slice is the heatmap of that slice; the SEG mask likewise."""
    scan, heat = case.scan, case.heatmap
    affine = scan.affine_lps
    vol = report["volume"]
    expected = [(str(ds.SOPInstanceUID), frame) for ds, frame in scan.slice_sources]
    assert [(s["sop"], s["frame"]) for s in vol["slices"]] == expected
    for k, s in enumerate(vol["slices"]):
        np.testing.assert_allclose(s["position"], (affine @ [0, 0, k, 1])[:3], atol=1e-4)
    np.testing.assert_allclose(vol["origin"], affine[:3, 3], atol=1e-4)
    cosines = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(np.reshape(vol["direction"], (3, 3)).T, cosines, atol=1e-6)
    assert vol["zSpacing"] == pytest.approx(np.linalg.norm(affine[:3, 2]), abs=1e-3)
    assert report["pm"]["loaded"], report["pm"]
    expected_pm = np.transpose(heat, (2, 1, 0)).astype(np.float32)  # (slices, rows, columns)
    np.testing.assert_array_equal(report["pm_pixels"], expected_pm)
    binary, fractional = report["seg"]
    assert binary["loaded"], binary
    mask = np.transpose(heat >= case.seg_threshold, (2, 1, 0))
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(report["seg_pixels"][0].astype(bool), mask)
    # OHIF refuses a FRACTIONAL SEG unless every value is 0 or the maximum (documented)
    stored = np.asarray(pydicom.dcmread(case.seg_fractional).pixel_array)
    if np.isin(stored, (0, 255)).all():
        assert fractional["loaded"], fractional
    else:
        assert not fractional["loaded"] and "Fractional" in fractional["error"]


@pytest.mark.slow
def test_demo_pm_and_seg_load_in_ohif_on_the_right_slices(demo_case, tmp_path):
    report = ohif_load(tmp_path, demo_case.sources, demo_case.pm,
                       [demo_case.seg, demo_case.seg_fractional])  # fmt: skip
    check_geometry(report, demo_case)


@pytest.mark.slow
def test_real_ct_pm_and_seg_load_in_ohif_on_the_right_slices(ct5n_case, tmp_path):
    report = ohif_load(tmp_path, ct5n_case.sources, ct5n_case.pm,
                       [ct5n_case.seg, ct5n_case.seg_fractional])  # fmt: skip
    check_geometry(report, ct5n_case)


@pytest.mark.slow
def test_enhanced_source_pm_and_seg_load_in_ohif_on_the_right_frames(enhanced_case, tmp_path):
    """A multi-frame source stored out of slice order: OHIF sorts its frames; the PM's frames
    (slice order) and the SEG's frame references land on the frames holding those slices."""
    report = ohif_load(tmp_path, enhanced_case.sources, enhanced_case.pm,
                       [enhanced_case.seg, enhanced_case.seg_fractional])  # fmt: skip
    check_geometry(report, enhanced_case)


@pytest.mark.slow
def test_adapter_demands_the_source_orientation_exactly(demo_case, tmp_path):
    """Why medcam copies the source's orientation strings: the PM loader of
    @cornerstonejs/adapters 5.14 passes no tolerance, so a map whose ImageOrientationPatient
    differs by 1e-14 (what re-formatting the decimal strings does) is refused as oblique; the
    SEG loader takes a tolerance and loads such a SEG."""
    from pydicom.valuerep import format_number_as_ds

    source_iop = [float(v) for v in pydicom.dcmread(demo_case.sources[0]).ImageOrientationPatient]
    nudged = []
    for obj in (demo_case.pm, demo_case.seg):
        ds = pydicom.dcmread(obj)
        plane = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
        plane.ImageOrientationPatient = [
            format_number_as_ds(v + (1e-14 if abs(v) > 0.5 else 0.0)) for v in source_iop
        ]
        assert [float(v) for v in plane.ImageOrientationPatient] != source_iop
        nudged.append(tmp_path / f"nudged_{obj.name}")
        ds.save_as(nudged[-1])
    report = ohif_load(tmp_path, demo_case.sources, nudged[0], [nudged[1]])
    assert not report["pm"]["loaded"] and "oblique" in report["pm"]["error"]
    assert report["seg"][0]["loaded"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person")
def test_real_enhanced_mr_pm_and_seg_validate_and_load_in_ohif(tmp_path):
    """nibabel's real Philips Enhanced MR (176 frames, oblique, orientation and pixel spacing
    in every per-frame group): PM and SEG reference its frames, pass dciodvfy, and OHIF puts
    each frame on the right slice."""
    import gzip

    import nibabel as nib

    import medcam
    from medcam.writers.dicom_common import DicomIdentity
    from medcam.writers.dicom_pm import build_parametric_map
    from medcam.writers.dicom_seg import build_segmentation
    from tests.writers.conftest import Case, _fractional
    from tests.writers.test_conformance import assert_valid

    source = tmp_path / "philips_mprage.dcm"
    data = Path(nib.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
    source.write_bytes(gzip.open(data).read())
    scan = medcam.load_scan(source)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in scan.spatial_shape], indexing="ij"), -1)
    heat = np.clip(1 - np.linalg.norm(idx - (90, 150, 60), axis=-1) / 25, 0, 1).astype(np.float32)
    pm = build_parametric_map(
        heat, scan, method="gradcam", label="c1", identity=DicomIdentity.new(1)
    )
    pm.save_as(tmp_path / "pm.dcm")
    seg = build_segmentation(
        heat, scan, threshold=0.5, label="c1", method="gradcam", identity=DicomIdentity.new(2)
    )
    seg.save_as(tmp_path / "seg.dcm")
    case = Case([source], scan, heat, tmp_path / "pm.dcm", tmp_path / "seg.dcm", 0.5,
                _fractional(scan, heat, tmp_path / "fractional.dcm"))  # fmt: skip
    # the phantom's names are in the retired single-component form; copied as they are
    assert_valid([case.pm, case.seg, case.seg_fractional], ("Retired Person Name form",))
    report = ohif_load(tmp_path / "ohif", case.sources, case.pm, [case.seg, case.seg_fractional])
    check_geometry(report, case)
