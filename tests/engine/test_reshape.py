"""Token and channel-last layers: MONAI ViT (2D, 3D, with and without a class token), UNETR and
SwinUNETR, small configurations. Maps are checked against pytorch-grad-cam with its own
``reshape_transform`` and against hand-made reshapes."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR, ViT
from torch import nn

import medcam
from tests.conftest import count_hooks
from tests.engine.reference import pytorch_grad_cam


def _vit(dims: int, classification: bool = True) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    size, patch = ((32, 24), (8, 6)) if dims == 2 else ((16, 16, 8), (4, 4, 4))
    net = ViT(
        in_channels=1, img_size=size, patch_size=patch, hidden_size=24, mlp_dim=48,
        num_layers=2, num_heads=2, spatial_dims=dims, classification=classification,
        num_classes=3,
    ).eval()  # fmt: skip
    return net, torch.randn(2, 1, *size)


class Logits(nn.Module):
    """MONAI's ViT returns (logits, hidden states); pytorch-grad-cam needs the logits alone."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[0]


def _pgc_gradcam_raw(net, layer, x, targets, reshape):
    """pytorch-grad-cam's raw Grad-CAM (ReLU of get_cam_image) with its reshape_transform."""
    pgc = pytorch_grad_cam()
    net = copy.deepcopy(net)
    module = dict(net.named_modules())[layer]
    with pgc.GradCAM(net, [module], reshape_transform=reshape) as cam:
        cam(x, targets)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        return np.maximum(cam.get_cam_image(x, module, targets, acts, grads, False), 0)


def _close(ours: torch.Tensor, theirs: np.ndarray) -> None:
    scale = float(np.abs(theirs).max())
    assert scale > 0
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4, atol=1e-5 * scale)


def test_vit_2d_class_token_matches_pytorch_grad_cam():
    pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

    net, x = _vit(2)
    layer = "blocks.1.norm1"  # the input of the last attention: pytorch-grad-cam's ViT advice
    result = medcam.explain(net, x, "all", layers=layer, output=0)
    assert result.feature_shapes[layer] == (4, 4)
    assert result.heatmap.shape == (2, 3, 32, 24)
    record = result.metadata()["layouts"][layer]
    assert record["layout"] == "tokens" and record["grid"] == [4, 4]
    assert record["prefix_tokens"] == 1 and "patch_embedding" in record["source"]
    reshape = partial(vit_reshape_transform, height=4, width=4)  # the library's own
    for cls in range(3):
        theirs = _pgc_gradcam_raw(
            Logits(net), f"vit.{layer}", x, [ClassifierOutputTarget(cls)] * 2, reshape
        )
        _close(result.raw[layer][:, cls], theirs)
    # the same callable as reshape= gives the same maps
    same = medcam.explain(net, x, "all", layers=layer, output=0, reshape=reshape)
    torch.testing.assert_close(same.raw[layer], result.raw[layer])
    assert same.metadata()["layouts"][layer]["layout"] == "callable"
    assert count_hooks(net) == 0


def test_vit_3d_class_token_matches_hand_reshape():
    net, x = _vit(3)
    layer = "blocks.0"
    result = medcam.explain(net, x, [0, 2], layers=layer, output=0, method="layercam")
    assert result.feature_shapes[layer] == (4, 4, 2)

    def by_hand(t: torch.Tensor) -> torch.Tensor:  # drop the class token, tokens -> grid
        return t[:, 1:].reshape(t.shape[0], 4, 4, 2, t.shape[-1]).permute(0, 4, 1, 2, 3)

    explicit = medcam.engine.tokens((4, 4, 2), prefix_tokens=1)
    for spec in (by_hand, explicit):
        other = medcam.explain(net, x, [0, 2], layers=layer, output=0, method="layercam",
                               reshape={layer: spec})  # fmt: skip
        torch.testing.assert_close(other.raw[layer], result.raw[layer])
    assert float(result.raw[layer].max()) > 0


def test_vit_3d_without_class_token():
    net, x = _vit(3, classification=False)  # output: (tokens (B, 32, C), hidden states)

    def score(tokens: torch.Tensor) -> torch.Tensor:  # a callable target on the token output
        return tokens[:, :, :4].sum(dim=(1, 2))

    result = medcam.explain(net, x, score, layers="blocks.0", output=0)
    record = result.metadata()["layouts"]["blocks.0"]
    assert record["prefix_tokens"] == 0 and record["grid"] == [4, 4, 2]
    assert float(result.raw["blocks.0"].max()) > 0


def test_class_token_only_gradient_is_refused():
    """After the last block only the class token reaches the classification head: every patch
    token's gradient is zero, so the map would be zero; medcam says so instead."""
    net, x = _vit(2)
    with pytest.raises(medcam.LayerError, match=r"class token.*norm1"):
        medcam.explain(net, x, 0, layers="blocks.1", output=0)
    assert count_hooks(net) == 0


@pytest.mark.slow
def test_unetr_tokens_match_pytorch_grad_cam():
    pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    torch.manual_seed(0)
    net = UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=4,
                hidden_size=24, mlp_dim=48, num_heads=2).eval()  # fmt: skip
    x = torch.randn(1, 1, 32, 32, 32)
    mask = torch.zeros(32, 32, 32)
    mask[8:24, 4:20, 10:30] = 1
    layer = "vit.blocks.9"
    target = medcam.SegmentationTarget(1, mask=mask)
    result = medcam.explain(net, x, target, layers=layer, method="gradcam")
    record = result.metadata()["layouts"][layer]
    assert record["grid"] == [2, 2, 2] and record["prefix_tokens"] == 0

    def reshape(t: torch.Tensor) -> torch.Tensor:  # UNETR's own proj_feat, as a user writes it
        return t.reshape(t.shape[0], 2, 2, 2, t.shape[-1]).permute(0, 4, 1, 2, 3)

    theirs = _pgc_gradcam_raw(net, layer, x, [SemanticSegmentationTarget(1, mask.numpy())], reshape)
    _close(result.raw[layer][:, 0], theirs)


def _swin() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1),
                    num_heads=(1, 1, 2, 2), spatial_dims=3).eval()  # fmt: skip
    return net, torch.randn(1, 1, 64, 32, 32)  # 32^3 leaves 1 voxel for the bottom InstanceNorm


@pytest.mark.slow
def test_swin_unetr_channel_last_blocks_match_pytorch_grad_cam():
    pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    net, x = _swin()
    infos = {i.name: i for i in medcam.list_layers(net, x)}
    block = infos["swinViT.layers2.0.blocks.0"]
    assert block.output_shape == (1, 16, 8, 8, 24)
    assert (block.layout, block.grid, block.feature_shape) == ("channels_last", (16, 8, 8),
                                                               (16, 8, 8))  # fmt: skip
    stage = infos["swinViT.layers2.0"]  # MONAI rearranges the stage output back to channels first
    assert (stage.layout, stage.grid) == ("channels_first", (8, 4, 4))
    mask = torch.zeros(64, 32, 32)
    mask[20:50, 8:28, 10:22] = 1
    target = medcam.SegmentationTarget(1, mask=mask)
    layer = "swinViT.layers2.0.blocks.0"
    result = medcam.explain(net, x, target, layers=layer, method="gradcam")
    assert result.feature_shapes[layer] == (16, 8, 8)
    theirs = _pgc_gradcam_raw(
        net, layer, x, [SemanticSegmentationTarget(1, mask.numpy())], lambda t: t.movedim(-1, 1)
    )
    _close(result.raw[layer][:, 0], theirs)


def test_list_layers_shows_token_layers_with_their_grid():
    net, x = _vit(2)
    infos = {i.name: i for i in medcam.list_layers(net, x)}
    blk = infos["blocks.0"]
    assert blk.output_shape == (2, 17, 24)
    assert (blk.layout, blk.grid, blk.prefix_tokens) == ("tokens", (4, 4), 1)
    assert blk.is_token_layer and not blk.is_candidate and blk.feature_shape is None
    conv = infos["patch_embedding.patch_embeddings"]
    assert conv.layout == "channels_first" and conv.is_candidate and conv.grid == (4, 4)
    head = infos["classification_head.0"]
    assert head.layout is None and not head.is_token_layer


def test_token_grid_from_token_count_for_models_that_do_not_tell():
    """A plain-torch ViT-like model: no patch_size attribute; 1 + 6*4 tokens on a 24x16 input
    fit exactly one uniform patch size (4) with a class token."""

    class TinyTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(1, 8, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.block = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
            t = torch.tanh(self.block(t))
            return self.head(t.mean(dim=1))

    torch.manual_seed(0)
    net = TinyTokens().eval()
    x = torch.randn(2, 1, 24, 16)
    result = medcam.explain(net, x, 1, layers="block")
    record = result.metadata()["layouts"]["block"]
    assert record["grid"] == [6, 4] and record["prefix_tokens"] == 1
    assert "uniform patch 4" in record["source"]
    # it equals the map of the conv embedding's output where nothing mixes the tokens: check
    # instead against an explicit layout
    explicit = medcam.explain(net, x, 1, layers="block",
                              reshape=medcam.engine.tokens((6, 4), prefix_tokens=1))  # fmt: skip
    torch.testing.assert_close(explicit.raw["block"], result.raw["block"])


def test_unreadable_token_layer_asks_for_reshape():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = x.flatten(2)[:, :, :7].transpose(1, 2)  # 7 "tokens": no grid fits
            return self.proj(t).mean(dim=1)

    with pytest.raises(medcam.LayerError, match=r"neither a feature map.*reshape="):
        medcam.explain(Odd(), torch.randn(1, 3, 8, 8), 0, layers="proj")


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("batch", [2, 3])  # 3: as many as the stacked queries, keys, values
def test_attention_internals_are_not_feature_maps(dims, batch):
    # MONAI's SABlock makes (B, heads, N, N) attention weights and stacked (3, B, heads, N, d)
    # queries/keys/values; shaped like 2D/3D maps, they once became the default layer (a
    # 17x17 "grid" of token pairs, or a heatmap with 3 samples for 2 inputs).
    net, x = _vit(dims)
    x = torch.randn(batch, *x.shape[1:])
    infos = medcam.list_layers(net, x)
    inside = [i for i in infos if ".attn." in i.name and len(i.output_shape or ()) >= 4]
    assert inside and all(i.not_a_map and not i.is_candidate for i in inside)
    assert "patch_embedding.patch_embeddings" in [i.name for i in infos if i.is_candidate]
    result = medcam.explain(net, x, 1, output=0)
    assert result.heatmap.shape == (batch, 1, *x.shape[2:])
    assert result.layers == ["patch_embedding.patch_embeddings"]
