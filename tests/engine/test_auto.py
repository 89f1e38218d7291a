"""The default layer rule (``layers="auto"``): what it picks on MONAI networks, and that the
choice and its reason reach the result's metadata, the CLI and every entry point's default."""

from __future__ import annotations

import inspect
import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from monai.networks.nets import DenseNet121, SwinUNETR, UNet, resnet18, resnet50
from torch import nn

import medcam
from medcam.engine.auto import auto_choice
from medcam.engine.layers import trace_layers

ROOT = Path(__file__).resolve().parents[2]


def choose(net: nn.Module, x: torch.Tensor, **kw):
    infos, out = trace_layers(net.eval(), x)
    return auto_choice(infos, x.shape, tuple(out.shape), **kw)


@pytest.mark.slow
def test_densenet121_fuses_one_layer_per_resolution_stage():
    # DenseNet121-3D at 64^3: stem conv (stride 2) + max-pool -> 16^3 (1/4); denseblock1 and
    # the 1x1 conv of transition1 stay at 16^3, its avg-pool halves to 8^3; transitions 2 and
    # 3 -> 4^3 and 2^3 for denseblock4 / class_layers.relu. The deepest layer of each grid
    # before a pool is the transition's conv.
    net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    c = choose(net, torch.zeros(1, 1, 64, 64, 64))
    assert c.grids == {
        "features.transition1.conv": (16, 16, 16),
        "features.transition2.conv": (8, 8, 8),
        "features.transition3.conv": (4, 4, 4),
        "class_layers.relu": (2, 2, 2),
    }
    assert c.layers == list(c.grids) and c.fusion == "product"
    assert "1/4 of the input 64x64x64" in c.rule and "class_layers.relu (2x2x2)" in c.rule
    pair = choose(net, torch.zeros(1, 1, 64, 64, 64), chain=False, fusion="mean")
    assert pair.layers == ["features.transition1.conv", "class_layers.relu"]
    assert pair.fusion == "mean"
    # the variant the benchmark compares: each stage's block output
    blocks = choose(net, torch.zeros(1, 1, 64, 64, 64), block_outputs=True)
    assert blocks.layers[:3] == [f"features.denseblock{i}" for i in (1, 2, 3)]
    # and a window: grids coarser than 1/8 of 64 (8^3) left out of the chain
    window = choose(net, torch.zeros(1, 1, 64, 64, 64), coarsest=Fraction(1, 8))
    assert window.layers == ["features.transition1.conv", "features.transition2.conv"]
    assert "between 1/4 and 1/8" in window.rule and "left out" in window.rule
    alone = choose(net, torch.zeros(1, 1, 64, 64, 64), coarsest=Fraction(1, 4))
    assert alone.layers == ["features.transition1.conv"] and alone.fusion is None


def test_resnet50_bottleneck_stages():
    # In a bottleneck the stride sits in conv2, so layer3.0.conv1 / bn1 still have layer2's
    # 16^2 grid (layer3.0.relu runs three times per block: not a candidate). The deepest
    # layer of each grid is therefore the next stage's first bn1; block_outputs=True takes
    # the stage's own output instead.
    net = resnet50(spatial_dims=2, n_input_channels=1, num_classes=2)
    c = choose(net, torch.zeros(1, 1, 64, 64))
    assert c.grids == {"layer3.0.bn1": (16, 16), "layer4.0.bn1": (8, 8), "layer4": (4, 4)}
    assert c.layers == list(c.grids)
    blocks = choose(net, torch.zeros(1, 1, 64, 64), block_outputs=True)
    assert blocks.grids == {"layer2": (16, 16), "layer3": (8, 8), "layer4": (4, 4)}


def test_resnet18_2d_fuses_layer2_to_layer4():
    # MONAI's ResNet keeps the stem at stride 1 (conv1_t_stride=1), max-pool -> 1/2, layer2 ->
    # 1/4, layer3 -> 1/8, layer4 -> 1/16: at 96^2 layer2 is 24^2 and layer4 6^2.
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3)
    c = choose(net, torch.zeros(1, 1, 96, 96))
    assert c.layers == ["layer2", "layer3", "layer4"]
    assert c.grids == {"layer2": (24, 24), "layer3": (12, 12), "layer4": (6, 6)}


def test_segmenters_explain_their_last_feature_layer_alone():
    unet = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    c = choose(unet, torch.zeros(1, 1, 32, 32, 32))
    # model.2 is the head (output-shaped); model.1 (skip connection, 16^3) feeds it
    assert c.layers == ["model.1"] and c.fusion is None
    assert "already at least 1/4" in c.rule
    swin = SwinUNETR(
        in_channels=1,
        out_channels=2,
        feature_size=12,
        spatial_dims=3,
        depths=(1, 1, 1, 1),
        norm_name="batch",
    )
    c = choose(swin, torch.zeros(1, 1, 32, 32, 32))
    # decoder1 (full resolution) feeds the output block "out"
    assert c.layers == ["decoder1"] and c.grids["decoder1"] == (32, 32, 32)


def test_min_fraction_is_checked_per_axis():
    # anisotropic input 64x64x8: the z axis limits the fine layer (1/4 of 8 = 2)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.MaxPool3d(2),  # 32x32x4
        nn.Conv3d(4, 4, 3, padding=1),
        nn.MaxPool3d(2),  # 16x16x2
        nn.Conv3d(4, 4, 3, padding=1),
        nn.MaxPool3d((2, 2, 1)),  # 8x8x2
        nn.Conv3d(4, 4, 3, padding=1),
        nn.MaxPool3d((2, 2, 1)),  # 4x4x2
        nn.Conv3d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    c = choose(net, torch.zeros(1, 1, 64, 64, 8))
    # the conv "4" (16x16x2) is the deepest with >= 16 in-plane and >= 2 through-plane; "6"
    # (8x8x2) has the z extent but not the in-plane one: it is the stage between
    assert c.grids == {"4": (16, 16, 2), "6": (8, 8, 2), "8": (4, 4, 2)}
    assert c.layers == ["4", "6", "8"]
    # the window's lower bound is per axis too: "6" (8x8x2) is 1/8 in-plane, "8" is not
    c = choose(net, torch.zeros(1, 1, 64, 64, 8), coarsest=Fraction(1, 8))
    assert c.layers == ["4", "6"]
    c = choose(net, torch.zeros(1, 1, 64, 64, 8), min_fraction=0.5, fusion=None)
    assert c.layers == ["2"] and c.fusion is None and "8 (4x4x2) is coarser" in c.rule


def test_no_fine_layer_and_no_candidate():
    coarse = nn.Sequential(nn.Conv2d(1, 3, 8, stride=8), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    c = choose(coarse, torch.zeros(1, 1, 32, 32))  # 4x4 = 1/8 at best
    assert c.layers == ["1"] and "every feature grid is coarser" in c.rule
    flat = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(medcam.LayerError, match="no layer with a spatial feature-map"):
        choose(flat, torch.zeros(1, 1, 4, 4))


def test_explain_records_the_choice_and_fuses():
    # random weights and inputs, seeded: the known answer below needs every single-layer map
    # to have positive evidence (an all-zero map is left out of the product)
    torch.manual_seed(0)
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3).eval()
    x = torch.randn(2, 1, 64, 64)
    result = medcam.explain(net, x)
    names = ["layer2", "layer3", "layer4"]
    assert result.layers == names and result.fusion == "product"
    meta = result.metadata()
    assert meta["layers_chosen_by"].startswith("auto: product fusion of")
    assert "layer2 (16x16), layer3 (8x8), layer4 (4x4)" in meta["layers_chosen_by"]
    # the fused map is the geometric mean of the peak-scaled single-layer maps
    single = [medcam.explain(net, x, layers=n).heatmap for n in names]
    assert all(bool((m.flatten(2).amax(2) > 0).all()) for m in single)  # (else left out)
    scaled = [m / m.flatten(2).amax(2)[..., None, None] for m in single]
    expected = (scaled[0] * scaled[1] * scaled[2]) ** (1 / 3)
    torch.testing.assert_close(result.heatmap, expected, rtol=1e-4, atol=1e-6)
    json.dumps(meta)  # JSON-able


def test_last_keeps_the_old_default_and_user_fusion_wins():
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3).eval()
    x = torch.randn(1, 1, 64, 64)
    last = medcam.explain(net, x, layers="last")
    assert last.layers == ["layer4"] and last.fusion is None
    assert last.metadata()["layers_chosen_by"] == "last: the deepest feature layer layer4 (4x4)"
    assert medcam.explain(net, x, layers="auto", fusion="mean").fusion == "mean"
    assert medcam.explain(net, x, layers="layer3").metadata()["layers_chosen_by"] == "user"
    with pytest.raises(medcam.LayerError, match="'last' cannot be combined"):
        medcam.Explainer(net, ["last", "layer3"])


def test_a_module_named_last_is_a_layer_name():
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 2, 3, padding=1))
    net.add_module("last", nn.Conv2d(2, 2, 3, stride=2, padding=1))
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    result = medcam.explain(net, torch.randn(1, 1, 8, 8), 0, layers="last")
    assert result.layers == ["last"] and result.metadata()["layers_chosen_by"] == "user"


def test_every_entry_point_has_the_same_default():
    from medcam import cli
    from medcam.bundle import CAMHandler
    from medcam.pipeline import ExplainSettings
    from medcam.runner import cohort_processor, explain_inputs, load_timepoints

    config = json.loads((ROOT / "configs" / "medcam.json").read_text())["medcam"]
    assert config.get("fusion") is None  # the rule's own fusion
    functions = [
        medcam.Explainer,
        medcam.explain,
        medcam.explain_scan,
        CAMHandler,
        explain_inputs,
        load_timepoints,
        cohort_processor,
        ExplainSettings,
    ]
    commands = [cli.explain, cli.compare, cli.cohort_run, cli.listen]
    for param in ("layers", "method"):
        defaults = {inspect.signature(f).parameters[param].default for f in functions}
        for command in commands:
            value = next(p.default for p in command.params if p.name == param)
            defaults.add(value[0] if isinstance(value, (list, tuple)) else value)
        assert defaults == {config[param]} == {"auto"}, param


def test_auto_method_follows_the_output():
    seg = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    result = medcam.explain(seg, x, medcam.SegmentationTarget(1, mask=torch.ones(16, 16, 16)))
    assert result.method == "layercam"
    assert result.metadata()["method_chosen_by"].startswith("auto: segmentation output")
    # the same maps as asking for LayerCAM by name
    named = medcam.explain(
        seg, x, medcam.SegmentationTarget(1, mask=torch.ones(16, 16, 16)), method="layercam"
    )
    torch.testing.assert_close(result.heatmap, named.heatmap)
    assert named.metadata()["method_chosen_by"] == "user"
    clf = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3).eval()
    result = medcam.explain(clf, torch.randn(2, 1, 32, 32))
    assert result.method == "gradcam"
    assert result.metadata()["method_chosen_by"] == "auto: classifier output (B, classes): Grad-CAM"


def test_layers_command_shows_the_default_and_why():
    from medcam.cli import main

    bundle = ROOT / "examples" / "bundles"
    result = CliRunner().invoke(main, ["layers", "--bundle", str(bundle / "classify3d")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    marked = [ln.split()[0] for ln in lines if ln.endswith("<- default")]
    assert marked == ["features.transition1.conv", "class_layers.relu"]
    summary = next(ln for ln in lines if ln.startswith("default (--layer auto)"))
    assert "features.transition1.conv + class_layers.relu, product fusion" in summary
    why = next(ln for ln in lines if ln.strip().startswith("why:"))
    assert "(6x6x6)" in why and "(12x12x12)" in why
    assert "method (--method auto): classifier output" in result.output
    seg = CliRunner().invoke(main, ["layers", "--bundle", str(bundle / "segment3d")])
    assert "default (--layer auto) for input (1, 48, 48, 48): model.1\n" in seg.output
    assert "method (--method auto): segmentation output (B, C, *spatial): LayerCAM" in seg.output


def test_sliding_windows_resolve_the_auto_method():
    from medcam.engine import explain_sliding_window

    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    x = torch.randn(1, 1, 24, 24, 24)
    auto = explain_sliding_window(medcam.Explainer(net), x, (16, 16, 16), 1)
    named = explain_sliding_window(medcam.Explainer(net, method="layercam"), x, (16, 16, 16), 1)
    assert auto.method == "layercam" and auto.extra["sliding_window"]["windows"] > 1
    meta = auto.metadata()
    assert meta["method_chosen_by"].startswith("auto: segmentation output")
    assert meta["layers_chosen_by"].startswith("auto: ") and auto.layers == ["model.1"]
    torch.testing.assert_close(auto.heatmap, named.heatmap)


class _FlattenHead(nn.Module):
    """2x2 average pooling as a stride-2 conv, then ``flatten + linear`` on the 4x4 grid: the
    class-1 weight is 1 on cell ``lesion`` and 0.1 on every other cell."""

    def __init__(self, lesion: int, functional_flatten: bool = False):
        super().__init__()
        self.features = nn.Conv2d(1, 1, 2, stride=2, bias=False)
        self.fc = nn.Linear(16, 2, bias=False)
        self.functional_flatten = functional_flatten
        with torch.no_grad():
            self.features.weight.fill_(0.25)
            self.fc.weight.zero_()
            self.fc.weight[1] = 0.1
            self.fc.weight[1, lesion] = 1.0
        self.flatten = nn.Flatten()

    def forward(self, x):
        a = self.features(x)
        return self.fc(a.reshape(len(a), -1) if self.functional_flatten else self.flatten(a))


@pytest.mark.parametrize("functional_flatten", [False, True])
def test_a_flatten_linear_head_gets_hirescam(functional_flatten):
    # Known answer: on the 4x4 feature grid A (the input averaged over 2x2 cells) the score is
    # sum(W * A) with W = 1 on the lesion cell and 0.1 elsewhere, and a brighter distractor
    # sits elsewhere. Each cell's share of the score is W * A, largest on the lesion (1 * 1 vs
    # 0.1 * 3); Grad-CAM's weight is mean(W), so its map is A itself and peaks on the
    # distractor.
    lesion, distractor = 5, 14  # cells (1, 1) and (3, 2)
    net = _FlattenHead(lesion, functional_flatten).eval()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2:4, 2:4] = 1.0
    x[0, 0, 6:8, 4:6] = 3.0
    auto = medcam.explain(net, x, 1, upsample_to_input=False)
    assert auto.method == "hirescam"
    why = auto.metadata()["method_chosen_by"]
    assert why.startswith("auto: classifier output") and "fc reads the flattened" in why
    share = (net.fc.weight[1].reshape(4, 4) * net.features(x)[0, 0]).detach()
    torch.testing.assert_close(auto.raw["features"][0, 0], share.clamp_min(0))
    assert int(auto.raw["features"][0, 0].flatten().argmax()) == lesion
    gradcam = medcam.explain(net, x, 1, method="gradcam", upsample_to_input=False)
    assert int(gradcam.raw["features"][0, 0].flatten().argmax()) == distractor
    # named layers with method="auto": the head decides the method, not the layer choice
    named = medcam.explain(net, x, 1, layers="features", upsample_to_input=False)
    assert named.method == "hirescam"
    torch.testing.assert_close(named.raw["features"], auto.raw["features"])


class _PoolThenMLP(nn.Module):  # global pooling, then two linear layers
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.fc1(self.conv(x).mean(dim=(2, 3))))


class _ConvHead(nn.Module):  # no linear layer: 1x1 conv, then mean over the grid
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x)).mean(dim=(2, 3))


class _SizeCoincidence(nn.Module):
    """A (B, 4, 4, 4) map (64 values) and a linear layer of 64 inputs that reads something
    else: a 64-channel 1x1 conv of the map, globally pooled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=4, padding=1)
        self.mix = nn.Conv2d(4, 64, 1)
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(self.mix(self.conv(x)).mean(dim=(2, 3)))


class _VGGish(nn.Module):  # pooling to 4x4 (not global), flatten, a two-layer MLP
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class _TwoHeads(nn.Module):
    """Returns (pooled logits, logits of a flatten + linear auxiliary head run first)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=4, padding=1)
        self.aux, self.fc = nn.Linear(64, 2), nn.Linear(4, 2)

    def forward(self, x):
        a = self.conv(x)
        return self.fc(a.mean(dim=(2, 3))), self.aux(a.flatten(1))


def test_heads_with_global_pooling_keep_gradcam():
    from medcam.engine.auto import FlattenedHead

    x = torch.randn(2, 1, 16, 16)
    nets = (_PoolThenMLP(), _ConvHead(), _SizeCoincidence(),
            resnet18(spatial_dims=2, n_input_channels=1, num_classes=3))  # fmt: skip
    for net in nets:
        with FlattenedHead(net) as head, torch.no_grad():
            net.eval()(x)
        assert head.found is None, type(net).__name__
        assert medcam.explain(net, x).method == "gradcam", type(net).__name__
    # the probe left no hook behind
    assert all(not m._forward_pre_hooks for n in nets for m in n.modules())
    # several outputs: the flattening linear layer seen feeds the other one; not trusted
    assert medcam.explain(_TwoHeads(), x, 1, output=0).method == "gradcam"


def test_a_vgg_style_head_gets_hirescam_and_calibration_agrees():
    x = torch.randn(2, 1, 16, 16)
    net = _VGGish().eval()
    result = medcam.explain(net, x, 1)
    assert result.method == "hirescam"
    assert "classifier.0 reads the flattened" in result.metadata()["method_chosen_by"]
    with torch.inference_mode():  # a caller in inference mode gets the same choice
        assert medcam.explain(net, x, 1).method == "hirescam"
    # calibration's "default" candidate is what method="auto" gives
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True
    cal = medcam.calibrate_layers(net, torch.randn(4, 1, 16, 16), masks, 1)
    assert cal.default.method == "hirescam"


def test_monai_classifier_gets_hirescam_in_explain_and_layers():
    from click.testing import CliRunner

    from medcam.cli import main
    from tests.helpers import flatten_classifier

    net = flatten_classifier().eval()
    x = torch.randn(2, 1, 32, 32, 32)
    result = medcam.explain(net, x, 1)
    assert (
        result.method == "hirescam"
        and "final.1 reads the flattened" in (result.metadata()["method_chosen_by"])
    )
    torch.testing.assert_close(result.heatmap, medcam.explain(net, x, 1, method="hirescam").heatmap)
    out = CliRunner().invoke(main, ["layers", "--model", "tests.helpers:flatten_classifier",
                                    "--input-size", "32,32,32"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "method (--method auto): classifier output (B, classes) whose final.1" in out.output


def test_a_non_spatial_output_is_not_a_segmentation():
    # MONAI's Regressor with out_shape (2, 3): a (B, 2, 3) output for a 2D input is no map of
    # the input's grid; its flatten + linear head gets HiResCAM like a classifier's would
    from monai.networks.nets import Regressor

    torch.manual_seed(0)
    net = Regressor((1, 16, 16), (2, 3), channels=(4, 8), strides=(2, 2)).eval()
    x = torch.randn(2, 1, 16, 16)
    result = medcam.explain(net, x, lambda out: out.flatten(1)[:, :1])
    assert result.method == "hirescam"
    why = result.metadata()["method_chosen_by"]
    assert "output (B, 2, 3), not a map of the input's grid" in why and "final.1" in why
    # a (B, C, H, W) output for the same 2D input is a segmentation
    seg = UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    target = medcam.SegmentationTarget(1, mask=torch.ones(16, 16))
    assert medcam.explain(seg, x, target).method == "layercam"


class _LocaliserFirst(nn.Module):
    """A spatial-transformer-like localiser (conv, flatten, linear) before a pooled body."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Conv2d(1, 2, 3, stride=4, padding=1)
        self.loc_fc = nn.Linear(32, 1)
        self.body = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        gain = torch.sigmoid(self.loc_fc(self.loc(x).flatten(1)))[:, :, None, None]
        return self.fc(self.body(x * gain).mean(dim=(2, 3)))


class _ImageShortcut(nn.Module):
    """A pooled head plus a linear layer on the flattened input image itself."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc, self.thumb = nn.Linear(4, 2), nn.Linear(256, 2)

    def forward(self, x):
        return self.fc(self.body(x).mean(dim=(2, 3))) + self.thumb(x.flatten(1))


def test_only_a_head_after_the_explained_layers_counts():
    x = torch.randn(2, 1, 16, 16)
    for net in (_LocaliserFirst().eval(), _ImageShortcut().eval()):
        result = medcam.explain(net, x, 1, layers="body")
        assert result.method == "gradcam", type(net).__name__
        assert "flattened" not in result.metadata()["method_chosen_by"]


def test_several_outputs_keep_gradcam_and_say_why():
    x = torch.randn(2, 1, 16, 16)
    why = medcam.explain(_TwoHeads(), x, 1, output=0).metadata()["method_chosen_by"]
    assert why.startswith("auto: classifier output (B, classes): Grad-CAM; aux reads a flattened")
    assert "name method='hirescam'" in why


def test_class_targets_need_a_class_or_map_output():
    from monai.networks.nets import Regressor

    net = Regressor((1, 16, 16), (2, 3), channels=(4, 8), strides=(2, 2)).eval()
    x = torch.randn(2, 1, 16, 16)
    for target in ("pred", 0, medcam.SegmentationTarget(1)):
        with pytest.raises(medcam.TargetError, match=r"output \(2, 2, 3\) is neither"):
            medcam.explain(net, x, target)


def test_a_vit_classifier_says_its_token_layers_were_left_out():
    from monai.networks.nets import ViT

    net = ViT(1, (16, 16), (4, 4), hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2,
              classification=True, num_classes=2, spatial_dims=2).eval()  # fmt: skip
    result = medcam.explain(net, torch.randn(2, 1, 16, 16), 1, output=0)
    why = result.metadata()["layers_chosen_by"]
    assert result.layers == ["patch_embedding.patch_embeddings"]
    assert why.endswith("explained by default: name one to explain them (e.g. blocks.1.norm1)")
    # and a named token layer works (pytorch-grad-cam's choice for a ViT)
    named = medcam.explain(net, torch.randn(2, 1, 16, 16), 1, output=0, layers="blocks.1.norm1")
    assert named.heatmap.shape == (2, 1, 16, 16)
