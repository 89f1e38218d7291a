"""`python -m monai.bundle run` with configs/medcam.json merged onto the example bundles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medcam.data.synthetic import LPS_TO_RAS

ROOT = Path(__file__).parent.parent


def _run_bundle(name: str, data: Path, out: Path, *overrides: str) -> None:
    bundle = ROOT / "examples" / "bundles" / name
    config = f"['{bundle / 'configs' / 'inference.json'}','{ROOT / 'configs' / 'medcam.json'}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config,
           "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(out),
           *overrides]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _maps(out: Path) -> dict[str, Path]:
    import json

    maps = {}
    for sidecar in (out / "medcam").glob("*/*.json"):  # one folder per case
        record = json.loads(sidecar.read_text())
        maps[record["input"]["sha256"]] = sidecar.parent / record["outputs"]["files"]["nifti"][0]
    return maps


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _peak_lps(path: Path) -> np.ndarray:
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    peak = np.unravel_index(int(np.argmax(data)), data.shape)
    return (LPS_TO_RAS @ img.affine @ np.append(np.asarray(peak, float), 1.0))[:3]


@pytest.mark.parametrize(
    ("bundle", "overrides", "tolerance_mm", "method"),
    [
        ("classify3d", ["--medcam#target", "1"], 12.0, "gradcam"),
        ("segment3d", ["--medcam#target", "1"], 12.0, "layercam"),
    ],
)
def test_bundle_run_writes_aligned_heatmaps(
    tmp_path, phantom_cases, bundle, overrides, tolerance_mm, method
):
    folder, lesion, _ = phantom_cases
    out = tmp_path / "out"
    _run_bundle(bundle, folder, out, *overrides)
    maps = _maps(out)
    for name in ("a_lesion", "b_none"):
        src_path = folder / f"{name}.nii.gz"
        heat = maps[_sha(src_path)]
        src, img = nib.load(src_path), nib.load(heat)
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
    assert np.linalg.norm(_peak_lps(maps[_sha(folder / "a_lesion.nii.gz")]) - lesion) < tolerance_mm
    # configs/medcam.json's defaults: layers and method chosen by the auto rules, recorded
    import json

    for sidecar in (out / "medcam").glob("*/*.json"):
        explanation = json.loads(sidecar.read_text())["explanation"]
        assert explanation["layers_chosen_by"].startswith("auto: ")
        assert explanation["method"] == method
        assert explanation["method_chosen_by"].startswith("auto: ")
