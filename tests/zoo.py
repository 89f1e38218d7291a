"""MONAI model-zoo bundles vendored in tests/bundles/, made runnable with random weights.

Only configs (and a bundle's ``scripts/`` code) are vendored, exactly as published; weights
cannot be downloaded here, so each test bundle gets seeded random weights built from its own
``network_def``. See tests/bundles/README.md for the source commit and licence.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ZOO = Path(__file__).parent / "bundles"
ROOT = Path(__file__).parent.parent
MEDCAM_CONFIG = ROOT / "configs" / "medcam.json"


def make_bundle(name: str, dest: Path, *, drop: Sequence[str] = (), seed: int = 0) -> Path:
    """Copy zoo bundle ``name`` to ``dest/name`` with seeded random weights in models/model.pt.

    ``drop``: ``network_def`` keys to delete from the config first, as a user must for keys a
    newer MONAI removed (SwinUNETR's ``img_size``).
    """
    from monai.bundle import ConfigParser

    from medcam.bundle import bundle_imports

    root = dest / name
    shutil.copytree(ZOO / name, root)
    config = next((root / "configs").glob("inference.*"))
    if drop:
        data = json.loads(config.read_text())
        for key in drop:
            data["network_def"].pop(key)
        config.write_text(json.dumps(data, indent=4))
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(root)
    with bundle_imports(root):
        torch.manual_seed(seed)
        network = parser.get_parsed_content("network_def", instantiate=True)
    (root / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def write_ct(path: Path, shape: Sequence[int], spacing: Sequence[float], seed: int = 0):
    """A CT-like torso (HU) with a liver lesion as NIfTI on an axis-aligned LPS grid;
    returns the geometry."""
    import nibabel as nib

    from medcam.data.synthetic import LPS_TO_RAS, Geometry, torso_phantom

    half = (np.asarray(shape, float) - 1) * np.asarray(spacing) / 2
    geometry = Geometry(tuple(shape), tuple(spacing), tuple(-half))
    hu = torso_phantom(geometry, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, LPS_TO_RAS @ geometry.affine_lps), path)
    return geometry


def run_bundle(
    bundle: Path, *args: str, run_id: str = "run", medcam: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` on ``bundle``'s inference config (+ configs/medcam.json),
    with the bundle's own command-line overrides ``args``; fails the test on a non-zero exit."""
    config = next((bundle / "configs").glob("inference.*"))
    files = [str(config), str(MEDCAM_CONFIG)] if medcam else [str(config)]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(files),
           "--bundle_root", str(bundle), *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def medcam_maps(folder: Path) -> dict[str, Path]:
    """NIfTI heatmaps in a medcam output folder, keyed by the sha256 of their input."""
    maps = {}
    for sidecar in folder.rglob("*.json"):
        record = json.loads(sidecar.read_text())
        if "outputs" not in record:
            continue
        maps[record["input"]["sha256"]] = sidecar.parent / record["outputs"]["files"]["nifti"][0]
    return maps
