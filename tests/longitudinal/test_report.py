"""The report a clinician reads: rendered by a real headless Chromium (no horizontal overflow at
1280 px, every image decoded, a screenshot), self-contained, with the pieces the issue lists;
pictures in radiological orientation with the right letters."""

from __future__ import annotations

import html
import json
import re
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from medcam.data.synthetic import Geometry, rigid_motion
from medcam.longitudinal import compare
from medcam.longitudinal.figures import MARKERS, views
from tests.external import require_tool
from tests.longitudinal.phantoms import Visit, build

L1, L2 = (-45.0, -10.0, 15.0), (50.0, 20.0, -40.0)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]  # fmt: skip


def _grid(shift):
    return Geometry((48, 44, 40), (6.5, 5.5, 8.0), tuple(np.add((-155.0, -120.0, -160.0), shift)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Three visits, patient moved, one finding shrinking, one new, model probabilities."""
    visits = [
        Visit(0, _grid((0, 0, 0)), None, {"a": (L1, 20.0)}),
        Visit(28, _grid((5, -4, 6)), rigid_motion((4, -3, 5), (8, -6, 10)),
              {"a": (L1, 17.0), "b": (L2, 14.0)}),
        Visit(63, _grid((-6, 3, -5)), rigid_motion((-3, 4, -2), (-7, 5, -8)),
              {"a": (L1, 14.0), "b": (L2, 16.0)}),
    ]  # fmt: skip
    tps = build(visits, probabilities=[0.91, 0.83, 0.71])
    out = tmp_path_factory.mktemp("report")
    result = compare(tps, out=out, formats=["png", "html", "json"])
    return result, out


def _chromium(args, tmp_path, timeout=120):
    chromium = require_tool("chromium")
    profile = tmp_path / "chromium-profile"
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_report_renders_in_chromium_without_overflow(report, tmp_path):
    _, out = report
    page = (out / "report.html").read_text(encoding="utf-8")
    probe = page.replace(
        "</body>",
        "<script>window.addEventListener('load', () => {"
        "const d = document.documentElement;"
        "document.body.setAttribute('data-probe', JSON.stringify({"
        "scroll: d.scrollWidth, client: d.clientWidth,"
        "images: Array.from(document.images).map(i => ["
        "i.complete, i.naturalWidth, Math.ceil(i.getBoundingClientRect().right)])}));"
        "});</script></body>",
    )
    probe_path = tmp_path / "probe.html"
    probe_path.write_text(probe, encoding="utf-8")
    run = _chromium(["--window-size=1280,900", "--virtual-time-budget=10000", "--dump-dom",
                     probe_path.as_uri()], tmp_path)  # fmt: skip
    found = re.search(r'data-probe="([^"]*)"', run.stdout)
    assert found, run.stderr[-2000:]
    data = json.loads(html.unescape(found.group(1)))
    assert data["client"] <= 1280 and data["scroll"] <= data["client"]  # no horizontal overflow
    assert len(data["images"]) >= 6
    for complete, natural_width, right in data["images"]:
        assert complete and natural_width > 0 and right <= data["client"]
    shot = tmp_path / "report.png"
    _chromium(["--window-size=1280,2400", f"--screenshot={shot}", (out / "report.html").as_uri()],
              tmp_path)  # fmt: skip
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        pixels = np.asarray(im.convert("L"), np.float32)
    assert pixels.std() > 20  # text, tables and pictures, not a blank page


@pytest.mark.slow
def test_report_is_self_contained_and_says_what_a_reader_needs(report):
    result, out = report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)  # no network
    assert "<script" not in page and "<link" not in page
    for needed in ("Caveat", "not necessarily a change in the disease", "Summary",
                   "Findings by visit", "Registration quality", "Registration check",
                   "Difference", "Settings", "Activation threshold", "maximum over all visits",
                   "gradcam"):  # fmt: skip
        assert needed in page, needed
    # one summary sentence per finding, with volumes in mL
    for f in result.findings:
        assert f"{f.name}:" in page
    assert "new on" in page and " mL" in page
    # human column names with units, not raw keys
    assert "Activated volume (mL)" in page and "volume_change_pct" not in page.split("<details")[0]
    assert "Model probability" in page  # shown because probabilities are known


def test_report_without_probability_has_no_probability_column(tmp_path):
    grid = Geometry((30, 26, 24), (10.0, 9.0, 12.0), (-150.0, -115.0, -140.0))
    tps = build([Visit(0, grid, None, {"a": (L1, 22.0)}), Visit(40, grid, None, {})])
    compare(tps, registration="none", out=tmp_path, formats=["html", "png"])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Model probability</th>" not in page  # no empty column
    assert "resolved on" in page
    pictures = {p.name for p in tmp_path.glob("*.png")}
    assert {"visits.png", "registration.png", "findings.png", "trend.png"} <= pictures


def test_views_are_radiological_with_the_right_letters():
    """A marker at the patient's left (LPS +x), anterior (-y) and superior (+z) of the centre
    lands on the screen side its letter names, for an axial and an oblique-free LAS-like grid."""
    for flip in (1.0, -1.0):
        affine = np.diag([2.0 * flip, 2.0, 3.0, 1.0])
        affine[:3, 3] = [-40.0 * flip, -40.0, -45.0]
        shape = (41, 41, 31)
        centre = (20, 20, 15)
        vol = np.zeros(shape, np.float32)
        inv = np.linalg.inv(affine)

        def put(point, value, vol=vol, inv=inv):
            idx = np.rint((inv @ np.append(point, 1.0))[:3]).astype(int)
            vol[tuple(idx)] = value

        origin = (affine @ np.append(centre, 1.0))[:3]
        put(origin + np.array([20.0, 0, 0]), 1.0)  # patient left
        put(origin + np.array([0, -20.0, 0]), 2.0)  # anterior
        put(origin + np.array([0, 0, 21.0]), 3.0)  # superior
        v = {k: a for k, (a, _) in views(vol, affine, centre).items()}
        mid_r, mid_c = (np.array(v["axial"].shape) - 1) / 2
        (r, c) = np.argwhere(v["axial"] == 1.0)[0]
        assert c > mid_c and MARKERS["axial"][1] == "L"  # left of the patient: screen right
        (r, c) = np.argwhere(v["axial"] == 2.0)[0]
        assert r < mid_r and MARKERS["axial"][2] == "A"  # anterior: top
        (r, c) = np.argwhere(v["coronal"] == 3.0)[0]
        assert r < (v["coronal"].shape[0] - 1) / 2 and MARKERS["coronal"][2] == "S"
        (r, c) = np.argwhere(v["coronal"] == 1.0)[0]
        assert c > (v["coronal"].shape[1] - 1) / 2 and MARKERS["coronal"][1] == "L"
        (r, c) = np.argwhere(v["sagittal"] == 2.0)[0]
        assert c < (v["sagittal"].shape[1] - 1) / 2 and MARKERS["sagittal"][0] == "A"


@pytest.mark.slow
def test_cli_compare_formats_and_strict(tmp_path):
    """--format picks the difference-map files; --strict refuses a flagged visit (exit 2)."""
    from medcam.io.scan import load_scan
    from medcam.writers.nifti import heatmap_to_nifti
    from tests.longitudinal.phantoms import sphere_on

    grid = Geometry((40, 36, 30), (8.0, 7.0, 10.0), (-156.0, -122.0, -145.0))
    visits = [Visit(0, grid, None, {"a": (L1, 20.0)}), Visit(30, grid, None, {"a": (L1, 18.0)}),
              Visit(60, grid, None, {"a": (L1, 16.0)}, blank=True)]  # fmt: skip
    tps = build(visits)
    rows = ["scan,heatmap,date,label"]
    for i, (tp, v) in enumerate(zip(tps, visits, strict=True)):
        scan_img = heatmap_to_nifti(tp.image, np.diag([-1.0, -1, 1, 1]) @ tp.affine_lps)
        scan_img.to_filename(tmp_path / f"scan{i}.nii.gz")
        s = load_scan(tmp_path / f"scan{i}.nii.gz")
        heat = sphere_on(s.affine_lps, s.spatial_shape, L1, v.findings["a"][1])
        heatmap_to_nifti(heat, s.affine_ras).to_filename(tmp_path / f"heat{i}.nii.gz")
        rows.append(f"scan{i}.nii.gz,heat{i}.nii.gz,{v.date.isoformat()},visit {i}")
    manifest = tmp_path / "visits.csv"
    manifest.write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    out = tmp_path / "out"
    ok = runner.invoke(main_cli(), ["compare", "--manifest", str(manifest), "--out", str(out),
                                    "--format", "nifti,png,json"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "FLAGGED" in ok.output and "images disagree" in ok.output  # the blank visit
    assert "Finding 1:" in ok.output
    names = {p.name for p in out.iterdir()}
    assert {"difference_visit_1.nii.gz", "difference_visit_1.png", "longitudinal.json"} <= names
    assert "report.html" not in names and not any(n.endswith(".dcm") for n in names)
    strict = runner.invoke(main_cli(), ["compare", "--manifest", str(manifest), "--out",
                                        str(tmp_path / "strict"), "--strict"])  # fmt: skip
    assert strict.exit_code == 2 and "Refusing to report (strict)" in strict.output
    bad = runner.invoke(main_cli(), ["compare", "--manifest", str(manifest), "--out",
                                     str(tmp_path / "bad"), "--format", "dicom-pm"])  # fmt: skip
    assert bad.exit_code == 2 and "not a DICOM series" in bad.output


def main_cli():
    from medcam.cli import main

    return main
