"""Heatmaps through a sliding-window inferer: per window, for a target on the whole volume."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch import nn

import medcam
from medcam.engine import explain_sliding_window
from medcam.engine.inferer import explain_whole, resolve_target
from medcam.engine.sliding import SlidingWindow, window_layout
from medcam.errors import InputError, MedcamError, ModelError


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


class Pointwise(nn.Module):
    """A segmentation net of 1x1x1 convolutions: every window predicts exactly what the whole
    volume would, so the windowed CAM must equal the whole-volume CAM for every method."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.a = nn.Conv3d(1, 6, 1)
        self.act = nn.Tanh()
        self.b = nn.Conv3d(6, 5, 1)
        self.relu = nn.ReLU()
        self.head = nn.Conv3d(5, 3, 1)
        torch.manual_seed(7)
        with torch.no_grad():  # unit-variance weights: every class wins somewhere
            self.b.weight.normal_(0, 1)
            self.head.weight.normal_(0, 1)
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.relu(self.b(self.act(self.a(x)))))


def _input(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, *shape, generator=g)


def test_window_layout_is_monais_stitching():
    """sum_w beta_w * p_w over the layout's windows equals sliding_window_inference."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = nn.Conv3d(1, 2, 3, padding=1).eval()
    x = _input((29, 41, 11))  # padded along the last axis, overlapping along the others
    for window in (SlidingWindow((16, 16, 16), 3, 0.5, "gaussian", 0.2),
                   SlidingWindow((20, 12, 16), 2, (0.25, 0.6, 0.0), "constant")):  # fmt: skip
        with torch.no_grad():
            ref = sliding_window_inference(x, window.roi_size, window.sw_batch_size, net,
                                           overlap=window.overlap, mode=window.mode,
                                           sigma_scale=window.sigma_scale)  # fmt: skip
            layout = window_layout(x.shape[2:], window)
            xp = torch.nn.functional.pad(x, layout.pad)
            out = torch.zeros(1, 2, *layout.padded)
            for i, sl in enumerate(layout.slices):
                out[(slice(None), slice(None), *sl)] += net(xp[(..., *sl)]) * layout.beta(i)
        assert len(layout.slices) > 2
        torch.testing.assert_close(out[(slice(None), slice(None), *layout.crop)],
                                   torch.as_tensor(ref), rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize(
    ("method", "mode"),
    [("gradcam", "gaussian"), ("gradcam", "constant"), ("hirescam", "gaussian"),
     ("layercam", "constant"), ("xgradcam", "gaussian"), ("gradcam++", "gaussian")],
)  # fmt: skip
def test_windowed_cam_equals_whole_volume_cam(method, mode):
    net = Pointwise().eval()
    x = _input((26, 22, 14), seed=1) * 2
    with torch.no_grad():
        assert len(net(x).argmax(1).unique()) == 3  # every class is predicted somewhere
    window = SlidingWindow((16, 16, 16), sw_batch_size=3, overlap=0.5, mode=mode)
    assert len(window_layout(x.shape[2:], window).slices) == 6  # overlapping, padded in z
    explainer = medcam.Explainer(net, "b", method)
    mask = (x[0, 0] > 0.5).float()
    for target in ("pred", "all", medcam.SegmentationTarget(0, mask=mask)):
        whole = explainer(x, resolve_target(target))
        windowed = explain_sliding_window(explainer, x, window, target)
        peak = whole.heatmap.abs().max()
        assert peak > 0
        torch.testing.assert_close(windowed.heatmap, whole.heatmap, rtol=0, atol=2e-5 * peak)
        torch.testing.assert_close(windowed.scores, whole.scores, rtol=1e-4, atol=1e-3)
        assert torch.equal(windowed.classes, whole.classes)


def test_windowed_cam_matches_whole_volume_on_a_unet():
    """A real UNet's windows see zero padding at their borders, so its stitched prediction is
    not exactly the whole-volume one; with batch norm (as the spleen bundle's UNet) the
    heatmaps still agree closely where both can run. (With instance norm, MONAI UNet's default,
    each window is normalised by its own statistics and the maps differ more: they are the
    CAM of the inferer as it runs, not of a whole-volume pass.)"""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1,
               norm="batch").eval()  # fmt: skip
    x = torch.nn.functional.avg_pool3d(_input((48, 40, 32), seed=2), 5, 1, 2) * 5
    window = SlidingWindow((32, 32, 32), sw_batch_size=4, overlap=0.5, mode="gaussian")
    for method in ("layercam", "gradcam"):
        explainer = medcam.Explainer(net, "model.1", method)
        whole = explainer(x, resolve_target("pred")).heatmap.flatten().numpy()
        windowed = explain_sliding_window(explainer, x, window, "pred").heatmap.flatten().numpy()
        assert np.corrcoef(whole, windowed)[0, 1] > 0.98


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_stitched_map_known_answer(mode):
    x = _input((40, 36, 30))
    explainer = medcam.Explainer(IdentitySegmenter().eval(), "conv", "hirescam")
    target = medcam.SegmentationTarget(1, mask=torch.ones(40, 36, 30))
    heat = explain_sliding_window(explainer, x, (16, 16, 16), target, sw_batch_size=4, mode=mode)
    assert heat.heatmap.shape == (1, 1, 40, 36, 30)
    torch.testing.assert_close(heat.heatmap, torch.relu(x), rtol=1e-5, atol=1e-5)


def test_one_window_graph_at_a_time():
    """The pass with gradients takes one window per call and frees its graph before the next."""
    net = Pointwise().eval()
    x = _input((32, 28, 16))
    alive: list[weakref.ref] = []
    grad_batches = []

    def hook(module, inputs, output):
        if output.requires_grad:
            assert all(r() is None for r in alive), "an earlier window's graph is still held"
            alive.append(weakref.ref(output))
            grad_batches.append(output.shape[0])

    handle = net.head.register_forward_hook(hook)
    try:
        for method in ("layercam", "gradcam"):
            explainer = medcam.Explainer(net, "b", method)
            explain_sliding_window(explainer, x, SlidingWindow((16, 16, 16), 4, 0.5), "pred")
    finally:
        handle.remove()
    assert len(grad_batches) == 18 and set(grad_batches) == {1}  # 9 windows, 2 methods


def test_windows_outside_the_target_are_skipped_and_empty_targets_give_zero():
    net = Pointwise().eval()
    x = _input((48, 16, 16))
    calls = []
    handle = net.head.register_forward_hook(
        lambda m, i, o: calls.append(o.requires_grad) if o.requires_grad else None
    )
    mask = torch.zeros(48, 16, 16)
    mask[:10] = 1  # only the first window sees the target
    try:
        explainer = medcam.Explainer(net, "b", "layercam")
        window = SlidingWindow((16, 16, 16), 1, 0.0)
        explain_sliding_window(explainer, x, window, medcam.SegmentationTarget(1, mask=mask))
        assert len(calls) == 1
        empty = explain_sliding_window(
            explainer, x, window, medcam.SegmentationTarget(1, mask=torch.zeros_like(mask))
        )
    finally:
        handle.remove()
    assert float(empty.heatmap.abs().max()) == 0.0


def test_volume_smaller_than_the_window_is_padded_like_monai():
    """One padded window: the map equals the CAM of the padded input, cropped back."""
    x = _input((10, 13, 7))
    explainer = medcam.Explainer(IdentitySegmenter().eval(), "conv", "layercam")
    result = explain_sliding_window(explainer, x, SlidingWindow((16, 16, 16)), 1)
    assert result.heatmap.shape == (1, 1, 10, 13, 7)
    region = (x[0, 0] > 0).float()  # class 1 wins where the logit x > 0
    torch.testing.assert_close(result.heatmap[0, 0], torch.relu(x[0, 0]) * region)
    assert result.metadata()["sliding_window"]["windows"] == 1


def test_network_that_cannot_take_the_size_is_padded_to_its_multiple():
    """No sliding window: a UNet (sizes must be multiples of 8) on a 37 x 30 x 23 volume."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8, 16, 16), strides=(2, 2, 2), num_res_units=0).eval()
    x = _input((37, 30, 23))
    with pytest.raises(RuntimeError):
        net(x)
    explainer = medcam.Explainer(net, "auto", "layercam")
    result = explain_whole(explainer, x, 1)
    assert result.heatmap.shape == (1, 1, 37, 30, 23)
    assert result.extra["padded_to_size_multiple"]["padded_shape"] == [40, 32, 24]
    # the same as explaining the padded volume with the target on the cropped output
    xp = torch.nn.functional.pad(x, [0, 1, 1, 1, 1, 2])
    crop = (slice(1, 38), slice(1, 31), slice(0, 23))
    ref = explainer(xp, lambda logits: resolve_target(1)(logits[(..., *crop)])[0])
    torch.testing.assert_close(result.heatmap, ref.heatmap[(..., *crop)])
    # a network without a known rule is probed
    wrapped = nn.Sequential(net)
    probed = explain_whole(medcam.Explainer(wrapped, "0.model.1", "layercam"), x, 1)
    assert probed.extra["padded_to_size_multiple"]["found_by"] == "a probe of sizes"
    torch.testing.assert_close(probed.heatmap, result.heatmap)


def test_sliding_window_errors():
    explainer = medcam.Explainer(IdentitySegmenter().eval(), "conv", "layercam")
    with pytest.raises(MedcamError, match="overlap"):
        SlidingWindow((16, 16, 16), overlap=1.0)
    with pytest.raises(MedcamError, match="3 spatial dimensions"):
        explain_sliding_window(explainer, _input((20, 20, 20)), (16, 16), 1)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3, 4))

    clf = medcam.Explainer(Classifier().eval(), "conv", "gradcam")
    with pytest.raises(ModelError, match="dense"):
        explain_sliding_window(clf, _input((40, 20, 20)), (16, 16, 16), 0)
    # a 2D input for a network of 3D convolutions: named, not a raw traceback, no size probing
    with pytest.raises(InputError, match=r"2 spatial dimensions .* convolutions are 3D"):
        explain_whole(clf, torch.randn(1, 1, 20, 20), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sliding_window_on_cuda():
    x = torch.randn(1, 1, 40, 36, 30, device="cuda")
    net = Pointwise().cuda().eval()
    for method in ("layercam", "gradcam"):
        explainer = medcam.Explainer(net, "b", method)
        whole = explainer(x, resolve_target("pred"))
        windowed = explain_sliding_window(explainer, x, SlidingWindow((16, 16, 16), 4, 0.5),
                                          "pred")  # fmt: skip
        assert windowed.heatmap.device.type == "cuda"
        torch.testing.assert_close(windowed.heatmap, whole.heatmap, rtol=1e-4, atol=1e-5)


def test_explain_scan_with_sliding_windows(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    data = rng.normal(0, 1, (40, 36, 30)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "big.nii.gz")
    target = medcam.SegmentationTarget(1, mask=torch.ones(40, 36, 30))
    ex = medcam.explain_scan(IdentitySegmenter().eval(), tmp_path / "big.nii.gz", target=target,
                             layers="conv", method="hirescam", roi_size=(16, 16, 16),
                             sw_batch_size=4)  # fmt: skip
    torch.testing.assert_close(ex.heatmap[0], torch.relu(torch.from_numpy(data)), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    meta = ex.metadata()
    assert meta["sliding_window"]["roi_size"] == [16, 16, 16]
    assert meta["sliding_window"]["windows"] == 27
    assert meta["input_shape"] == [1, 1, 40, 36, 30] and meta["feature_shapes"] == {
        "conv": [16, 16, 16]
    }


class PoolingClassifier(nn.Module):
    """A 3D classifier that takes only sizes of at least 16 (two 4x max-pools)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.pool = nn.Sequential(nn.MaxPool3d(4), nn.MaxPool3d(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_auto_method_of_a_padded_classifier_is_chosen_from_its_output():
    """explain_whole pads through the one-window path; "auto" must still see a classifier."""
    net = PoolingClassifier().eval()
    x = _input((5, 5, 5))
    with pytest.raises(RuntimeError):
        net(x)
    result = explain_whole(medcam.Explainer(net, "conv", "auto"), x, 1)
    assert result.method == "gradcam" and "padded_to_size_multiple" in result.extra
    direct = medcam.Explainer(net, "conv", "auto")(_input((16, 16, 16)), 1)
    assert direct.method == "gradcam" and result.method_chosen_by == direct.method_chosen_by


def test_sliding_windows_under_inference_mode_equal_the_normal_call():
    net = Pointwise().eval()
    x = _input((20, 18, 12))
    explainer = medcam.Explainer(net, "b", "layercam")
    window = SlidingWindow((8, 8, 8), 2, 0.25)
    expected = explain_sliding_window(explainer, x, window, "pred")
    assert expected.heatmap.abs().sum() > 0
    with torch.inference_mode():
        got = explain_sliding_window(explainer, x, window, "pred")
    torch.testing.assert_close(got.heatmap, expected.heatmap)


def test_a_target_that_ignores_the_prediction_is_refused_not_an_empty_map():
    explainer = medcam.Explainer(Pointwise().eval(), "b", "layercam")
    constant = lambda logits: torch.ones(1, 1)  # noqa: E731
    with pytest.raises(MedcamError, match="do not depend on the stitched prediction"):
        explain_sliding_window(explainer, _input((20, 18, 12)), SlidingWindow((8, 8, 8)), constant)


def test_a_bfloat16_segmenter_in_sliding_windows():
    """Windows and the stitched prediction are cast to the model's dtype, as a direct call is."""
    net = Pointwise().eval()
    x = _input((20, 18, 12))
    window = SlidingWindow((8, 8, 8), 2, 0.25)
    reference = explain_sliding_window(medcam.Explainer(net, "b", "layercam"), x, window, "pred")
    half = explain_sliding_window(medcam.Explainer(Pointwise().eval().to(torch.bfloat16), "b",
                                                   "layercam"), x, window, "pred")  # fmt: skip
    assert half.heatmap.dtype == torch.float32 and torch.isfinite(half.heatmap).all()
    r = np.corrcoef(half.heatmap.flatten().numpy(), reference.heatmap.flatten().numpy())[0, 1]
    assert r > 0.95
