"""Explainer behaviour: batching, per-sample targets, model integrity, devices, errors."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import medcam
from tests.conftest import HandNet, SmallCNN, count_hooks


def test_batched_backward_equals_loop(small_cnn):
    net, x = small_cnn
    batched = medcam.explain(net, x, "all", layers="features.3", batched=True)
    looped = medcam.explain(net, x, "all", layers="features.3", batched=False)
    assert batched.batched_backward and not looped.batched_backward
    torch.testing.assert_close(batched.raw["features.3"], looped.raw["features.3"])
    torch.testing.assert_close(batched.heatmap, looped.heatmap)


def test_all_classes_equal_one_call_per_class(small_cnn):
    net, x = small_cnn
    every = medcam.explain(net, x, "all", layers="features.5", method="gradcam++")
    assert every.heatmap.shape == (2, 3, *x.shape[2:])
    assert every.classes.tolist() == [[0, 1, 2], [0, 1, 2]]
    for cls in range(3):
        one = medcam.explain(net, x, cls, layers="features.5", method="gradcam++")
        torch.testing.assert_close(one.heatmap[:, 0], every.heatmap[:, cls])
        torch.testing.assert_close(one.scores[:, 0], every.logits[:, cls])


def test_predicted_class_is_per_sample(hand_net):
    # logit0 - logit1 = 2 mean(x) + 1 - 4 mean(x) + 4 + 0.5 = 5.5 - 2 mean(x)
    # so mean(x) = 0 predicts class 0 and mean(x) = 5 predicts class 1.
    x = torch.stack([torch.zeros(1, 3, 3), torch.full((1, 3, 3), 5.0)])
    x[1, 0, 0, 0] = 9.0  # some structure so the class-1 map is not constant
    batch = medcam.explain(hand_net, x, "pred", layers="conv")
    assert batch.classes.tolist() == [[0], [1]]
    for b in range(2):
        single = medcam.explain(hand_net, x[b : b + 1], "pred", layers="conv")
        assert single.classes.tolist() == [[b]]
        torch.testing.assert_close(batch.raw["conv"][b], single.raw["conv"][0])


def test_explicit_per_sample_classes(small_cnn):
    net, x = small_cnn
    mixed = medcam.explain(net, x, [2, 0], layers="features.5")
    assert mixed.classes.tolist() == [[2], [0]]
    for b, cls in enumerate([2, 0]):
        single = medcam.explain(net, x[b : b + 1], cls, layers="features.5")
        torch.testing.assert_close(mixed.heatmap[b], single.heatmap[0])
    pairs = medcam.explain(net, x, [[2, 1], [0, 2]], layers="features.5")
    torch.testing.assert_close(pairs.heatmap[:, 0], mixed.heatmap[:, 0])


class NumpyDouble(torch.autograd.Function):
    """y = 2x with a backward that leaves torch (no vmap batching rule is possible)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return torch.from_numpy(grad.detach().cpu().numpy() * 2)


class NumpyHeadNet(SmallCNN):
    def __init__(self, use_numpy: bool):
        super().__init__(spatial_dims=2)
        self.use_numpy = use_numpy

    def forward(self, x):
        h = self.pool(self.features(x)).flatten(1)
        return self.fc(NumpyDouble.apply(h) if self.use_numpy else h * 2)


def test_fallback_loop_when_an_op_cannot_be_batched():
    torch.manual_seed(0)
    plain = NumpyHeadNet(use_numpy=False).eval()
    odd = NumpyHeadNet(use_numpy=True).eval()
    odd.load_state_dict(plain.state_dict())
    x = torch.randn(2, 2, 12, 10)
    reference = medcam.explain(plain, x, "all", layers="features.3")
    fallback = medcam.explain(odd, x, "all", layers="features.3")
    assert reference.batched_backward and not fallback.batched_backward
    torch.testing.assert_close(fallback.heatmap, reference.heatmap)
    with pytest.raises(medcam.ModelError, match="batching"):
        medcam.explain(odd, x, "all", layers="features.3", batched=True)
    assert count_hooks(odd) == 0


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [getattr(m, "inplace", None) for m in model.modules()],
        [("forward" in vars(m)) for m in model.modules()],
    )


def test_model_is_not_mutated():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    net.train()
    net[3].eval()  # a mixed-mode model: each module's own flag must come back
    before = _snapshot(net)
    x = torch.randn(3, 1, 8, 8)
    first = medcam.explain(net, x, "all", layers="1")  # BN output, then in-place ReLU
    second = medcam.explain(net, x, "all", layers="1")
    after = _snapshot(net)
    for a, b in zip(before[0].values(), after[0].values(), strict=True):
        assert torch.equal(a, b)  # batch-norm running statistics untouched
    assert before[1:] == after[1:]
    assert all(p.grad is None for p in net.parameters())  # no parameter gradients computed
    assert count_hooks(net) == 0
    # eval mode for the call: dropout off, so two calls agree exactly
    torch.testing.assert_close(first.heatmap, second.heatmap)
    # the kept activation is the BN output before the in-place ReLU, so it has negatives
    bn_out = net[1].eval()(net[0](x)).detach()
    net[1].train()
    assert (bn_out < 0).any()
    grad_ref = medcam.explain(copy.deepcopy(net).eval(), x, "all", layers="1")
    torch.testing.assert_close(first.raw["1"], grad_ref.raw["1"])


def test_hooks_removed_after_errors(small_cnn):
    net, x = small_cnn
    before = count_hooks(net)
    with pytest.raises(medcam.TargetError, match="out of range"):
        medcam.explain(net, x, 7, layers="features.3")
    assert count_hooks(net) == before

    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            self.conv(x)
            raise RuntimeError("boom inside forward")

    bad = Exploding()
    with pytest.raises(medcam.ModelError, match="boom"):
        medcam.explain(bad, torch.randn(1, 1, 6, 6), layers="conv")
    assert count_hooks(bad) == 0


def test_result_keeps_no_graph(small_cnn):
    net, x = small_cnn
    result = medcam.explain(net, x, "all", layers=["features.1", "features.5"], fusion="mean")
    tensors = [result.fused, result.classes, result.scores, result.logits]
    tensors += list(result.raw.values()) + list(result.heatmaps.values())
    assert all(t.grad_fn is None and not t.requires_grad for t in tensors)
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())


def test_explainer_keeps_no_per_call_state(small_cnn):
    net, x = small_cnn
    explainer = medcam.Explainer(net, "features.3", "layercam")
    before = dict(vars(explainer))
    explainer(x, "all")
    assert vars(explainer) == before


def test_frozen_parameters_and_inference_mode(small_cnn):
    net, x = small_cnn
    reference = medcam.explain(net, x, "all", layers="features.3")
    frozen = copy.deepcopy(net)
    for p in frozen.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(
        medcam.explain(frozen, x, "all", layers="features.3").heatmap, reference.heatmap
    )
    with torch.inference_mode():
        x_inf = x.clone()
        inside = medcam.explain(net, x_inf, "all", layers="features.3")
    torch.testing.assert_close(inside.heatmap, reference.heatmap)
    with torch.no_grad():
        under_no_grad = medcam.explain(net, x, "all", layers="features.3")
    torch.testing.assert_close(under_no_grad.heatmap, reference.heatmap)


def test_zero_gradient_gives_zero_map_not_nan(hand_net):
    net = copy.deepcopy(hand_net)
    with torch.no_grad():
        net.fc.weight[1].zero_()
    x = torch.rand(1, 1, 5, 5)
    for method in ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"):
        for norm in ("none", "minmax", "percentile"):
            result = medcam.explain(net, x, 1, layers="conv", method=method, normalize=norm)
            assert torch.equal(result.heatmap, torch.zeros_like(result.heatmap)), (method, norm)


def test_two_threads_share_one_model():
    torch.manual_seed(0)
    net = SmallCNN(spatial_dims=3).eval()
    explainer = medcam.Explainer(net, "features.3", "gradcam")
    inputs = [torch.randn(1, 2, 8, 8, 8) for _ in range(2)]
    expected = [explainer(x, "all").heatmap for x in inputs]
    errors: list[BaseException] = []
    mismatches = []

    def work(i: int) -> None:
        try:
            for _ in range(15):
                got = explainer(inputs[i], "all").heatmap
                if not torch.allclose(got, expected[i]):
                    mismatches.append(i)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches
    assert count_hooks(net) == 0


def test_autocast_bfloat16_gives_float32_maps(small_cnn):
    net, x = small_cnn
    reference = medcam.explain(net, x, "all", layers="features.3")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = medcam.explain(net, x, "all", layers="features.3")
    assert mixed.heatmap.dtype == torch.float32
    a, b = mixed.heatmap.flatten(), reference.heatmap.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.98


def test_double_precision_model():
    torch.manual_seed(0)
    net = SmallCNN(2).double().eval()
    result = medcam.explain(net, torch.randn(1, 2, 8, 8, dtype=torch.float64), "all")
    assert result.heatmap.dtype == torch.float32


def test_multi_output_models():
    torch.manual_seed(0)
    base = SmallCNN(2).eval()

    class TupleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = base

        def forward(self, x):
            return x.mean(), self.net(x)

    class DictNet(TupleNet):
        def forward(self, x):
            return {"aux": x.mean(), "logits": self.net(x)}

    x = torch.randn(2, 2, 8, 8)
    reference = medcam.explain(base, x, "all", layers="features.3")
    from_tuple = medcam.explain(TupleNet(), x, "all", layers="net.features.3", output=1)
    from_dict = medcam.explain(DictNet(), x, "all", layers="net.features.3", output="logits")
    torch.testing.assert_close(from_tuple.heatmap, reference.heatmap)
    torch.testing.assert_close(from_dict.heatmap, reference.heatmap)
    with pytest.raises(medcam.TargetError, match="output=index"):
        medcam.explain(TupleNet(), x, layers="net.features.3")
    with pytest.raises(medcam.TargetError, match="logits"):
        medcam.explain(DictNet(), x, layers="net.features.3")


def test_normalisation_is_explicit_and_recorded(small_cnn):
    net, x = small_cnn
    raw = medcam.explain(net, x, "all", layers="features.3")
    assert raw.normalization == {"method": "none"}
    mm = medcam.explain(net, x, "all", layers="features.3", normalize="minmax")
    assert mm.normalization["method"] == "minmax"
    flat = mm.heatmap.flatten(2)
    nonconstant = raw.heatmap.flatten(2).amax(2) > raw.heatmap.flatten(2).amin(2)
    assert torch.allclose(flat.amax(2)[nonconstant], torch.tensor(1.0))
    assert torch.allclose(flat.amin(2), torch.tensor(0.0))
    # min-max is monotone: same ordering of voxels as the raw map (never flipped)
    b, k = torch.nonzero(nonconstant)[0]
    assert torch.argmax(mm.heatmap[b, k]) == torch.argmax(raw.heatmap[b, k])
    # raw maps stay raw whatever the normalisation
    torch.testing.assert_close(mm.raw["features.3"], raw.raw["features.3"])
    pct = medcam.explain(net, x, 0, layers="features.3", normalize="percentile")
    assert pct.normalization["percentiles"] == [0.0, 99.0]
    assert pct.heatmap.min() >= 0 and pct.heatmap.max() == 1


def test_fusion_of_layers(small_cnn):
    net, x = small_cnn
    layers = ["features.1", "features.5"]
    res = medcam.explain(net, x, "all", layers=layers, fusion="mean")
    expand = (slice(None), slice(None)) + (None,) * (x.ndim - 2)
    peak = [res.heatmaps[n].flatten(2).amax(2)[expand] for n in layers]
    scaled = [res.heatmaps[n] / p.clamp_min(1e-30) for n, p in zip(layers, peak, strict=True)]
    torch.testing.assert_close(res.fused, (scaled[0] + scaled[1]) / 2)
    assert res.fusion == "mean" and res.heatmap is res.fused
    prod = medcam.explain(net, x, "all", layers=layers, fusion="product")
    torch.testing.assert_close(prod.fused, (scaled[0] * scaled[1]).sqrt())
    separate = medcam.explain(net, x, "all", layers=layers)
    with pytest.raises(medcam.MedcamError, match="fusion"):
        _ = separate.heatmap


def test_device_argument_follows_the_model(small_cnn):
    net, x = small_cnn
    assert medcam.explain(net, x, device="cpu").heatmap.device.type == "cpu"
    with pytest.raises(medcam.ModelError, match=r"model\.to"):
        medcam.explain(net, x, device="meta")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(small_cnn):
    net, x = small_cnn
    cpu = medcam.explain(net, x, "all", layers="features.3")
    gpu = medcam.explain(copy.deepcopy(net).to("cuda"), x, "all", layers="features.3")
    assert gpu.heatmap.device.type == "cuda"
    torch.testing.assert_close(gpu.heatmap.cpu(), cpu.heatmap, rtol=1e-4, atol=1e-5)


def test_hand_net_fixture_is_deterministic():
    assert torch.equal(HandNet().fc.weight, torch.tensor([[2.0, 1.0], [0.0, -4.0]]))


def test_no_graph_is_built_before_the_target_layer(small_cnn):
    net, x = small_cnn
    seen: dict[str, bool] = {}
    handles = [
        net.features[i].register_forward_hook(
            lambda m, i_, o, i=i: seen.__setitem__(i, o.requires_grad)
        )
        for i in (0, 2, 4)
    ]
    try:
        assert torch.is_grad_enabled()
        medcam.explain(net, x, "all", layers="features.3")
        assert torch.is_grad_enabled()  # the caller's grad mode is restored
        with torch.no_grad():
            medcam.explain(net, x, "all", layers="features.3")
            assert not torch.is_grad_enabled()
    finally:
        for h in handles:
            h.remove()
    # convs before the layer ran without autograd; the one after it records a graph
    assert seen == {0: False, 2: False, 4: True}
