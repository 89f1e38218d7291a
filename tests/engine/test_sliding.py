"""Sliding-window heatmaps for volumes larger than the model input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medcam
from medcam.engine import explain_sliding_window


class IdentitySegmenter(nn.Module):
    """logits = [0, conv1x1(x)] with weight 1: a segmentation net whose class-1 Grad-CAM with
    an all-ones mask is ReLU(x) / 1 in every window (the gradient is 1 everywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()

    def forward(self, x):
        a = self.conv(x)
        return torch.cat([torch.zeros_like(a), a], dim=1)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_stitched_map_known_answer(mode):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 40, 36, 30)
    explainer = medcam.Explainer(IdentitySegmenter().eval(), "conv", "hirescam")
    target = medcam.SegmentationTarget(1, mask=torch.ones(16, 16, 16))
    heat = explain_sliding_window(explainer, x, (16, 16, 16), target, sw_batch_size=4, mode=mode)
    assert heat.shape == (1, 1, 40, 36, 30)
    torch.testing.assert_close(heat, torch.relu(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sliding_window_on_cuda():
    x = torch.randn(1, 1, 40, 36, 30, device="cuda")
    explainer = medcam.Explainer(IdentitySegmenter().cuda().eval(), "conv", "hirescam")
    target = medcam.SegmentationTarget(1, mask=torch.ones(16, 16, 16, device="cuda"))
    heat = explain_sliding_window(explainer, x, (16, 16, 16), target, sw_batch_size=4)
    assert heat.device.type == "cuda"
    torch.testing.assert_close(heat, torch.relu(x), rtol=1e-5, atol=1e-5)


def test_explain_scan_with_sliding_windows(tmp_path):
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.normal(0, 1, (40, 36, 30)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "big.nii.gz")
    target = medcam.SegmentationTarget(1, mask=torch.ones(16, 16, 16))
    ex = medcam.explain_scan(IdentitySegmenter().eval(), tmp_path / "big.nii.gz", target=target,
                             layers="conv", method="hirescam", roi_size=(16, 16, 16),
                             sw_batch_size=4)  # fmt: skip
    torch.testing.assert_close(ex.heatmap[0], torch.relu(torch.from_numpy(data)), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    meta = ex.metadata()
    assert meta["sliding_window"]["roi_size"] == [16, 16, 16]
    assert meta["input_shape"] == [1, 1, 40, 36, 30] and meta["feature_shapes"] == {
        "conv": [16, 16, 16]
    }
