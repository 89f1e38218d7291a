"""Shared fixtures: small real networks with known structure, seeded inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv -> relu -> conv(stride 2) -> relu -> conv -> GAP -> linear, 2D or 3D."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 2, num_classes: int = 3):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        self.features = nn.Sequential(
            conv(in_channels, 4, 3, padding=1),
            nn.ReLU(),
            conv(4, 6, 3, stride=2, padding=1),
            nn.ReLU(),
            conv(6, 5, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = pool(1)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class HandNet(nn.Module):
    """1x1 conv (1 -> 2 channels) -> global average pool -> linear (2 -> 2), weights set by hand.

    With input x: A_0 = x, A_1 = 1 - x; logits_k = sum_c W[k, c] mean(A_c) + b_k with
    W = [[2, 1], [0, -4]], b = [0.5, 0]. The gradient of logit k w.r.t. A_c is W[k, c] / N
    everywhere (N = number of pixels), so every map has a closed form.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, -4.0]]))
            self.fc.bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


@pytest.fixture
def hand_net() -> HandNet:
    return HandNet().eval()


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def small_cnn(request: pytest.FixtureRequest) -> tuple[nn.Module, torch.Tensor]:
    """A seeded SmallCNN in eval mode and a (2, 2, *spatial) input for it."""
    torch.manual_seed(0)
    dims = request.param
    net = SmallCNN(spatial_dims=dims).eval()
    shape = (2, 2, 12, 10) if dims == 2 else (2, 2, 8, 10, 6)
    return net, torch.randn(shape)


def count_hooks(model: nn.Module) -> int:
    """Number of forward/backward hooks on all modules of ``model``."""
    total = 0
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        ):
            total += len(getattr(m, attr))
    return total


class IntensityCAM(nn.Module):
    """1x1 conv (weight 1) -> GAP -> linear [[1], [-1]]: Grad-CAM of class 0 is ReLU(input) / N.

    Its heatmap is the (preprocessed) image itself, so where a bright blob sits in the scan is
    where the heatmap must come back: a known answer for every geometry step.
    """

    def __init__(self, spatial_dims: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        pool = nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d
        self.conv = conv(1, 1, 1)
        self.pool = pool(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


@pytest.fixture
def intensity_cam() -> IntensityCAM:
    return IntensityCAM().eval()


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory):
    """Two demo-anatomy NIfTI cases (lesion / none) and the lesion centre (LPS mm)."""
    import nibabel as nib
    import numpy as np

    from medcam.data.demo import ct_phantom
    from medcam.data.synthetic import LPS_TO_RAS
    from medcam.demo import LESION_OFFSET_MM, demo_geometry

    folder = tmp_path_factory.mktemp("phantoms")
    g = demo_geometry()
    centre = g.affine_lps[:3] @ np.append((np.array(g.shape) - 1) / 2, 1.0)
    lesion = centre + np.array(LESION_OFFSET_MM)
    for name, where in (("a_lesion", lesion), ("b_none", None)):
        hu = ct_phantom(g, where, 12.0)
        nib.save(nib.Nifti1Image(hu, LPS_TO_RAS @ g.affine_lps), folder / f"{name}.nii.gz")
    return folder, lesion, g


@pytest.fixture(autouse=True)
def _full_float32_on_cuda(request: pytest.FixtureRequest):
    """GPU tests compare against CPU or exact answers: PyTorch's default on CUDA runs cuDNN
    convolutions in TF32 (10-bit mantissa, ~1e-3 relative), which flips near-tied argmax targets
    and exceeds float32 tolerances. Tests marked ``gpu`` run in full float32; the previous
    settings are restored after each test."""
    if request.node.get_closest_marker("gpu") is None or not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
