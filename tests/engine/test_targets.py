"""Targets: class indices, segmentation regions, callables and their errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

import medcam
from medcam.engine import as_target


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def test_segmentation_target_scores_are_masked_logit_sums(unet):
    x = torch.randn(2, 1, 16, 16, 16)
    mask = torch.zeros(16, 16, 16)
    mask[4:9, 2:6, 10:14] = 1
    result = medcam.explain(unet, x, medcam.SegmentationTarget([1, 2], mask=mask), layers="model.1")
    with torch.no_grad():
        logits = unet(x)
    expected = torch.stack([(logits[:, c] * mask).sum(dim=(1, 2, 3)) for c in (1, 2)], dim=1)
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-3)
    assert result.classes.tolist() == [[1, 2], [1, 2]]
    mean = medcam.explain(
        unet, x, medcam.SegmentationTarget(1, mask=mask, reduction="mean"), layers="model.1"
    )
    torch.testing.assert_close(mean.scores[:, 0], expected[:, 0] / mask.sum(), rtol=1e-4, atol=1e-4)
    assert result.logits is None
    assert result.heatmap.shape == (2, 2, 16, 16, 16)


def test_segmentation_predicted_region(unet):
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        logits = unet(x)
    region = (logits.argmax(1) == 2).float()
    result = medcam.explain(unet, x, 2, layers="model.1")  # int on a segmentation output
    torch.testing.assert_close(
        result.scores[0, 0], (logits[0, 2] * region[0]).sum(), rtol=1e-4, atol=1e-3
    )
    assert "predicted region" in result.target


def test_empty_region_gives_zero_map(unet):
    x = torch.randn(1, 1, 16, 16, 16)
    target = medcam.SegmentationTarget(1, mask=torch.zeros(16, 16, 16))
    result = medcam.explain(unet, x, target, layers="model.1")
    assert torch.equal(result.heatmap, torch.zeros_like(result.heatmap))


def test_segmentation_target_errors(unet):
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(medcam.TargetError, match="segmentation map"):
        medcam.explain(unet, x, "pred", layers="model.1")
    with pytest.raises(medcam.TargetError, match="out of range"):
        medcam.explain(unet, x, medcam.SegmentationTarget(5), layers="model.1")
    with pytest.raises(medcam.TargetError, match="spatial shape"):
        medcam.explain(
            unet, x, medcam.SegmentationTarget(1, mask=torch.ones(8, 8, 8)), layers="model.1"
        )


def test_callable_target(small_cnn):
    net, x = small_cnn
    diff = medcam.explain(net, x, lambda logits: logits[:, 1] - logits[:, 0], layers="features.3")
    assert diff.classes.tolist() == [[-1], [-1]]
    with torch.no_grad():
        logits = net(x)
    torch.testing.assert_close(diff.scores[:, 0], logits[:, 1] - logits[:, 0])
    with pytest.raises(medcam.MedcamError, match="class-index"):
        medcam.explain(net, x, lambda lg: lg[:, 0], layers="features.5", method="cam")


def test_target_spec_errors(small_cnn):
    net, x = small_cnn
    with pytest.raises(medcam.TargetError, match=r"valid indices 0\.\.2"):
        medcam.explain(net, x, 3, layers="features.3")
    with pytest.raises(medcam.TargetError, match="batch of 2"):
        medcam.explain(net, x, [0, 1, 2], layers="features.3")
    with pytest.raises(medcam.TargetError, match="Unknown target"):
        as_target("best")
    with pytest.raises(medcam.TargetError, match="ints"):
        as_target([0.5, 1.5])
    assert as_target("2").classes.item() == 2


def test_swin_unetr_segmentation_target():
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    mask = torch.zeros(64, 64, 64)
    mask[20:40, 10:30, 30:50] = 1
    result = medcam.explain(net, x, medcam.SegmentationTarget(1, mask=mask))
    assert result.layers == ["decoder1"]  # channel-first decoder output, not the swin blocks
    assert result.heatmap.shape == (1, 1, 64, 64, 64)
    with torch.no_grad():
        expected = (net(x)[0, 1] * mask).sum()
    torch.testing.assert_close(result.scores[0, 0], expected, rtol=1e-4, atol=1e-2)
    assert result.heatmap.max() > 0
