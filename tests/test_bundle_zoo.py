"""Real MONAI model-zoo bundles (configs and scripts/ as published, seeded random weights),
explained both ways a user would: ``python -m monai.bundle run`` + configs/medcam.json with
the bundle's own command-line overrides, and ``medcam explain --bundle``.

What is checked: the bundle's own outputs are unchanged by medcam; heatmaps lie on each input's
own grid; the two paths give the same heatmap; sliding windows are followed as the bundle's
inferer runs them; bundles with scripts/, YAML configs, JSON and CSV data lists, no output_dir key,
num_workers > 0, AMP, Invertd/SaveImaged postprocessing all keep working.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medcam.cli import main
from medcam.io.scan import load_scan
from tests.external import missing
from tests.zoo import ROOT, ZOO, make_bundle, medcam_maps, run_bundle, write_ct


def _require_itk() -> None:
    """The swin bundle reads with ITKReader, which needs the itk package."""
    try:
        import itk  # noqa: F401
    except ImportError:
        missing('the itk package is not installed (pip install -e ".[dev]" installs itk-io)')


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _one_map(folder: Path) -> Path:
    maps = list(medcam_maps(folder).values())
    assert len(maps) == 1, maps
    return maps[0]


def _same_map(a: Path, b: Path) -> None:
    ia, ib = nib.load(a), nib.load(b)
    np.testing.assert_allclose(ia.affine, ib.affine, atol=1e-5)
    da, db = np.asarray(ia.dataobj), np.asarray(ib.dataobj)
    assert da.shape == db.shape and float(np.abs(da).max()) > 0
    np.testing.assert_allclose(da, db, rtol=1e-4, atol=1e-5 * float(np.abs(da).max()))


def _on_source_grid(heat: Path, source: Path) -> None:
    scan = load_scan(source)
    img = nib.load(heat)
    assert img.shape[:3] == scan.spatial_shape
    np.testing.assert_allclose(img.affine, scan.affine_ras, atol=1e-4)


def test_vendored_bundles_are_as_published():
    """Each vendored bundle keeps its licence and names the commit it came from."""
    readme = (ZOO / "README.md").read_text()
    for name in ("spleen_ct_segmentation", "swin_unetr_btcv_segmentation",
                 "renalStructures_UNEST_segmentation", "classification_template"):  # fmt: skip
        licence = (ZOO / name / "LICENSE").read_text().lstrip()
        assert licence.startswith(("Apache License", "MIT License"))
        assert name in readme
    assert "dfae206df112837d817e78d3727c9f32b3b52e82" in readme


@pytest.mark.slow
def test_spleen_bundle_both_paths(tmp_path):
    """spleen_ct_segmentation: SlidingWindowInferer 96^3 (overlap 0.5), amp true, 4 loader
    workers, Invertd + SaveImaged. A 180 x 165 x 56 CT (1 x 1 x 2.5 mm) becomes 120 x 110 x 70
    in model space: 4 windows, no size a UNet takes."""
    bundle = make_bundle("spleen_ct_segmentation", tmp_path)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["dataloader"]["num_workers"] > 0 and config["evaluator"]["amp"] is True
    source = tmp_path / "Task09" / "imagesTs" / "ct.nii.gz"
    write_ct(source, (180, 165, 56), (1.0, 1.0, 2.5))
    common = ["--dataset_dir", str(tmp_path / "Task09")]  # the bundle appends /imagesTs
    run_bundle(bundle, *common, "--output_dir", str(tmp_path / "alone"), medcam=False)
    run_bundle(bundle, *common, "--output_dir", str(tmp_path / "eval"),
               "--medcam#method", "layercam")  # fmt: skip
    # the bundle's own segmentation is exactly what it writes without medcam
    alone = nib.load(tmp_path / "alone" / "ct" / "ct_trans.nii.gz")
    seg = nib.load(tmp_path / "eval" / "ct" / "ct_trans.nii.gz")
    np.testing.assert_array_equal(np.asarray(alone.dataobj), np.asarray(seg.dataobj))
    heat = _one_map(tmp_path / "eval" / "medcam")
    _on_source_grid(heat, source)
    record = json.loads(next((tmp_path / "eval" / "medcam").rglob("*.json")).read_text())
    sw = record["explanation"]["sliding_window"]
    assert sw["roi_size"] == [96, 96, 96] and sw["overlap"] == 0.5 and sw["windows"] == 4
    assert record["explanation"]["model_input_shape"] == [1, 1, 120, 110, 70]
    # the CLI follows the same inferer and gives the same map
    _cli("explain", str(source), "--bundle", str(bundle), "--out", str(tmp_path / "cli"),
         "--method", "layercam", "--format", "nifti,json")  # fmt: skip
    _same_map(heat, _one_map(tmp_path / "cli"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spleen_bundle_on_cuda_with_amp(tmp_path):
    """On CUDA the spleen bundle runs its forward under autocast (amp: true); the heatmap is
    computed in float32 from the bundle's half-precision prediction, and matches the float32
    CLI path closely."""
    bundle = make_bundle("spleen_ct_segmentation", tmp_path)
    source = tmp_path / "Task09" / "imagesTs" / "ct.nii.gz"
    write_ct(source, (180, 165, 56), (1.0, 1.0, 2.5))
    run_bundle(bundle, "--dataset_dir", str(tmp_path / "Task09"), "--output_dir",
               str(tmp_path / "eval"), "--medcam#method", "layercam")  # fmt: skip
    heat = _one_map(tmp_path / "eval" / "medcam")
    _on_source_grid(heat, source)
    _cli("explain", str(source), "--bundle", str(bundle), "--out", str(tmp_path / "cli"),
         "--method", "layercam", "--device", "cuda", "--format", "nifti,json")  # fmt: skip
    a = np.asarray(nib.load(heat).dataobj).ravel()
    b = np.asarray(nib.load(_one_map(tmp_path / "cli")).dataobj).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.99


@pytest.mark.slow
def test_swin_unetr_bundle_both_paths(tmp_path):
    """swin_unetr_btcv_segmentation (14 classes, ITKReader, amp): its published config passes
    SwinUNETR's img_size, which MONAI 1.5 removed, so (as any user must) the key is dropped.
    SwinUNETR (62 M parameters) is the slowest network here, so both paths run it with the
    bundle's sliding window shrunk to 64^3 by the command-line overrides a user would give
    (`--inferer#roi_size`, `--roi-size`), on a CT whose model-space volume (64 x 58 x 44) is
    one padded window, and name the layer the default picks (`decoder1`, see docs/bundles.md)
    to spare the shape-tracing forward pass of `auto`. `medcam explain --bundle` does not build
    the bundle's LoadImaged, so needs no itk."""
    bundle = make_bundle("swin_unetr_btcv_segmentation", tmp_path, drop=["img_size"])
    source = tmp_path / "RawData" / "imagesTs" / "ct.nii.gz"
    write_ct(source, (80, 72, 30), (1.2, 1.2, 3.0))
    _cli("explain", str(source), "--bundle", str(bundle), "--out", str(tmp_path / "cli"),
         "--roi-size", "64,64,64", "--layer", "decoder1", "--format", "nifti,json")  # fmt: skip
    _require_itk()
    run_bundle(bundle, "--dataset_dir", str(tmp_path / "RawData"), "--output_dir",
               str(tmp_path / "eval"), "--inferer#roi_size", "[64,64,64]",
               "--medcam#layers", "['decoder1']")  # fmt: skip
    heat = _one_map(tmp_path / "eval" / "medcam")
    _on_source_grid(heat, source)
    assert (tmp_path / "eval" / "ct" / "ct_trans.nii.gz").exists()
    record = json.loads(next((tmp_path / "eval" / "medcam").rglob("*.json")).read_text())
    window = record["explanation"]["sliding_window"]
    assert window["windows"] == 1 and window["roi_size"] == [64, 64, 64]
    assert window["overlap"] == 0.5  # the rest of the bundle's inferer is kept
    assert record["explanation"]["model_input_shape"] == [1, 1, 64, 58, 44]
    # medcam.json's default method="auto": LayerCAM for a segmentation network
    assert record["explanation"]["method"] == "layercam"
    assert record["explanation"]["method_chosen_by"].startswith("auto: segmentation output")
    _same_map(heat, _one_map(tmp_path / "cli"))


@pytest.mark.slow
def test_unest_bundle_with_scripts_package(tmp_path):
    """renalStructures_UNEST_segmentation: network in the bundle's scripts/ package, run list
    named 'evaluating', a network that only takes 96^3 (block size), no initialize list. The
    layer the default picks (`decoder1`) is named, to spare `auto`'s shape-tracing forward of
    this 87 M-parameter network."""
    bundle = make_bundle("renalStructures_UNEST_segmentation", tmp_path)
    source = tmp_path / "data" / "ct.nii.gz"
    write_ct(source, (80, 72, 60), (1.0, 1.0, 1.5))
    run_bundle(bundle, "--dataset_dir", str(tmp_path / "data"), "--output_dir",
               str(tmp_path / "eval"), "--medcam#method", "hirescam",
               "--medcam#layers", "['decoder1']", run_id="evaluating")  # fmt: skip
    heat = _one_map(tmp_path / "eval" / "medcam")
    _on_source_grid(heat, source)
    # medcam explain --bundle imports scripts/ as MONAI's runner does
    _cli("explain", str(source), "--bundle", str(bundle), "--out", str(tmp_path / "cli"),
         "--method", "hirescam", "--layer", "decoder1", "--format", "nifti,json")  # fmt: skip
    _same_map(heat, _one_map(tmp_path / "cli"))


def _shapes_2d(folder: Path, n: int = 3) -> list[dict]:
    """2D NIfTI images of a circle / triangle / rectangle like the template's notebook."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:128, :128]
    items = []
    for i in range(n):
        label = 1 + i % 3
        img = np.zeros((128, 128), np.float32)
        if label == 1:
            img[(yy - 60) ** 2 + (xx - 70) ** 2 < 20**2] = 1
        elif label == 2:
            img[(yy > 40) & (yy < 90) & (abs(xx - 64) < (yy - 40) / 2)] = 1
        else:
            img[30:80, 50:100] = 1
        path = folder / f"img{i:02}.nii.gz"
        nib.save(nib.Nifti1Image(img, np.eye(4)), path)
        items.append({"image": str(path), "label": label})
    return items


def test_classification_template_yaml_json_datalist_no_output_dir(tmp_path):
    """classification_template: YAML config, data list from data/test_samples.json, no
    output_dir key (MONAI's runner then writes to <bundle_root>/eval), ThreadDataLoader; run
    with 2 loader workers."""
    bundle = make_bundle("classification_template", tmp_path)
    assert "output_dir" not in (bundle / "configs" / "inference.yaml").read_text()
    items = _shapes_2d(bundle / "data" / "test_data")
    (bundle / "data" / "test_samples.json").write_text(json.dumps(items))
    run_bundle(bundle, "--num_workers", "2", "--medcam#target", "2")
    maps = medcam_maps(bundle / "eval" / "medcam")
    assert len(maps) == 3
    _cli("explain", items[0]["image"], "--bundle", str(bundle), "--out", str(tmp_path / "cli"),
         "--target", "2", "--format", "nifti,json")  # fmt: skip
    cli_map = _one_map(tmp_path / "cli")
    sha = json.loads(next((tmp_path / "cli").rglob("*.json")).read_text())["input"]["sha256"]
    _same_map(maps[sha], cli_map)
    _on_source_grid(cli_map, Path(items[0]["image"]))


def test_wrong_rank_or_channels_refused_before_the_model_runs(tmp_path):
    """A single 2D CT slice into the 3D spleen bundle, a 3D volume into the 2D template: a
    one-line error saying what to give, no output, no traceback."""
    import pydicom.data

    spleen = make_bundle("spleen_ct_segmentation", tmp_path)
    template = make_bundle("classification_template", tmp_path)
    runner = CliRunner()
    slice_2d = pydicom.data.get_testdata_file("CT_small.dcm")
    result = runner.invoke(main, ["explain", slice_2d, "--bundle", str(spleen), "--out",
                                  str(tmp_path / "o1")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "is 2D" in result.output and "takes 3D" in result.output
    assert "DICOM series folder" in result.output and "Traceback" not in result.output
    volume = tmp_path / "v.nii.gz"
    write_ct(volume, (40, 40, 20), (2.0, 2.0, 2.0))
    result = runner.invoke(main, ["explain", str(volume), "--bundle", str(template), "--out",
                                  str(tmp_path / "o2")])  # fmt: skip
    assert result.exit_code == 2 and "is 3D" in result.output and "takes 2D" in result.output
    assert not any((tmp_path / "o1").rglob("*.nii.gz")) and not any(
        (tmp_path / "o2").rglob("*.nii.gz")
    )


def _scripts_bundle(root: Path, channels: int) -> Path:
    """A zoo-style bundle whose network lives in its own scripts/ package."""
    import torch

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "scripts").mkdir()
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, channels):\n"
        "        super().__init__()\n"
        "        self.features = torch.nn.Conv3d(1, channels, 3, padding=1)\n"
        "        self.head = torch.nn.Conv3d(channels, 2, 1)\n"
        "    def forward(self, x):\n"
        "        return self.head(torch.relu(self.features(x)))\n"
    )
    config = {
        "bundle_root": ".",
        "network_def": {"_target_": "scripts.net.Net", "channels": channels},
        "network": "$@network_def",
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [16, 16, 16],
            "sw_batch_size": 2,
            "overlap": 0.25,
        },
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "configs" / "metadata.json").write_text(json.dumps(
        {"network_data_format": {"inputs": {"image": {"num_channels": 1,
                                                       "spatial_shape": [16, 16, 16]}}}}
    ))  # fmt: skip
    from medcam.bundle import bundle_imports

    with bundle_imports(root):
        from scripts.net import Net

        torch.manual_seed(0)
        torch.save(Net(channels).state_dict(), root / "models" / "model.pt")
    return root


def test_scripts_bundles_in_layers_and_explain(tmp_path):
    """`$scripts.net.Net` resolves in `medcam layers/explain --bundle`, and two bundles with
    their own scripts/ package do not shadow each other in one process."""
    a = _scripts_bundle(tmp_path / "a", channels=3)
    b = _scripts_bundle(tmp_path / "b", channels=5)
    for bundle, channels in ((a, 3), (b, 5), (a, 3)):
        result = CliRunner().invoke(main, ["layers", "--bundle", str(bundle)])
        assert result.exit_code == 0, result.output
        assert f"(1, {channels}, 16, 16, 16)" in result.output
    source = tmp_path / "ct.nii.gz"
    write_ct(source, (30, 26, 20), (4.0, 4.0, 4.0))
    _cli("explain", str(source), "--bundle", str(b), "--out", str(tmp_path / "out"),
         "--layer", "features", "--method", "layercam", "--format", "nifti,json")  # fmt: skip
    record = json.loads(next((tmp_path / "out").rglob("*.json")).read_text())
    # windows start at 0, 12, 14 along x, 0, 10 along y, 0, 4 along z (interval 12 = 16 * 0.75)
    assert record["explanation"]["sliding_window"]["windows"] == 12
    assert record["explanation"]["feature_shapes"] == {"features": [16, 16, 16]}


@pytest.fixture(scope="module")
def descending_series(tmp_path_factory):
    """A DICOM series numbered against the slice normal (feet-first numbering), and the map
    `medcam explain` makes of it from medcam.load_scan (slices sorted by position)."""
    from medcam.data.synthetic import Geometry, torso_phantom, write_dicom_series

    tmp = tmp_path_factory.mktemp("descending")
    g = Geometry((64, 60, 24), (4.0, 4.0, 6.0), (-126.0, -118.0, -69.0))
    series = tmp / "series"
    write_dicom_series(torso_phantom(g), g, series, shuffle=True,
                       instance_numbers=list(range(24, 0, -1)))  # fmt: skip
    bundle = ROOT / "examples" / "bundles" / "segment3d"
    _cli("explain", str(series), "--bundle", str(bundle), "--out", str(tmp / "cli"),
         "--target", "1", "--method", "layercam", "--format", "nifti,json")  # fmt: skip
    return series, _one_map(tmp / "cli")


@pytest.mark.parametrize("reader", ["PydicomReader", "ITKReader"])
def test_descending_instance_numbers(tmp_path, descending_series, reader):
    """`monai.bundle run` on that series: MONAI's PydicomReader orders slices by InstanceNumber
    (a mirrored grid of the same world), ITKReader by position. The heatmap lands on the
    scan's grid with either: it is the map `medcam explain` computes from load_scan. The data
    list comes from a CSV file, as some bundles read theirs."""
    if reader == "ITKReader":
        _require_itk()
    series, reference = descending_series
    csv = tmp_path / "cases.csv"
    csv.write_text(f"image,note\n{series},feet-first numbering\n")
    datalist = f"$[row['image'] for row in __import__('csv').DictReader(open('{csv}'))]"
    bundle = ROOT / "examples" / "bundles" / "segment3d"
    out = tmp_path / reader
    run_bundle(bundle, "--datalist", datalist, "--output_dir", str(out),
               "--preprocessing#transforms#0#reader", reader, "--medcam#target", "1",
               "--medcam#method", "layercam")  # fmt: skip
    _same_map(_one_map(out / "medcam"), reference)


def test_on_error_log_keeps_the_bundle_running(tmp_path, phantom_cases):
    """A case medcam cannot write (a DICOM Parametric Map asked for a NIfTI input) is refused
    before its CAM is computed; with on_error=log the bundle goes on and writes its own
    outputs, and the error names the case."""
    folder, _, _ = phantom_cases
    bundle = ROOT / "examples" / "bundles" / "segment3d"
    done = run_bundle(bundle, "--dataset_dir", str(folder), "--output_dir", str(tmp_path / "eval"),
                      "--medcam#formats", "['dicom-pm']", "--medcam#on_error", "log")  # fmt: skip
    assert len(list((tmp_path / "eval").glob("*_seg.nii.gz"))) == 2  # the bundle's own outputs
    assert done.stderr.count("medcam: no heatmap for") == 2
    assert "DICOM source series" in done.stderr
    assert not (tmp_path / "eval" / "medcam").exists() or not any(
        (tmp_path / "eval" / "medcam").iterdir()
    )
