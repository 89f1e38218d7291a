"""Score-CAM and Ablation-CAM: memory bound, fixed targets, gradient-free models, errors, CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medcam
from tests.conftest import SmallCNN, count_hooks


def _batch_sizes(net: nn.Module) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = net.register_forward_pre_hook(lambda m, args: sizes.append(int(args[0].shape[0])))
    return sizes, handle


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbed_batches_never_exceed_the_bound(small_cnn, method):
    net, x = small_cnn  # B = 2; features.3 has 6 channels: 12 perturbed copies in all
    sizes, handle = _batch_sizes(net)
    try:
        result = medcam.explain(net, x, "all", layers="features.3", method=method,
                                perturbations_per_eval=5)  # fmt: skip
    finally:
        handle.remove()
    assert sizes[0] == 2  # the unperturbed call
    assert sizes[1:] == [5, 5, 2]
    assert result.metadata()["perturbation"] == {"forward_passes": 3, "perturbations_per_eval": 5}
    assert result.batched_backward is False


class TinySeg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(x))


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_segmentation_region_is_fixed_from_the_unperturbed_call(method):
    """With no mask, the region is the one predicted on the unperturbed input (masking the input
    changes the prediction; the target must not move with it)."""
    torch.manual_seed(0)
    net = TinySeg().eval()
    x = torch.randn(2, 1, 9, 11)
    with torch.no_grad():
        region = net(x).argmax(dim=1) == 2  # (B, H, W)
    predicted = medcam.explain(net, x, medcam.SegmentationTarget(2), layers="enc", method=method)
    given = medcam.explain(net, x, medcam.SegmentationTarget(2, mask=region[:, None]),
                           layers="enc", method=method)  # fmt: skip
    torch.testing.assert_close(predicted.raw["enc"], given.raw["enc"])
    assert float(predicted.raw["enc"].max()) > 0


class Quantised(SmallCNN):
    """A model with a non-differentiable step after the features (rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.features(x)).flatten(1)
        return self.fc(torch.round(h * 8).detach() / 8)


def test_gradient_free_methods_explain_a_non_differentiable_model():
    torch.manual_seed(0)
    net = Quantised(spatial_dims=2).eval()
    x = torch.randn(2, 2, 12, 10)
    with pytest.raises(medcam.ModelError, match="differentiabl"):
        medcam.explain(net, x, 1, layers="features.3")
    for method in ("scorecam", "ablationcam"):
        result = medcam.explain(net, x, 1, layers="features.3", method=method)
        assert torch.isfinite(result.heatmap).all() and float(result.heatmap.max()) > 0
    assert count_hooks(net) == 0


def test_perturbation_errors():
    net = SmallCNN(spatial_dims=2).eval()
    x = torch.randn(1, 2, 12, 10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(medcam.MedcamError, match="perturbations_per_eval"):
            medcam.Explainer(net, "features.3", "scorecam", perturbations_per_eval=bad)

    def by_hand(t: torch.Tensor) -> torch.Tensor:
        return t

    with pytest.raises(medcam.LayerError, match=r"Ablation-CAM.*channel axis"):
        medcam.explain(net, x, 0, layers="features.3", method="ablationcam", reshape=by_hand)
    assert count_hooks(net) == 0


def test_hooks_removed_when_a_perturbed_forward_fails():
    class FailsOnBigBatches(SmallCNN):
        def forward(self, x):
            if x.shape[0] > 1:
                raise RuntimeError("boom")
            return super().forward(x)

    net = FailsOnBigBatches(spatial_dims=2).eval()
    with pytest.raises(RuntimeError, match="boom"):
        medcam.explain(net, torch.randn(1, 2, 12, 10), 0, layers="features.3",
                       method="ablationcam")  # fmt: skip
    assert count_hooks(net) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "gradcam++"])
def test_cuda_matches_cpu(method):
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    net = SmallCNN(spatial_dims=3).eval()
    x = torch.randn(2, 2, 8, 10, 6)
    cpu = medcam.explain(net, x, "all", layers="features.3", method=method)
    gpu = medcam.explain(net.cuda(), x.cuda(), "all", layers="features.3", method=method)
    assert gpu.heatmap.is_cuda
    torch.testing.assert_close(gpu.cpu().raw["features.3"], cpu.raw["features.3"], rtol=1e-3,
                               atol=1e-5)  # fmt: skip
    vit = ViT(in_channels=1, img_size=(32, 32), patch_size=(8, 8), hidden_size=24, mlp_dim=48,
              num_layers=2, num_heads=2, spatial_dims=2, classification=True).eval()  # fmt: skip
    xv = torch.randn(2, 1, 32, 32)
    cpu = medcam.explain(vit, xv, 1, layers="blocks.1.norm1", output=0, method=method)
    gpu = medcam.explain(vit.cuda(), xv.cuda(), 1, layers="blocks.1.norm1", output=0,
                         method=method)  # fmt: skip
    torch.testing.assert_close(gpu.cpu().raw["blocks.1.norm1"], cpu.raw["blocks.1.norm1"],
                               rtol=1e-3, atol=1e-5)  # fmt: skip
