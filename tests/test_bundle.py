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


# --- trust: bundles outside MEDCAM_TRUSTED_BUNDLES are refused before anything of them runs ---


def _marked_bundle(dest: Path, marker: Path) -> Path:
    """The classify3d example bundle whose network_def and preprocessing run code (create
    ``marker``) when MONAI evaluates them, as any `$` expression can."""
    import json
    import shutil

    shutil.copytree(ROOT / "examples" / "bundles" / "classify3d", dest)
    config = dest / "configs" / "inference.json"
    data = json.loads(config.read_text())
    touch = f"$__import__('pathlib').Path(r'{marker}').touch()"
    data["network_def"]["in_channels"] = f"{touch} or 1"
    scale = data["preprocessing"]["transforms"][4]
    assert scale["_target_"] == "ScaleIntensityRanged"
    scale["a_min"] = f"{touch} or {scale['a_min']}"
    config.write_text(json.dumps(data, indent=4))
    return dest


def test_bundles_outside_the_allow_list_are_refused_before_parsing(tmp_path, monkeypatch):
    import os

    from medcam.bundle import load_bundle
    from medcam.errors import TrustError

    marker = tmp_path / "ran"
    trusted = tmp_path / "trusted"
    (trusted / "sub").mkdir(parents=True)
    outside = _marked_bundle(tmp_path / "downloads" / "b", marker)
    look_alike = _marked_bundle(tmp_path / "trusted-not" / "b", marker)  # a prefix, not inside
    link = trusted / "link"
    link.symlink_to(outside, target_is_directory=True)  # inside by name, outside in fact
    for bundle in (outside, look_alike, link):
        with pytest.raises(TrustError, match="Refused to load the bundle") as info:
            load_bundle(bundle, trusted=[trusted])
        assert str(trusted) in str(info.value) and "MEDCAM_TRUSTED_BUNDLES" in str(info.value)
        monkeypatch.setenv(
            "MEDCAM_TRUSTED_BUNDLES", f"{tmp_path / 'elsewhere'}{os.pathsep}{trusted}"
        )
        with pytest.raises(TrustError):
            load_bundle(bundle)  # the environment variable is the default
        monkeypatch.delenv("MEDCAM_TRUSTED_BUNDLES")
    assert not marker.exists()
    # the same bundle inside a trusted folder (any depth) loads, and its code does run
    inside = _marked_bundle(trusted / "sub" / "b", marker)
    monkeypatch.setenv("MEDCAM_TRUSTED_BUNDLES", f"{tmp_path / 'elsewhere'}{os.pathsep}{trusted}")
    assert load_bundle(inside).network is not None
    assert marker.exists()
    # unset or empty: every bundle loads, as in MONAI
    marker.unlink()
    monkeypatch.setenv("MEDCAM_TRUSTED_BUNDLES", "")
    load_bundle(outside)
    assert marker.exists()


def test_every_command_refuses_an_untrusted_bundle(tmp_path, phantom_cases):
    """explain, layers, compare, cohort run and listen: one line, exit 2, the bundle's code
    never runs; `--trusted-bundles` and MEDCAM_TRUSTED_BUNDLES both work, and the option does
    not outlive the command."""
    import os

    from click.testing import CliRunner

    from medcam.cli import main

    marker = tmp_path / "ran"
    bundle = str(_marked_bundle(tmp_path / "downloads" / "b", marker))
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    scans = sorted(str(p) for p in phantom_cases[0].glob("*.nii.gz"))
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case_id,input\na,{scans[0]}\n")
    commands = {
        "explain": ["explain", scans[0], "--out", str(tmp_path / "o1"), "--bundle", bundle],
        "layers": ["layers", "--bundle", bundle],
        "compare": ["compare", *scans, "--out", str(tmp_path / "o2"), "--bundle", bundle],
        "cohort": ["cohort", "run", "--manifest", str(manifest), "--out", str(tmp_path / "o3"),
                   "--bundle", bundle],
        "listen": ["listen", "--store-to", str(tmp_path / "o4"), "--state",
                   str(tmp_path / "state"), "--port", "0", "--bundle", bundle],
    }  # fmt: skip
    before = os.environ.get("MEDCAM_TRUSTED_BUNDLES")
    for name, args in commands.items():
        for how in ("option", "env"):
            if how == "option":
                result = CliRunner().invoke(main, ["--trusted-bundles", str(trusted), *args])
            else:
                result = CliRunner(env={"MEDCAM_TRUSTED_BUNDLES": str(trusted)}).invoke(main, args)
            assert result.exit_code == 2, (name, how, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and "Refused to load the bundle" in lines[0], (name, lines)
            assert os.environ.get("MEDCAM_TRUSTED_BUNDLES") == before
    assert not marker.exists()
    for out in ("o1", "o2", "o3"):
        assert not any(p.is_file() for p in (tmp_path / out).rglob("*.nii.gz"))


@pytest.mark.slow
def test_monai_bundle_run_refuses_an_untrusted_bundle(tmp_path, phantom_cases):
    """Under `python -m monai.bundle run` with configs/medcam.json, a bundle outside
    MEDCAM_TRUSTED_BUNDLES is refused by the first step medcam adds to `initialize`, before the
    handler, the preprocessing, the evaluator and its network are built: their code never runs
    and nothing is written."""
    import os

    marker = tmp_path / "ran"
    bundle = _marked_bundle(tmp_path / "downloads" / "b", marker)
    out = tmp_path / "eval"
    config = f"['{bundle / 'configs' / 'inference.json'}','{ROOT / 'configs' / 'medcam.json'}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config,
           "--bundle_root", str(bundle), "--dataset_dir", str(phantom_cases[0]),
           "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "MEDCAM_TRUSTED_BUNDLES": str(tmp_path / "trusted")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    assert "TrustError" in done.stderr and "Refused to load the bundle" in done.stderr
    assert not marker.exists()
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_the_handler_turns_an_unforeseen_failure_into_a_medcam_error(
    tmp_path, phantom_cases, monkeypatch
):
    """A failure medcam does not foresee (simulated: a ZeroDivisionError where the map is put
    back on the scan) is a MedcamError naming the case, its cause the original; with
    on_error="log" the case is recorded as failed and nothing is written."""
    from types import SimpleNamespace

    from monai.transforms import LoadImage

    import medcam.space
    from medcam.bundle import CAMHandler, load_bundle
    from medcam.errors import MedcamError

    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated")

    monkeypatch.setattr(medcam.space, "on_source", broken)
    network = load_bundle(ROOT / "examples" / "bundles" / "classify3d").network
    scan = sorted(phantom_cases[0].glob("*.nii.gz"))[0]
    image = LoadImage(ensure_channel_first=True, image_only=True)(str(scan))
    engine = SimpleNamespace(  # what the handler reads from a MONAI evaluator
        network=network,
        state=SimpleNamespace(batch=[{"image": image}]),
        data_loader=SimpleNamespace(dataset=SimpleNamespace(transform=None)),
    )
    raising = CAMHandler(tmp_path / "a", target=1, formats=["nifti", "json"])
    with pytest.raises(MedcamError, match="Unexpected ZeroDivisionError while explaining") as info:
        raising(engine)
    assert str(scan) in str(info.value) and isinstance(info.value.__cause__, ZeroDivisionError)
    logging = CAMHandler(tmp_path / "b", target=1, formats=["nifti", "json"], on_error="log")
    logging(engine)
    assert [f["input"] for f in logging.failed] == [str(scan)] and not logging.written
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_bundle_run_with_a_calibration(tmp_path, phantom_cases):
    """configs/medcam.json's `calibration`: the file's layers and method are explained and its
    line is recorded in every sidecar; one made for other weights stops the run."""
    import json

    from medcam.runner import load_model
    from medcam.writers.sidecar import model_identity

    folder, _, _ = phantom_cases
    network = load_model(bundle=ROOT / "examples" / "bundles" / "classify3d").network
    why = "calibrated on 4 labelled cases: hirescam @ class_layers.relu: (test)"
    record = {"layers": ["class_layers.relu"], "method": "hirescam", "fusion": None,
              "chosen_by": why, "model": model_identity(network)}  # fmt: skip
    saved = tmp_path / "calibration.json"
    saved.write_text(json.dumps(record))
    out = tmp_path / "out"
    _run_bundle("classify3d", folder, out, "--medcam#target", "1",
                "--medcam#calibration", str(saved))  # fmt: skip
    sidecars = list((out / "medcam").glob("*/*.json"))
    assert len(sidecars) == 2
    for sidecar in sidecars:
        explanation = json.loads(sidecar.read_text())["explanation"]
        assert explanation["layers"] == ["class_layers.relu"]
        assert explanation["method"] == "hirescam"
        assert explanation["layers_chosen_by"] == explanation["method_chosen_by"] == why
    record["model"]["state_dict_sha256"] = "0" * 64
    saved.write_text(json.dumps(record))
    with pytest.raises(AssertionError, match="made for another model"):
        _run_bundle("classify3d", folder, tmp_path / "other", "--medcam#target", "1",
                    "--medcam#calibration", str(saved))  # fmt: skip
