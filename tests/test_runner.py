"""The case loop checks each input before any model runs on it."""

from __future__ import annotations

import pytest
import torch

from medcam.engine.inferer import InputSpec
from medcam.errors import InputError, MedcamError
from medcam.runner import ModelSpec, explain_inputs


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
    with pytest.raises(MedcamError, match="dicom-sc output .* this input is 'nifti', not DICOM"):
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
