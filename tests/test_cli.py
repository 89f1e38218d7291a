"""The command line, end to end, outputs checked for geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from click.testing import CliRunner

import medcam
from medcam.cli import main
from medcam.data.synthetic import LPS_TO_RAS

BUNDLES = Path(__file__).parent.parent / "examples" / "bundles"


def _peak_lps(path: Path) -> np.ndarray:
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    peak = np.unravel_index(int(np.argmax(data)), data.shape)
    return (LPS_TO_RAS @ img.affine @ np.append(np.asarray(peak, float), 1.0))[:3]


def test_help_everywhere():
    runner = CliRunner()
    for args in ([], ["explain"], ["layers"], ["demo"]):
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_demo(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "class 1" in result.output
    assert "classifier/classifier_gradcam_class1_pm.dcm" in result.output
    source = medcam.load_scan(out / "inputs" / "dicom")
    nii = nib.load(out / "classifier" / "classifier_gradcam_class1.nii.gz")
    assert nii.shape == source.spatial_shape
    np.testing.assert_allclose(nii.affine, source.affine_ras, atol=1e-4)
    record = json.loads((out / "classifier" / "classifier.json").read_text())
    # the default fuses the 6^3 last layer with the 12^3 layer (1/4 of the 48^3 input)
    assert record["explanation"]["feature_shapes"] == {
        "features.transition1.conv": [12, 12, 12],
        "class_layers.relu": [6, 6, 6],
    }
    assert record["explanation"]["layers_chosen_by"].startswith("auto: ")
    # the summary line reports distances; both heatmaps peak near the lesion
    from medcam.demo import LESION_OFFSET_MM, demo_geometry

    g = demo_geometry()
    lesion = g.affine_lps[:3] @ np.append((np.array(g.shape) - 1) / 2, 1.0) + LESION_OFFSET_MM
    # on the lesion (radius 12 mm), not just near it
    cls_nii = out / "classifier" / "classifier_gradcam_class1.nii.gz"
    assert np.linalg.norm(_peak_lps(cls_nii) - lesion) < 12
    seg_nii = out / "segmenter" / "segmenter_layercam_class1.nii.gz"
    assert np.linalg.norm(_peak_lps(seg_nii) - lesion) < 12
    pm = pydicom.dcmread(out / "classifier" / "classifier_gradcam_class1_pm.dcm")
    assert pm.Modality == "OT" or pm.SOPClassUID.name == "Parametric Map Storage"
    assert len(list((out / "classifier" / "classifier_gradcam_class1_sc").iterdir())) == g.shape[2]


def test_explain_with_bundle_on_a_folder_of_cases(tmp_path, phantom_cases):
    folder, lesion, _ = phantom_cases
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["explain", str(folder), "--out", str(out), "--bundle", str(BUNDLES / "classify3d"),
         "--target", "1", "--format", "nifti,json", "--name-from-input"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lesion_map = out / "a_lesion" / "a_lesion_gradcam_class1.nii.gz"
    none_map = out / "b_none" / "b_none_gradcam_class1.nii.gz"
    assert lesion_map.exists() and none_map.exists()
    src = nib.load(folder / "a_lesion.nii.gz")
    assert nib.load(lesion_map).shape == src.shape
    np.testing.assert_allclose(nib.load(lesion_map).affine, src.affine, atol=1e-4)
    assert np.linalg.norm(_peak_lps(lesion_map) - lesion) < 20
    record = json.loads((out / "a_lesion" / "a_lesion.json").read_text())
    assert record["explanation"]["probabilities"][0] > 0.9


def test_explain_with_model_factory_on_dicom(tmp_path, phantom_cases):
    from medcam.data.demo import ct_phantom
    from medcam.data.synthetic import write_dicom_series

    _, lesion, g = phantom_cases
    write_dicom_series(ct_phantom(g, lesion), g, tmp_path / "series", shuffle=True)
    weights = Path(medcam.__file__).parent / "data" / "weights" / "demo_classifier.pt"
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["explain", str(tmp_path / "series"), "--out", str(out),
         "--model", "medcam.data.demo:demo_classifier", "--weights", str(weights),
         "--preprocess", "medcam.data.demo:demo_preprocess", "--layer", "features.denseblock2",
         "--layer", "class_layers.relu", "--fusion", "product", "--method", "gradcam++",
         "--format", "nifti,dicom-pm,json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (case,) = list(out.iterdir())
    assert case.name.startswith("case-")
    record = json.loads(next(case.glob("*.json")).read_text())
    assert record["explanation"]["fusion"] == "product"
    assert record["explanation"]["method"] == "gradcam++"
    nii = next(case.glob("*.nii.gz"))
    assert np.linalg.norm(_peak_lps(nii) - lesion) < 20


def test_layers_command():
    result = CliRunner().invoke(main, ["layers", "--bundle", str(BUNDLES / "classify3d")])
    assert result.exit_code == 0, result.output
    assert "class_layers.relu" in result.output and "(1, 40, 6, 6, 6)" in result.output
    sized = CliRunner().invoke(
        main, ["layers", "--bundle", str(BUNDLES / "classify3d"), "--input-size", "96,96,96"]
    )
    assert "(1, 40, 12, 12, 12)" in sized.output


def test_clear_errors(tmp_path, phantom_cases):
    folder, _, _ = phantom_cases
    runner = CliRunner()
    both = runner.invoke(main, ["explain", str(folder), "--out", str(tmp_path / "o"), "--bundle",
                                str(BUNDLES / "classify3d"), "--model", "x:y"])  # fmt: skip
    assert both.exit_code == 2 and "exactly one of --bundle" in both.output
    # a bundle that ships only TorchScript
    ts_bundle = tmp_path / "ts_bundle"
    (ts_bundle / "configs").mkdir(parents=True)
    (ts_bundle / "models").mkdir()
    config = (BUNDLES / "classify3d" / "configs" / "inference.json").read_text()
    (ts_bundle / "configs" / "inference.json").write_text(config)
    net = torch.jit.script(torch.nn.Conv3d(1, 1, 1))
    net.save(str(ts_bundle / "models" / "model.ts"))
    ts = runner.invoke(main, ["explain", str(folder), "--out", str(tmp_path / "o"), "--bundle",
                              str(ts_bundle)])  # fmt: skip
    assert ts.exit_code == 2 and "TorchScript" in ts.output and "model.pt" in ts.output
    bad_layer = runner.invoke(main, ["explain", str(folder), "--out", str(tmp_path / "o"),
                                     "--bundle", str(BUNDLES / "classify3d"), "--layer",
                                     "class_layers.rleu"])  # fmt: skip
    assert bad_layer.exit_code == 2 and "class_layers.relu" in bad_layer.output
    bad_format = runner.invoke(main, ["explain", str(folder), "--out", str(tmp_path / "o"),
                                      "--bundle", str(BUNDLES / "classify3d"), "--format",
                                      "nifti,gif"])  # fmt: skip
    assert bad_format.exit_code == 2 and "gif" in bad_format.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_dicom_format_for_nifti_inputs_is_refused_before_the_model_runs(tmp_path, phantom_cases):
    folder, _, _ = phantom_cases  # a folder of NIfTI cases
    result = CliRunner().invoke(
        main,
        ["explain", str(folder), "--out", str(tmp_path / "o"), "--model",
         "tests.helpers:exploding_model", "--format", "nifti,dicom-seg"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "dicom-seg" in result.output and "'nifti'" in result.output
    assert "forward ran" not in result.output  # refused before the model ran
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_explain_in_sliding_windows(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(0, 1, (40, 36, 30)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.2, 2.0, 1.0])), tmp_path / "big.nii.gz")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["explain", str(tmp_path / "big.nii.gz"), "--out", str(out), "--model",
         "tests.helpers:identity_segmenter", "--layer", "conv", "--method", "hirescam",
         "--target", "seg:1", "--roi-size", "16,16,16", "--sw-batch-size", "4",
         "--format", "nifti,json", "--name-from-input"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    heat = np.asarray(nib.load(out / "big" / "big_hirescam_class1.nii.gz").dataobj)
    np.testing.assert_allclose(heat, np.maximum(data, 0), rtol=1e-5, atol=1e-5)
    record = json.loads((out / "big" / "big.json").read_text())
    assert record["explanation"]["sliding_window"]["roi_size"] == [16, 16, 16]


def test_any_failure_is_one_line_and_debug_shows_the_traceback(tmp_path, phantom_cases):
    folder, _, _ = phantom_cases
    args = ["explain", str(folder / "a_lesion.nii.gz"), "--out", str(tmp_path / "o"), "--model",
            "tests.helpers:exploding_model", "--layer", "conv", "--format", "nifti"]  # fmt: skip
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code in (1, 2)
    lines = [x for x in plain.output.splitlines() if x and not x.startswith("cases:")]  # progress
    assert len(lines) == 1 and lines[0].startswith("medcam: error:") and "forward ran" in lines[0]
    assert "Traceback" not in plain.output
    debug = CliRunner().invoke(main, ["--debug", *args])
    assert debug.exit_code != 0 and isinstance(debug.exception, Exception)
    assert "forward ran" in "".join(__import__("traceback").format_exception(debug.exception))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_names_from_inputs_keep_versions_apart_and_refuse_clashes(tmp_path, phantom_cases):
    folder, _, _ = phantom_cases
    src = folder / "a_lesion.nii.gz"
    for name in ("pat.v1.nii.gz", "pat.v2.nii.gz", "x/scan.nii.gz", "y/scan.nii.gz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(src.read_bytes())
    common = ["--model", "tests.helpers:intensity_cam_3d", "--layer", "conv", "--target", "0",
              "--format", "nifti,json", "--name-from-input"]  # fmt: skip
    out = tmp_path / "out"
    ok = CliRunner().invoke(
        main,
        [
            "explain",
            str(tmp_path / "pat.v1.nii.gz"),
            str(tmp_path / "pat.v2.nii.gz"),
            "--out",
            str(out),
            *common,
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in out.iterdir()) == ["pat.v1", "pat.v2"]
    clash = CliRunner().invoke(main, ["explain", str(tmp_path / "x" / "scan.nii.gz"),
                                      str(tmp_path / "y" / "scan.nii.gz"), "--out",
                                      str(tmp_path / "o2"), *common])  # fmt: skip
    assert clash.exit_code == 2 and "both be written to case folder 'scan'" in clash.output
    assert not (tmp_path / "o2").exists()


def test_layers_input_size_is_checked():
    for bad in ("32,x", "0,32,32", "32", "1,2,3,4", "-4,8"):
        result = CliRunner().invoke(
            main, ["layers", "--model", "tests.helpers:intensity_cam_3d", "--input-size", bad]
        )
        assert result.exit_code == 2, (bad, result.output)
        assert "--input-size" in result.output and "positive integers" in result.output


def test_window_options_are_checked_before_the_model_runs(tmp_path, phantom_cases):
    """A size that is not 2 or 3 positive integers, an overlap outside [0, 1), a batch of no
    windows: one line, exit 2, no output folder."""
    scan = str(sorted(phantom_cases[0].glob("*.nii.gz"))[0])
    model = ["--model", "tests.helpers:intensity_cam_3d"]
    for bad in (["--roi-size", "0,16,16"], ["--roi-size", "-4,16,16"], ["--roi-size", "16,,16"],
                ["--roi-size", "16"], ["--roi-size", "16,16,16", "--overlap", "1.0"],
                ["--roi-size", "16,16,16", "--overlap", "-0.1"],
                ["--roi-size", "16,16,16", "--sw-batch-size", "0"]):  # fmt: skip
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["explain", scan, "--out", str(out), *model, *bad])
        assert result.exit_code == 2, (bad, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("medcam:")]
        assert len(lines) == 1 and lines[0].startswith("medcam: error: "), (bad, result.output)
        assert not out.exists() or not any(out.iterdir()), bad


def test_progress_lines_per_case_and_quiet(tmp_path, phantom_cases):
    folder, _, _ = phantom_cases
    args = ["explain", str(folder), "--model", "tests.helpers:intensity_cam_3d", "--layer", "conv",
            "--target", "0", "--format", "nifti,json"]  # fmt: skip
    loud = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert loud.exit_code == 0, loud.output
    lines = [line for line in loud.output.splitlines() if "outputs): " in line]
    assert len(lines) == 2  # one per case, with its stage times
    assert "case/s" not in loud.output and "\r" not in loud.output  # no bar without a terminal
    for line in lines:
        for stage in ("load", "preprocess", "explain", "back to scan", "nifti", "json"):
            assert f"{stage} " in line.split("outputs): ", 1)[1]
    quiet = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.output == ""
    assert len(list((tmp_path / "b").rglob("*.nii.gz"))) == 2


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), scan)
    out = tmp_path / "new" / "out"
    model = ["--model", "tests.helpers:exploding_model", "--layer", "conv"]
    run = CliRunner().invoke(main, ["explain", str(scan), "--out", str(out), *model])
    assert run.exit_code != 0 and "forward ran" in run.output
    assert not out.exists()
    # a folder that was there before stays, with what it held
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    run = CliRunner().invoke(main, ["explain", str(scan), "--out", str(out), *model])
    assert run.exit_code != 0 and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
