"""The case loop checks each input before any model runs on it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import medcam
from medcam.cli import main
from medcam.engine.inferer import InputSpec
from medcam.errors import InputError, MedcamError
from medcam.runner import ModelSpec, explain_inputs
from tests.helpers import lure_cases, lure_model


def _counting_net():
    calls = []
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1))
    net.register_forward_hook(lambda *a: calls.append(1))
    return net.eval(), calls


def test_dicom_formats_for_a_nifti_input_are_refused_before_the_model_runs(tmp_path):
    from tests.zoo import write_ct

    write_ct(tmp_path / "ct.nii.gz", (20, 18, 12), (2.0, 2.0, 3.0))
    net, calls = _counting_net()
    spec = ModelSpec(net, None, "test")
    with pytest.raises(MedcamError, match="DICOM source series"):
        explain_inputs(spec, [tmp_path / "ct.nii.gz"], tmp_path / "out", target=1,
                       formats=["nifti", "dicom-pm"], log=lambda _: None)  # fmt: skip
    with pytest.raises(MedcamError, match=r"dicom-sc output .* this input is 'nifti', not DICOM"):
        explain_inputs(spec, [tmp_path / "ct.nii.gz"], tmp_path / "out", target=1,
                       formats=["dicom-sc"], log=lambda _: None)  # fmt: skip
    assert calls == []


def test_a_2d_image_for_a_3d_network_is_refused_before_the_model_runs(tmp_path):
    import pydicom.data

    net, calls = _counting_net()
    spec = ModelSpec(net, None, "test", expect=InputSpec(3, 1, "the bundle's network_def"))
    slice_2d = pydicom.data.get_testdata_file("CT_small.dcm")
    with pytest.raises(InputError, match=r"is 2D .* takes 3D inputs \(the bundle's network_def\)"):
        explain_inputs(spec, [slice_2d], tmp_path / "out", target=1, formats=["nifti"],
                       log=lambda _: None)  # fmt: skip
    assert calls == []


# ----------------------------------------------------------------------------- folders


def _folder(tmp_path, n: int = 4):
    from tests.zoo import write_ct

    folder = tmp_path / "cases"
    for i in range(n):
        write_ct(folder / f"case{i}.nii.gz", (18, 16, 10 + i), (2.0, 2.0, 3.0), seed=i)
    return folder


def _spec():
    from monai.transforms import Compose, Orientation, Spacing

    from tests.conftest import IntensityCAM

    pre = Compose([Orientation("RAS", labels=None), Spacing((3.0, 3.0, 4.0))])
    return ModelSpec(IntensityCAM().eval(), pre, "test")


def _tree(out) -> dict:
    """Every output file: NIfTI voxels and affines, JSON sidecars without their clock times."""
    import json

    import nibabel as nib
    import numpy as np

    tree = {}
    for p in sorted(out.rglob("*")):
        if p.is_dir():
            continue
        key = str(p.relative_to(out))
        if p.name.endswith(".nii.gz"):
            img = nib.load(p)
            tree[key] = (np.asarray(img.dataobj).tobytes(), img.affine.tobytes())
        elif p.suffix == ".json":
            text = json.loads(p.read_text())
            text.pop("created", None)
            tree[key] = json.dumps(text, sort_keys=True, default=str)
        else:
            tree[key] = p.stat().st_size
    return tree


def test_a_folder_overlapped_writes_what_a_serial_run_writes(tmp_path):
    folder = _folder(tmp_path)
    spec = _spec()
    serial = explain_inputs(spec, [folder], tmp_path / "serial", target=0, layers="conv",
                            formats=["nifti", "json"], prefetch=0, log=lambda _: None)  # fmt: skip
    ahead = explain_inputs(spec, [folder], tmp_path / "ahead", target=0, layers="conv",
                           formats=["nifti", "json"], prefetch=2, log=lambda _: None)  # fmt: skip
    assert (
        [r["input"] for r in ahead]
        == [r["input"] for r in serial]
        == [str(folder / f"case{i}.nii.gz") for i in range(4)]
    )
    assert [r["case"] for r in ahead] == [r["case"] for r in serial]
    a, b = _tree(tmp_path / "serial"), _tree(tmp_path / "ahead")
    assert len(a) == 8 and a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


def test_a_failing_case_stops_the_folder_after_the_cases_before_it(tmp_path):
    folder = _folder(tmp_path)
    (folder / "case2.nii.gz").write_bytes(b"not a nifti file")
    for prefetch in (0, 1):
        out = tmp_path / f"out{prefetch}"
        with pytest.raises(MedcamError, match="case2"):
            explain_inputs(_spec(), [folder], out, target=0, layers="conv", formats=["nifti"],
                           prefetch=prefetch, log=lambda _: None)  # fmt: skip
        written = sorted(p.name for p in out.rglob("*.nii.gz"))
        assert len(written) == 2  # case0 and case1, nothing after the failed case


def test_every_stage_of_every_case_is_reported(tmp_path):
    from medcam.progress import reporting

    class Recorder:
        def __init__(self):
            self.events = []

        def started(self, case, stage):
            self.events.append(("start", case, stage))

        def finished(self, case, stage, seconds):
            assert seconds >= 0
            self.events.append(("end", case, stage))

    folder = _folder(tmp_path, 2)
    recorder, lines = Recorder(), []
    with reporting(recorder):
        records = explain_inputs(_spec(), [folder], tmp_path / "out", target=0, layers="conv",
                                 formats=["nifti", "png", "json"], log=lines.append)  # fmt: skip
    stages = ["load", "preprocess", "explain", "back to scan", "nifti", "png", "json"]
    for record in records:
        case = record["input"]
        ended = [s for kind, c, s in recorder.events if kind == "end" and c == case]
        assert ended == stages
        assert list(record["seconds"]) == stages
    assert len(lines) == 2 and all("load " in line and "back to scan " in line for line in lines)
    assert all(kind == "end" for kind, _, _ in recorder.events[-1:])


def test_an_empty_map_is_flagged_in_the_result_the_sidecar_and_the_log(tmp_path):
    # lure_model's class 0 has head weight -1: every Grad-CAM channel weight is negative and
    # the activations are >= 0, so the map is relu(negative) = 0 everywhere
    model = lure_model(3)
    x, _ = lure_cases(2)
    empty = medcam.explain(model, x, 0, layers="deep", method="gradcam")
    assert float(empty.heatmap.max()) == 0.0
    meta = empty.metadata()
    assert meta["empty_maps"] == [[0, 0], [1, 0]]
    assert meta["warning"].startswith("empty map (sample 0 / target 0, sample 1 / target 0)")
    shown = medcam.explain(model, x, 1, layers="deep", method="gradcam")
    assert float(shown.heatmap.max()) > 0 and "warning" not in shown.metadata()
    assert empty.sample(1).empty_maps == [[0, 0]]
    # through the command line: the log line and the sidecar
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(x[0, 0].numpy(), np.diag([2.0, 2.0, 2.0, 1.0])), scan)
    out = tmp_path / "out"
    run = CliRunner().invoke(main, ["explain", str(scan), "--out", str(out), "--model",
                                    "tests.helpers:lure_model", "--preprocess",
                                    "tests.helpers:lure_preprocess", "--target", "0",
                                    "--layer", "deep", "--method", "gradcam"])  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "WARNING: empty map (sample 0 / target 0)" in run.output
    (sidecar,) = out.rglob("*.json")
    assert json.loads(sidecar.read_text())["explanation"]["empty_maps"] == [[0, 0]]
    # a cohort run records it in the case's status and says it in the log
    from medcam.cohort import STATUS_FILE

    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"case_id,input\nc0,{scan}\n")
    cohort = tmp_path / "cohort"
    run = CliRunner().invoke(main, ["cohort", "run", "--manifest", str(manifest), "--out",
                                    str(cohort), "--model", "tests.helpers:lure_model",
                                    "--preprocess", "tests.helpers:lure_preprocess", "--target",
                                    "0", "--layer", "deep", "--method", "gradcam", "--format",
                                    "nifti,json"])  # fmt: skip
    assert run.exit_code == 0 and "1 done" in run.output, run.output
    assert "c0 WARNING: empty map (sample 0 / target 0)" in run.stderr
    status = json.loads((cohort / "c0" / STATUS_FILE).read_text())
    assert status["status"] == "done" and status["warning"].startswith("empty map")
