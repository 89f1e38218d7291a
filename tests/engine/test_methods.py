"""Each method against a hand-computed answer and against a plain reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medcam
from medcam.engine.methods import EPS

X_HAND = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)

# Closed forms for HandNet (see tests/conftest.py): g_c = W[k, c] / 4 everywhere.
# class 0: weights (0.5, 0.25) -> 0.5 x + 0.25 (1 - x) = 0.25 x + 0.25
# class 1: weights (0, -1)     -> -(1 - x) = x - 1, ReLU -> [[0, 0], [1, 2]]
HAND_GRADCAM = {0: [[0.25, 0.5], [0.75, 1.0]], 1: [[0.0, 0.0], [1.0, 2.0]]}
# CAM (no ReLU): class 0: 2 x + (1 - x) = x + 1; class 1: -4 (1 - x)
HAND_CAM = {0: [[1.0, 2.0], [3.0, 4.0]], 1: [[-4.0, 0.0], [4.0, 8.0]]}


@pytest.mark.parametrize("cls", [0, 1])
def test_gradcam_known_answer(hand_net, cls):
    result = medcam.explain(hand_net, X_HAND, cls, layers="conv")
    expected = torch.tensor(HAND_GRADCAM[cls])
    torch.testing.assert_close(result.raw["conv"][0, 0], expected)
    assert result.feature_shapes == {"conv": (2, 2)}
    # Grad-CAM weights are spatially constant here, so HiResCAM and XGrad-CAM agree with it;
    # LayerCAM keeps only positive gradients: class 1 has none on channel 0 and a negative one
    # on channel 1, so its map is zero.
    for method in ("hirescam", "xgradcam"):
        other = medcam.explain(hand_net, X_HAND, cls, layers="conv", method=method)
        torch.testing.assert_close(other.raw["conv"][0, 0], expected, atol=1e-5, rtol=1e-5)
    layercam = medcam.explain(hand_net, X_HAND, cls, layers="conv", method="layercam")
    expected_lc = expected if cls == 0 else torch.zeros(2, 2)
    torch.testing.assert_close(layercam.raw["conv"][0, 0], expected_lc)


def test_cam_known_answer(hand_net):
    result = medcam.explain(hand_net, X_HAND, "all", layers="conv", method="cam")
    expected = torch.tensor([HAND_CAM[0], HAND_CAM[1]])
    torch.testing.assert_close(result.raw["conv"][0], expected)
    assert result.classes.tolist() == [[0, 1]]


def test_upsampling_known_answer(hand_net):
    # The class-0 map is 0.25 + 0.5 i + 0.25 j on the 2x2 grid, a linear function, so bilinear
    # upsampling with align_corners=False samples it at source coordinates (0, .25, .75, 1).
    x = torch.nn.functional.interpolate(X_HAND, size=(4, 4), mode="nearest")
    result = medcam.explain(hand_net, x, 0, layers="conv")
    assert result.raw["conv"].shape[-2:] == (4, 4)  # 1x1 conv keeps the 4x4 grid
    small = medcam.Explainer(hand_net, "conv")(X_HAND, 0)
    coords = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected_2x2_to_4x4 = 0.25 + 0.5 * coords[:, None] + 0.25 * coords[None, :]
    up = medcam.engine.upsample(small.raw["conv"], (4, 4))
    torch.testing.assert_close(up[0, 0], expected_2x2_to_4x4)


# ----- reference implementation: one sample, one class at a time, loss.backward() -----


def _reference_act_grad(net, x, layer, cls):
    """Activation and gradient (numpy float64) of logit `cls` w.r.t. `layer`, sample by sample."""
    module = dict(net.named_modules())[layer]
    acts, grads = [], []
    for b in range(x.shape[0]):
        kept = {}

        def hook(m, i, o, kept=kept):
            o.retain_grad()
            kept["a"] = o

        h = module.register_forward_hook(hook)
        try:
            net.zero_grad()
            logits = net(x[b : b + 1])
            logits[0, cls].backward()
        finally:
            h.remove()
        acts.append(kept["a"].detach().double().numpy()[0])
        grads.append(kept["a"].grad.double().numpy()[0])
    return acts, grads


def _reference_map(method, a, g, w_fc, cls):
    """The paper formulas, written plainly with numpy over one sample: a, g (C, *S)."""
    axes = tuple(range(1, a.ndim))
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    if method == "gradcam":
        w = g.mean(axis=axes)
        return relu(np.tensordot(w, a, axes=1))
    if method == "gradcam++":
        g2, g3 = g**2, g**3
        sum_a = a.sum(axis=axes).reshape(-1, *([1] * (a.ndim - 1)))
        alpha = g2 / (2 * g2 + sum_a * g3 + EPS)
        alpha = np.where(g != 0, alpha, 0)
        w = (alpha * relu(g)).sum(axis=axes)
        return relu(np.tensordot(w, a, axes=1))
    if method == "xgradcam":
        w = (g * a).sum(axis=axes) / (a.sum(axis=axes) + EPS)
        return relu(np.tensordot(w, a, axes=1))
    if method == "hirescam":
        return relu((g * a).sum(axis=0))
    if method == "layercam":
        return relu((relu(g) * a).sum(axis=0))
    if method == "cam":
        return np.tensordot(w_fc[cls], a, axes=1)
    raise AssertionError(method)


GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
CASES = [(m, layer) for m in GRADIENT_METHODS for layer in ("features.3", "features.5")]
CASES.append(("cam", "features.5"))  # CAM: the layer feeding global pooling + linear


@pytest.mark.parametrize(("method", "layer"), CASES)
def test_methods_match_reference(small_cnn, method, layer):
    net, x = small_cnn
    result = medcam.explain(net, x, "all", layers=layer, method=method)
    raw = result.raw[layer]
    assert raw.shape[:2] == (2, 3)
    w_fc = net.fc.weight.detach().double().numpy()
    for cls in range(3):
        acts, grads = _reference_act_grad(net, x, layer, cls)
        for b in range(2):
            ref = _reference_map(method, acts[b], grads[b], w_fc, cls)
            np.testing.assert_allclose(raw[b, cls].numpy(), ref, rtol=2e-4, atol=1e-6)


def test_every_registered_method_is_tested():
    tested = {m for m, _ in CASES}
    assert {m.name for m in medcam.METHODS.values()} == tested


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("Grad-CAM", "gradcam"),
        ("gradcampp", "gradcam++"),
        ("GradCAM++", "gradcam++"),
        ("hires_cam", "hirescam"),
        ("XGradCAM", "xgradcam"),
        ("Layer-CAM", "layercam"),
    ],
)
def test_method_aliases(alias, name):
    assert medcam.engine.get_method(alias).name == name


def test_unknown_method_lists_known_ones():
    with pytest.raises(medcam.MedcamError, match="gradcam\\+\\+"):
        medcam.engine.get_method("scorecam")
