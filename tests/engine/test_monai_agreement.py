"""medcam agrees with MONAI's GradCAM (un-normalised) on MONAI's own networks."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import DenseNet121, resnet18
from monai.visualize import GradCAM, GradCAMpp

import medcam
from tests.conftest import count_hooks


def _identity(x):
    return x


def _monai_maps(net, layer, x, cls, cam_class=GradCAM):
    """MONAI's raw and upsampled maps on a private copy (MONAI mutates the model)."""
    monai_cam = cam_class(copy.deepcopy(net), target_layers=layer, postprocessing=_identity)
    raw = monai_cam.compute_map(x, class_idx=cls).detach()
    upsampled = monai_cam(x, class_idx=cls).detach()
    return raw, upsampled


@pytest.mark.parametrize(
    ("name", "layer", "shape"),
    [
        ("densenet121-3d", "class_layers.relu", (2, 1, 64, 64, 64)),
        ("densenet121-3d", "features.denseblock3", (1, 1, 64, 64, 64)),
        ("resnet18-2d", "layer4", (2, 1, 96, 80)),
        ("resnet18-2d", "layer3", (1, 1, 96, 80)),
    ],
)
def test_gradcam_matches_monai(name, layer, shape):
    torch.manual_seed(0)
    if name == "densenet121-3d":
        net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    else:
        net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3).eval()
    x = torch.randn(shape)
    ours = medcam.explain(net, x, "all", layers=layer)
    num_classes = ours.classes.shape[1]
    for cls in range(num_classes):
        raw, up = _monai_maps(net, layer, x, cls)
        scale = float(raw.abs().max())
        torch.testing.assert_close(
            ours.raw[layer][:, cls : cls + 1], raw, rtol=1e-4, atol=1e-5 * scale
        )
        torch.testing.assert_close(ours.heatmap[:, cls : cls + 1], up, rtol=1e-4, atol=1e-5 * scale)
    # MONAI sets inplace=False on the modules of the model it wraps; ours is untouched
    assert any(getattr(m, "inplace", False) for m in net.modules())
    assert count_hooks(net) == 0


def test_gradcam_pp_differs_from_monai_as_documented():
    """MONAI's Grad-CAM++ is not the paper's Eq. 19 (ANCHORS.md); ours is, so they differ."""
    torch.manual_seed(0)
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3).eval()
    x = torch.randn(1, 1, 64, 64)
    ours = medcam.explain(net, x, 1, layers="layer3", method="gradcam++").raw["layer3"]
    theirs, _ = _monai_maps(net, "layer3", x, 1, cam_class=GradCAMpp)
    assert not torch.allclose(ours, theirs, rtol=1e-3)
    # but both rank the voxels alike: the two weightings share the positive-gradient support
    r = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1]
    assert r > 0.5
