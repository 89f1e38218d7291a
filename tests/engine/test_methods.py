"""Each method against a hand-computed answer and against a plain reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medcam

# Denominator epsilons of the reference implementation, pytorch-grad-cam 1.5.7 (read from its
# grad_cam_plusplus.py and xgrad_cam.py; tests/engine/test_reference_agreement.py runs the
# installed library itself). Never imported from medcam: a wrong constant there must fail here.
PGC_GRADCAM_PP_EPS = 0.000001
PGC_XGRADCAM_EPS = 1e-7

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
        alpha = g2 / (2 * g2 + sum_a * g3 + PGC_GRADCAM_PP_EPS)
        alpha = np.where(g != 0, alpha, 0)
        w = (alpha * relu(g)).sum(axis=axes)
        return relu(np.tensordot(w, a, axes=1))
    if method == "xgradcam":
        w = (g * a).sum(axis=axes) / (a.sum(axis=axes) + PGC_XGRADCAM_EPS)
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


# ----- perturbation methods: one sample, one channel, one plain forward at a time -----


def _layer_output(net, x, layer):
    kept = {}
    h = dict(net.named_modules())[layer].register_forward_hook(lambda m, i, o: kept.update(a=o))
    try:
        with torch.no_grad():
            logits = net(x)
    finally:
        h.remove()
    return kept["a"], logits


def _reference_perturbation_map(method, net, x, layer, cls):
    """Score-CAM (Wang et al. 2020, Alg. 1) and Ablation-CAM (Desai & Ramaswamy 2020, Eq. 1),
    written as loops; masks upsampled bilinearly/trilinearly with align_corners=False."""
    a, logits = _layer_output(net, x, layer)
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    maps = []
    for b in range(x.shape[0]):
        weights = []
        for c in range(a.shape[1]):
            if method == "scorecam":
                m = torch.nn.functional.interpolate(
                    a[b : b + 1, c : c + 1], size=x.shape[2:], mode=mode, align_corners=False
                )
                span = m.max() - m.min()
                m = (m - m.min()) / span if span > 0 else torch.zeros_like(m)
                with torch.no_grad():
                    weights.append(net(x[b : b + 1] * m)[0, cls])
            else:
                ablated = a[b : b + 1].clone()
                ablated[:, c] = 0
                module = dict(net.named_modules())[layer]
                h = module.register_forward_hook(lambda mod, i, o, v=ablated: v)
                try:
                    with torch.no_grad():
                        y_c = net(x[b : b + 1])[0, cls]
                finally:
                    h.remove()
                y = logits[b, cls]
                weights.append((y - y_c) / y.abs())
        w = torch.stack(weights)
        if method == "scorecam":
            w = torch.softmax(w, dim=0)
        maps.append(torch.relu(torch.einsum("c,c...->...", w, a[b])))
    return torch.stack(maps)


PERTURBATION_CASES = [(m, "features.3") for m in ("scorecam", "ablationcam")]


@pytest.mark.parametrize(("method", "layer"), PERTURBATION_CASES)
@pytest.mark.parametrize("per_eval", [1, 4, 64])
def test_perturbation_methods_match_reference(small_cnn, method, layer, per_eval):
    net, x = small_cnn
    result = medcam.explain(
        net, x, "all", layers=layer, method=method, perturbations_per_eval=per_eval
    )
    channels = 6  # features.3 is the ReLU after conv(4 -> 6); B = 2 samples
    assert result.metadata()["perturbation"]["forward_passes"] == -(-2 * channels // per_eval)
    for cls in range(3):
        ref = _reference_perturbation_map(method, net, x, layer, cls)
        torch.testing.assert_close(result.raw[layer][:, cls], ref, rtol=1e-4, atol=1e-6)


def test_every_registered_method_is_tested():
    tested = {m for m, _ in CASES} | {m for m, _ in PERTURBATION_CASES}
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
        ("ScoreCAM", "scorecam"),
        ("Ablation-CAM", "ablationcam"),
    ],
)
def test_method_aliases(alias, name):
    assert medcam.engine.get_method(alias).name == name


def test_unknown_method_lists_known_ones():
    with pytest.raises(medcam.MedcamError, match=r"gradcam\+\+.*scorecam"):
        medcam.engine.get_method("eigencam")
