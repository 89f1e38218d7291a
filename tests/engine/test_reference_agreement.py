"""medcam against pytorch-grad-cam, Captum and MONAI, as installed, on random nets and the demo
models.

Every method medcam shares with a library is compared on the library's own output, after the
conventions medcam documents (docs/engine.md, "Conventions"):

- medcam's ``raw`` maps are compared with the library's raw (pre-normalisation) maps;
- pytorch-grad-cam min-max scales each map (twice: per layer, then after aggregating layers)
  and resizes it (OpenCV bilinear in 2D, ``scipy.ndimage.zoom`` cubic in 3D): its own
  ``scale_cam_image``, applied to medcam's raw map, must give its output;
- medcam's bilinear upsampling (``align_corners=False``) must equal OpenCV's in 2D and Captum's
  ``LayerAttribution.interpolate`` in 2D and 3D.

No constant is taken from medcam's code: a wrong epsilon in medcam fails here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import medcam
from tests.conftest import SmallCNN
from tests.engine.reference import captum_attr, pytorch_grad_cam

PGC_GRADIENT = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
}


def _net(dims: int, seed: int, small_gradients: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = SmallCNN(spatial_dims=dims).eval()
    if small_gradients:  # gradients ~1e-4: Grad-CAM++'s epsilon then dominates its denominator
        with torch.no_grad():
            net.fc.weight.mul_(1e-3)
    shape = (2, 2, 12, 10) if dims == 2 else (2, 2, 8, 10, 6)
    return net, torch.randn(shape)


def _pgc_run(name: str, net: nn.Module, layer: str, x: torch.Tensor, targets, **kwargs):
    """pytorch-grad-cam's output and, for gradient methods, its raw maps (ReLU of its
    ``get_cam_image``), on a private copy of the model (it keeps hooks and sets eval())."""
    pgc = pytorch_grad_cam()
    net = copy.deepcopy(net)
    module = dict(net.named_modules())[layer]
    with getattr(pgc, name)(net, [module], **kwargs) as cam:
        out = cam(x, targets)
        raw = None
        if cam.uses_gradients:
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            raw = np.maximum(cam.get_cam_image(x, module, targets, acts, grads, False), 0)
    return out, raw


def _pgc_scaling(maps: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    """pytorch-grad-cam's post-processing, from the installed library: scale + resize per layer,
    then ReLU and scale again when aggregating the (here: one) layer (BaseCAM.forward)."""
    pytorch_grad_cam()
    from pytorch_grad_cam.utils.image import scale_cam_image

    target_size = tuple(reversed(spatial))  # its get_target_width_height order
    return scale_cam_image(np.maximum(scale_cam_image(np.float32(maps), target_size), 0))


def _classes(cls: int):
    pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(cls)] * 2


def _assert_raw_close(ours: torch.Tensor, theirs: np.ndarray, atol: float = 1e-5) -> None:
    """Equal up to float32 summation order: ``atol`` relative to the map's peak."""
    scale = max(float(np.abs(theirs).max()), 1e-30)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4, atol=atol * scale)


# ----------------------------------------------------------------- pytorch-grad-cam, gradients


@pytest.mark.parametrize("method", list(PGC_GRADIENT))
@pytest.mark.parametrize(
    ("dims", "seed", "small", "layer"),
    [
        (2, 0, False, "features.3"),
        (2, 1, True, "features.5"),
        (3, 0, False, "features.5"),
        (3, 1, True, "features.3"),
    ],
)
def test_gradient_methods_match_pytorch_grad_cam(method, dims, seed, small, layer):
    net, x = _net(dims, seed, small)
    spatial = tuple(x.shape[2:])
    ours = medcam.explain(net, x, "all", layers=layer, method=method)
    for cls in range(3):
        out, raw = _pgc_run(PGC_GRADIENT[method], net, layer, x, _classes(cls))
        _assert_raw_close(ours.raw[layer][:, cls], raw)
        # pytorch-grad-cam's own scaling + resizing of medcam's raw map gives its output
        expected = _pgc_scaling(ours.raw[layer][:, cls].numpy(), spatial)
        np.testing.assert_allclose(out, expected, atol=1e-5)
        if dims == 2:  # medcam's bilinear upsampling is OpenCV's (half-pixel centres)
            up = _pgc_scaling(ours.heatmaps[layer][:, cls].numpy(), spatial)
            np.testing.assert_allclose(out, up, atol=1e-5)


@pytest.mark.slow
def test_gradient_methods_match_pytorch_grad_cam_on_demo_classifier():
    from medcam.data.demo import demo_classifier, load_demo_weights, model_space_batch

    net = load_demo_weights(demo_classifier(), "classifier")
    x, _, _ = model_space_batch(2, np.random.default_rng(0), lesion_fraction=1.0)
    layer = "features.denseblock2"  # 6x6x6; the trained net's raw gradients are ~1e-3
    for method, name in PGC_GRADIENT.items():
        ours = medcam.explain(net, x, 1, layers=layer, method=method).raw[layer][:, 0]
        _, raw = _pgc_run(name, net, layer, x, _classes(1))
        _assert_raw_close(ours, raw)


@pytest.mark.slow
def test_segmentation_target_matches_pytorch_grad_cam_on_demo_segmenter():
    pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from medcam.data.demo import demo_segmenter, load_demo_weights, model_space_batch

    net = load_demo_weights(demo_segmenter(), "segmenter")
    x, _, masks = model_space_batch(1, np.random.default_rng(1), lesion_fraction=1.0)
    layer = "model.1.submodule.1.submodule"  # the UNet's bottom block (12^3)
    target = medcam.SegmentationTarget(1, mask=masks[0])
    theirs_target = [SemanticSegmentationTarget(1, masks[0].numpy())]
    for method in ("gradcam", "gradcam++", "layercam"):
        ours = medcam.explain(net, x, target, layers=layer, method=method).raw[layer][:, 0]
        _, raw = _pgc_run(PGC_GRADIENT[method], net, layer, x, theirs_target)
        assert raw.max() > 0
        # 12^3 x 32-channel sums in another order: Grad-CAM++'s alpha differs by ~1e-4 of peak
        _assert_raw_close(ours, raw, atol=5e-4)


# ------------------------------------------------------- pytorch-grad-cam, Score- and Ablation-CAM


class TinySeg2D(nn.Module):
    """conv -> ReLU -> conv (stride 2) -> ReLU -> upsample x2 -> 1x1 conv: (B, 3, H, W) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(6, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.enc(x)))


def test_score_cam_matches_pytorch_grad_cam():
    """Where the feature grid is the input grid, masks need no upsampling and the maps agree to
    float precision; on a coarser grid pytorch-grad-cam upsamples the masks with
    ``align_corners=True`` (nn.UpsamplingBilinear2d) and medcam as its heatmaps
    (``align_corners=False``), a documented difference of a few 1e-3 on the scaled map."""
    net, x = _net(2, 0)
    spatial = tuple(x.shape[2:])
    for layer, atol in (("features.1", 1e-5), ("features.3", 5e-3)):
        ours = medcam.explain(net, x, "all", layers=layer, method="scorecam")
        for cls in range(3):
            out, _ = _pgc_run("ScoreCAM", net, layer, x, _classes(cls))
            expected = _pgc_scaling(ours.raw[layer][:, cls].numpy(), spatial)
            np.testing.assert_allclose(out, expected, atol=atol)


def test_score_cam_segmentation_target_matches_pytorch_grad_cam():
    pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    torch.manual_seed(3)
    net = TinySeg2D().eval()
    x = torch.randn(1, 2, 8, 12)
    mask = torch.zeros(8, 12)
    mask[2:6, 3:9] = 1
    ours = medcam.explain(
        net, x, medcam.SegmentationTarget(2, mask=mask), layers="enc", method="scorecam"
    )
    out, _ = _pgc_run("ScoreCAM", net, "enc", x, [SemanticSegmentationTarget(2, mask.numpy())])
    np.testing.assert_allclose(out, _pgc_scaling(ours.raw["enc"][:, 0].numpy(), (8, 12)), atol=1e-5)


def test_ablation_cam_matches_pytorch_grad_cam():
    """On a layer after a ReLU (pytorch-grad-cam then ablates with 0, as the paper and medcam
    do) and positive target scores (medcam divides by |y|, the library by y)."""
    net, x = _net(2, 1)
    with torch.no_grad():
        net.fc.bias.add_(5.0)  # every logit positive
    for layer in ("features.3", "features.5"):
        ours = medcam.explain(net, x, "all", layers=layer, method="ablationcam")
        assert bool((ours.scores > 0).all())
        for cls in range(3):
            out, _ = _pgc_run("AblationCAM", net, layer, x, _classes(cls), batch_size=4)
            expected = _pgc_scaling(ours.raw[layer][:, cls].numpy(), tuple(x.shape[2:]))
            np.testing.assert_allclose(out, expected, atol=1e-5)


# ----------------------------------------------------------------------------------- Captum


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("at", ["output", "input"])
def test_gradcam_and_hirescam_match_captum(dims, at):
    attr = captum_attr()
    net, x = _net(dims, 2)
    mode = "bilinear" if dims == 2 else "trilinear"
    for layer in ("features.3", "features.4"):
        module = dict(net.named_modules())[layer]
        ours = medcam.explain(net, x, [1, 2], layers=layer, at=at)
        hires = medcam.explain(net, x, [1, 2], layers=layer, at=at, method="hirescam")
        kwargs = {"target": [1, 2], "attribute_to_layer_input": at == "input"}
        theirs = attr.LayerGradCam(net, module).attribute(x, relu_attributions=True, **kwargs)
        torch.testing.assert_close(ours.raw[layer], theirs.detach(), rtol=1e-4, atol=1e-7)
        up = attr.LayerAttribution.interpolate(theirs, x.shape[2:], interpolate_mode=mode)
        torch.testing.assert_close(ours.heatmap, up.detach(), rtol=1e-4, atol=1e-7)
        gxa = attr.LayerGradientXActivation(net, module).attribute(x, **kwargs)
        torch.testing.assert_close(
            hires.raw[layer], torch.relu(gxa.sum(dim=1, keepdim=True)).detach(), rtol=1e-4,
            atol=1e-7,
        )  # fmt: skip


# ------------------------------------------------------------------------------------ MONAI


def test_cam_equals_monai_cam_minus_the_bias():
    """MONAI's CAM applies the whole final linear layer at each voxel, bias included; medcam's is
    Zhou et al.'s Eq. 2 (no bias). The two differ by the class's bias, everywhere."""
    from monai.visualize import CAM

    from medcam.data.demo import demo_classifier, load_demo_weights, model_space_batch

    net = load_demo_weights(demo_classifier(), "classifier")
    x, _, _ = model_space_batch(2, np.random.default_rng(0), lesion_fraction=0.5)
    layer = "class_layers.relu"
    ours = medcam.explain(net, x, "all", layers=layer, method="cam")
    monai_cam = CAM(copy.deepcopy(net), layer, "class_layers.out", postprocessing=lambda t: t)
    bias = net.class_layers.out.bias.detach()
    for cls in range(2):
        theirs = monai_cam.compute_map(x, class_idx=[cls, cls]).detach()  # an int raises there
        torch.testing.assert_close(ours.raw[layer][:, cls : cls + 1] + bias[cls], theirs)
