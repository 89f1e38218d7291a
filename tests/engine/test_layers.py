"""Layer listing, automatic choice and the errors for unusable layers or models."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet, resnet18
from torch import nn

import medcam
from tests.conftest import SmallCNN, count_hooks


def test_list_layers_reports_shapes_in_execution_order():
    net = SmallCNN(spatial_dims=3).eval()
    x = torch.randn(1, 2, 8, 10, 6)
    infos = medcam.list_layers(net, x)
    by_name = {i.name: i for i in infos}
    assert by_name["features.2"].output_shape == (1, 6, 4, 5, 3)
    assert by_name["features.2"].feature_shape == (4, 5, 3)
    assert by_name["fc"].feature_shape is None and not by_name["fc"].is_candidate
    assert by_name["pool"].output_shape == (1, 5, 1, 1, 1) and not by_name["pool"].is_candidate
    names = [i.name for i in infos]
    assert names.index("features.5") < names.index("features") < names.index("pool")
    assert count_hooks(net) == 0


def test_auto_picks_last_spatial_layer_of_a_classifier():
    net = SmallCNN(spatial_dims=2).eval()
    result = medcam.explain(net, torch.randn(1, 2, 12, 12))
    # "features" (the Sequential) finishes after its last ReLU and is the last module whose
    # output still has spatial extent; the pool after it is 1x1.
    assert result.layers == ["features"]
    assert result.feature_shapes["features"] == (6, 6)


def test_auto_on_monai_resnet_skips_reused_relu():
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3).eval()
    infos = medcam.list_layers(net, torch.randn(1, 1, 64, 64))
    assert any(i.calls == 2 and not i.is_candidate for i in infos)  # BasicBlock's shared ReLU
    assert medcam.Explainer(net, "last").layer_names(torch.randn(1, 1, 64, 64)) == ["layer4"]


def test_auto_on_segmentation_net_skips_the_head():
    net = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    result = medcam.explain(net, x, medcam.SegmentationTarget(1))
    chosen = result.layers[0]
    infos = {i.name: i for i in medcam.list_layers(net, x)}
    assert infos[chosen].output_shape != (1, 2, 16, 16, 16)
    assert result.heatmap.shape == (1, 1, 16, 16, 16)


def test_unknown_layer_suggests_close_names():
    net = SmallCNN(spatial_dims=2)
    with pytest.raises(medcam.LayerError, match=r"features\.3") as info:
        medcam.Explainer(net, "feature.3")
    assert "list_layers" in str(info.value)
    with pytest.raises(KeyError):  # LayerError is also a KeyError, for MONAI-style callers
        medcam.Explainer(net, "nope")


def test_module_objects_are_accepted_as_layers():
    torch.manual_seed(0)
    net = SmallCNN(spatial_dims=2).eval()
    x = torch.randn(1, 2, 8, 8)
    by_module = medcam.explain(net, x, 1, layers=[net.features[3]])
    by_name = medcam.explain(net, x, 1, layers="features.3")
    assert by_module.layers == ["features.3"]
    torch.testing.assert_close(by_module.heatmap, by_name.heatmap)
    with pytest.raises(medcam.LayerError, match="not a submodule"):
        medcam.Explainer(net, nn.Conv2d(1, 1, 1))


def test_layer_without_spatial_output():
    net = SmallCNN(spatial_dims=2).eval()
    with pytest.raises(medcam.LayerError, match="no spatial extent"):
        medcam.explain(net, torch.randn(1, 2, 8, 8), layers="fc")
    with pytest.raises(medcam.LayerError, match="no spatial extent"):
        medcam.explain(net, torch.randn(1, 2, 8, 8), layers="pool")
    assert count_hooks(net) == 0


def test_model_without_conv_layers():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(medcam.LayerError, match="conv layers"):
        medcam.explain(mlp, torch.randn(1, 1, 4, 4))


def test_reused_module_cannot_be_a_target():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.head = nn.Linear(1, 2)

        def forward(self, x):
            x = self.conv(self.conv(x))
            return self.head(x.mean(dim=(2, 3)))

    with pytest.raises(medcam.LayerError, match="ran 2 times"):
        medcam.explain(Reuse(), torch.randn(1, 1, 6, 6), layers="conv")


def test_torchscript_is_refused_with_advice():
    scripted = torch.jit.script(SmallCNN(spatial_dims=2).eval())
    with pytest.raises(medcam.ModelError, match="network_def"):
        medcam.Explainer(scripted)


def test_no_differentiable_path():
    class Detached(SmallCNN):
        def forward(self, x):
            return self.fc(self.pool(self.features(x)).flatten(1).detach())

    net = Detached(spatial_dims=2).eval()
    with pytest.raises(medcam.ModelError, match="differentiable path"):
        medcam.explain(net, torch.randn(1, 2, 8, 8), layers="features.3")
    for p in net.parameters():
        p.requires_grad_(False)
    with pytest.raises(medcam.ModelError, match="differentiabl"):
        medcam.explain(net, torch.randn(1, 2, 8, 8), layers="features.3")
    assert count_hooks(net) == 0


def test_layer_that_does_not_run():
    class Unused(SmallCNN):
        def __init__(self):
            super().__init__(spatial_dims=2)
            self.spare = nn.Conv2d(2, 2, 3)

    with pytest.raises(medcam.LayerError, match="did not run"):
        medcam.explain(Unused().eval(), torch.randn(1, 2, 8, 8), layers="spare")


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.full((1, 2, 8, 8), float("nan")), "128 NaN"),
        (torch.tensor([[[[float("inf"), 0.0], [0.0, 0.0]]]]).expand(1, 2, 2, 2), "2 infinite"),
        (torch.randn(2, 8, 8)[None, None, None], "expected"),
        (torch.ones(1, 2, 8, 8, dtype=torch.int64), "x.float"),
        (torch.randn(8, 8).numpy(), "torch.Tensor"),
    ],
)
def test_bad_inputs(x, match):
    net = SmallCNN(spatial_dims=2).eval()
    with pytest.raises(medcam.InputError, match=match):
        medcam.explain(net, x)
