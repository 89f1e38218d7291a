"""The engine under odd inputs, failing models and shared models: a medcam error that names
the input, or the right answer; the caller's model state (training flags, batch-norm
statistics) is never changed, whatever the threads."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from torch import nn

import medcam
from tests.conftest import SmallCNN, count_hooks


class BNNet(nn.Module):
    """conv -> batch norm -> relu -> conv -> batch norm -> GAP -> linear, with dropout: every
    kind of module whose training flag changes the output, and buffers a forward updates."""

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.pause = 0.0  # seconds to sleep mid-forward (lets threads interleave)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.features = nn.Sequential(
            conv(2, 6, 3, padding=1), norm(6), nn.ReLU(), conv(6, 5, 3, padding=1), norm(5)
        )
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features[:2](x)
        time.sleep(self.pause)
        pooled = self.features[2:](h).relu().flatten(2).mean(-1)
        return self.fc(self.drop(pooled))


def _trained_bn_net(seed: int = 0) -> BNNet:
    """A BNNet in training mode whose running statistics are not the initial 0/1 (so eval and
    train mode give clearly different maps)."""
    torch.manual_seed(seed)
    net = BNNet()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 2, 10, 10) * 3 + 1)
    return net.train()


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _same_state(net: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = net.state_dict()
    return all(torch.equal(now[k], v) for k, v in before.items())


# ----------------------------------------------------------------------------- odd inputs


@pytest.mark.parametrize("axis", [0, 1, 2, 3, 4])
def test_an_empty_dimension_is_refused_before_the_model_runs(axis):
    shape = [1, 2, 6, 6, 6]
    shape[axis] = 0
    net = SmallCNN(3).eval()
    with pytest.raises(medcam.InputError, match=r"empty dimension") as err:
        medcam.explain(net, torch.zeros(shape))
    assert str(tuple(shape)) in str(err.value)
    with pytest.raises(medcam.InputError, match=r"\(B, C, H, W\)"):
        medcam.list_layers(net, torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_another_float_dtype_is_cast_to_the_models(dtype):
    """A float16 / bfloat16 / float64 input to a float32 model gives the float32 input's map
    (the input is cast to the model's dtype: the map differs only by the input's rounding)."""
    torch.manual_seed(0)
    net = SmallCNN(2).eval()
    x = torch.randn(2, 2, 8, 8).to(dtype)
    got = medcam.explain(net, x, "all", layers="features.3")
    want = medcam.explain(net, x.float(), "all", layers="features.3")
    torch.testing.assert_close(got.heatmap, want.heatmap, rtol=0, atol=0)
    assert got.extra["input_dtype"] == str(dtype).removeprefix("torch.")
    assert "input_dtype" not in want.extra
    assert x.dtype == dtype  # the caller's tensor is untouched
    names = [i.name for i in medcam.list_layers(net, x)]
    assert "features.3" in names


def test_a_float32_input_to_a_double_model_is_cast_up():
    torch.manual_seed(0)
    net = SmallCNN(2).double().eval()
    x = torch.randn(1, 2, 8, 8)
    got = medcam.explain(net, x, 1, layers="features.3")
    want = medcam.explain(net, x.double(), 1, layers="features.3")
    torch.testing.assert_close(got.heatmap, want.heatmap)


# ----------------------------------------------------------------------------- failing models


class Raising(nn.Module):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.error = error

    def forward(self, x):
        self.conv(x)
        raise self.error


@pytest.mark.parametrize(
    "error",
    [RuntimeError("shape mismatch in block 3"), ValueError("bad value"), KeyError("k")],
    ids=["RuntimeError", "ValueError", "KeyError"],
)
def test_a_model_that_raises_is_a_model_error_naming_the_input(error):
    net = Raising(error).eval()
    x = torch.zeros(1, 2, 7, 5, dtype=torch.float16)
    with pytest.raises(medcam.ModelError) as err:
        medcam.explain(net, x, layers="conv")
    message = str(err.value)
    assert "(1, 2, 7, 5)" in message and "float32" in message  # cast to the model's dtype
    assert type(error).__name__ in message
    assert err.value.__cause__ is error
    assert count_hooks(net) == 0
    with pytest.raises(medcam.ModelError):  # the shape-only pass of layers="auto" too
        medcam.explain(net, x)
    with pytest.raises(medcam.ModelError):
        medcam.list_layers(net, x)


def test_out_of_memory_in_a_whole_volume_pass_says_to_use_sliding_windows():
    """The whole-volume path (what explain_scan and the CLI run without a window) does not try
    padded sizes after an out-of-memory error: one forward, and the error's hint."""
    from medcam.engine.inferer import explain_whole

    calls = []
    net = Raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")).eval()
    counter = net.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(medcam.ModelError, match="sliding windows") as err:
        explain_whole(medcam.Explainer(net, "conv", "gradcam"), torch.zeros(1, 2, 9, 9), 0)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    counter.remove()
    assert len(calls) == 1 and count_hooks(net) == 0


def test_batch_norm_with_a_batch_of_one_in_training_mode_says_what_to_do():
    torch.manual_seed(0)
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(nn.Conv2d(1, 4, 3), *pool, nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(medcam.ModelError, match="eval=True") as err:
        medcam.explain(net, torch.randn(1, 1, 6, 6), layers="0", eval=False)
    assert isinstance(err.value.__cause__, ValueError)
    assert net.training and all(m.training for m in net.modules())


def test_a_failing_backward_is_a_model_error():
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no derivative for this op")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(NoBackward.apply(self.conv(x)).mean((2, 3)))

    net = Net().eval()
    with pytest.raises(medcam.ModelError, match="backward pass") as err:
        medcam.explain(net, torch.randn(1, 1, 6, 6), "all", layers="conv")
    assert "no derivative" in str(err.value.__cause__)
    assert count_hooks(net) == 0
    # a gradient-free method needs no backward
    medcam.explain(net, torch.randn(1, 1, 6, 6), 0, layers="conv", method="scorecam")


def test_a_failing_target_callable_or_output_selector_is_a_target_error():
    net = SmallCNN(2).eval()
    x = torch.randn(1, 2, 8, 8)

    def bad_target(logits):
        return logits[:, 99]

    with pytest.raises(medcam.TargetError, match="bad_target") as err:
        medcam.explain(net, x, bad_target, layers="features.3")
    assert isinstance(err.value.__cause__, IndexError)
    with pytest.raises(medcam.TargetError, match="selector"):
        medcam.explain(net, x, layers="features.3", output=lambda out: out.logits)


# ----------------------------------------------------------------------------- inference mode


def test_explicit_targets_made_under_inference_mode():
    """Every target form built inside ``torch.inference_mode()`` (so its tensors are inference
    tensors) gives the map it gives outside."""
    torch.manual_seed(0)
    net = SmallCNN(2).eval()
    x = torch.randn(2, 2, 8, 8)

    def targets():
        return [1, [2, 0], torch.tensor([[0, 1], [2, 2]]), medcam.engine.targets.ClassTarget(2)]

    outside = [medcam.explain(net, x, t, layers="features.3").heatmap for t in targets()]
    with torch.inference_mode():
        inside = [medcam.explain(net, x.clone(), t, layers="features.3").heatmap for t in targets()]
    for a, b in zip(inside, outside, strict=True):
        torch.testing.assert_close(a, b)


def test_segmentation_target_with_a_mask_made_under_inference_mode():
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    x = torch.randn(1, 1, 8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 3:6] = True
    want = medcam.explain(seg, x, medcam.SegmentationTarget(2, mask=mask), layers="1").heatmap
    with torch.inference_mode():
        target = medcam.SegmentationTarget(2, mask=mask.clone())
        got = medcam.explain(seg, x.clone(), target, layers="1").heatmap
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- model state


def test_eval_false_restores_batch_norm_statistics():
    """With eval=False the model runs in training mode (batch statistics, dropout) and its
    buffers (running mean, variance, batch counter) are as before the call."""
    net = _trained_bn_net()
    before = _state(net)
    x = torch.randn(3, 2, 10, 10)
    torch.manual_seed(1)
    first = medcam.explain(net, x, "all", layers="features.2", eval=False)
    assert _same_state(net, before) and all(m.training for m in net.modules())
    torch.manual_seed(1)  # the same dropout mask: the same map
    again = medcam.explain(net, x, "all", layers="features.2", eval=False)
    torch.testing.assert_close(first.heatmap, again.heatmap)
    # it is the training-mode map, not the eval-mode one
    evaluated = medcam.explain(net, x, "all", layers="features.2")
    assert not torch.allclose(first.heatmap, evaluated.heatmap, atol=1e-3)
    assert _same_state(net, before) and all(m.training for m in net.modules())


def _run_threads(n: int, work) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as err:  # reported by the test
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_four_threads_share_an_explainer_on_a_training_mode_model():
    """4 threads x 10 calls on one Explainer and one model in training mode: every map equals
    the serial map, and the model ends as it began (training flags, batch-norm statistics)."""
    net = _trained_bn_net()
    net.pause = 0.002
    explainer = medcam.Explainer(net, "features.2", "gradcam")
    torch.manual_seed(2)
    inputs = [torch.randn(1, 2, 10, 10) for _ in range(4)]
    expected = [explainer(x, "all").heatmap for x in inputs]
    before = _state(net)
    mismatches: list[int] = []

    def work(i: int) -> None:
        for _ in range(10):
            if not torch.equal(explainer(inputs[i], "all").heatmap, expected[i]):
                mismatches.append(i)

    assert _run_threads(4, work) == []
    assert mismatches == []
    assert _same_state(net, before)
    assert all(m.training for m in net.modules())
    assert count_hooks(net) == 0


def test_threads_mixing_eval_and_training_mode_calls():
    """Two threads explain in eval mode, two with eval=False, on one training-mode model: each
    gets its serial map (eval=False without dropout's randomness: the dropout is 0 here) and
    the model ends as it began."""
    net = _trained_bn_net()
    net.drop.p, net.pause = 0.0, 0.002
    evaluated = medcam.Explainer(net, "features.2", "gradcam")
    trained = medcam.Explainer(net, "features.2", "gradcam", eval=False)
    torch.manual_seed(3)
    x = torch.randn(2, 2, 10, 10)
    expected = {0: evaluated(x, "all").heatmap, 1: trained(x, "all").heatmap}
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)
    before = _state(net)
    mismatches: list[int] = []

    def work(i: int) -> None:
        explainer = (evaluated, trained)[i % 2]
        for _ in range(10):
            if not torch.allclose(explainer(x, "all").heatmap, expected[i % 2], atol=1e-6):
                mismatches.append(i)

    assert _run_threads(4, work) == []
    assert mismatches == []
    assert _same_state(net, before) and all(m.training for m in net.modules())


def test_model_state_is_restored_after_an_error():
    net = _trained_bn_net()
    before = _state(net)
    for eval_ in (True, False):
        with pytest.raises(medcam.TargetError):
            medcam.explain(net, torch.randn(2, 2, 10, 10), 7, layers="features.2", eval=eval_)
        assert _same_state(net, before) and all(m.training for m in net.modules())
    medcam.explain(copy.deepcopy(net), torch.randn(2, 2, 10, 10), layers="features.2")


def test_a_model_built_in_inference_mode_is_refused_with_the_fix():
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    normal = DenseNet(2, 1, 2, init_features=4, growth_rate=4, block_config=(2,)).eval()
    with torch.inference_mode():
        frozen = DenseNet(2, 1, 2, init_features=4, growth_rate=4, block_config=(2,)).eval()
        frozen.load_state_dict(normal.state_dict())
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(medcam.ModelError, match=r"features.conv0.weight .* torch.inference_mode"):
        medcam.explain(frozen, x, 1)
    # the fix the message gives works, and gives the normal model's map
    frozen.load_state_dict({k: v.clone() for k, v in frozen.state_dict().items()}, assign=True)
    torch.testing.assert_close(medcam.explain(frozen, x, 1).heatmap,
                               medcam.explain(normal, x, 1).heatmap)  # fmt: skip
