"""Models that take more than the image: several inputs, keyword arguments; and at="input"."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import medcam
from tests.conftest import SmallCNN, count_hooks
from tests.engine.reference import captum_attr


class ImageClinicalNet(nn.Module):
    """CNN features of the image, pooled, gated by and concatenated with a clinical vector.

    ``forward(image, clinical, *, scale=1.0)``: ``scale`` multiplies the clinical vector.
    """

    def __init__(self, dims: int = 2, clinical: int = 3, classes: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.features = nn.Sequential(
            conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, 5, 3, stride=2, padding=1), nn.ReLU()
        )
        self.gate = nn.Linear(clinical, 5)
        self.head = nn.Linear(5 + clinical, classes)

    def forward(self, image, clinical, *, scale: float = 1.0):
        c = clinical * scale
        f = self.features(image).flatten(2).mean(dim=2) * torch.sigmoid(self.gate(c))
        return self.head(torch.cat([f, c], dim=1))


class ClinicalFirst(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, clinical, image):
        return self.net(image, clinical)


class Bound(nn.Module):
    """The same network with its other inputs fixed: what forward_kwargs / extra inputs mean."""

    def __init__(self, net: nn.Module, *args, **kwargs) -> None:
        super().__init__()
        self.net, self.args, self.kwargs = net, args, kwargs

    def forward(self, image):  # a batch of copies of one sample shares its fixed inputs
        args = [a.expand(len(image), *a.shape[1:]) for a in self.args]
        return self.net(image, *args, **self.kwargs)


@pytest.fixture
def clinical_net():
    torch.manual_seed(0)
    return ImageClinicalNet().eval(), torch.randn(2, 1, 10, 12), torch.randn(2, 3)


def test_extra_input_matches_captum_additional_forward_args(clinical_net):
    attr = captum_attr()
    net, x, clin = clinical_net
    layer = "features.3"
    ours = medcam.explain(net, (x, clin), [0, 1], layers=layer)
    theirs = attr.LayerGradCam(net, net.features[3]).attribute(
        x, target=[0, 1], additional_forward_args=(clin,), relu_attributions=True
    )
    torch.testing.assert_close(ours.raw[layer], theirs.detach(), rtol=1e-4, atol=1e-7)
    assert ours.heatmap.shape == (2, 1, 10, 12)
    assert ours.metadata()["inputs"] == 2 and ours.metadata()["input_index"] == 0
    # the explained input need not come first
    swapped = medcam.explain(ClinicalFirst(net), (clin, x), [0, 1], layers="net.features.3",
                             input_index=1)  # fmt: skip
    torch.testing.assert_close(swapped.raw["net.features.3"], ours.raw[layer])
    assert count_hooks(net) == 0


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam"])
def test_forward_kwargs_and_extra_inputs_equal_a_bound_model(clinical_net, method):
    """Per-sample tensors (first dim = B) follow their sample, also in the perturbation methods'
    batches of perturbed copies; other values pass as they are."""
    net, x, clin = clinical_net
    layer = "features.1"
    ours = medcam.explain(net, (x, clin), "all", layers=layer, method=method,
                          forward_kwargs={"scale": 2.0}, perturbations_per_eval=3)  # fmt: skip
    assert ours.metadata()["forward_kwargs"] == ["scale"]
    for b in range(2):
        bound = Bound(net, clin[b : b + 1], scale=2.0)
        alone = medcam.explain(bound, x[b : b + 1], "all", layers=f"net.{layer}", method=method)
        torch.testing.assert_close(ours.raw[layer][b], alone.raw[f"net.{layer}"][0])
    # and the clinical vector matters: another one gives another map
    other = medcam.explain(net, (x, clin.flip(0) * 3), "all", layers=layer, method=method,
                           forward_kwargs={"scale": 2.0})  # fmt: skip
    assert not torch.allclose(other.raw[layer], ours.raw[layer])


def test_auto_layer_and_list_layers_with_extra_inputs(clinical_net):
    net, x, clin = clinical_net
    infos = medcam.list_layers(net, (x, clin), forward_kwargs={"scale": 1.0})
    assert {i.name: i for i in infos}["features.3"].feature_shape == (5, 6)
    result = medcam.explain(net, (x, clin), "pred")
    assert result.feature_shapes[result.layers[0]] == (5, 6)


def test_inputs_are_not_modified(clinical_net):
    net, x, clin = clinical_net
    x0, c0 = x.clone(), clin.clone()
    medcam.explain(net, (x, clin), "all", layers="features.1", method="scorecam")
    assert torch.equal(x, x0) and torch.equal(clin, c0)


def test_bad_extra_inputs_are_refused(clinical_net):
    net, x, clin = clinical_net
    with pytest.raises(medcam.InputError, match="input_index"):
        medcam.explain(net, (x, clin), 0, layers="features.1", input_index=2)
    with pytest.raises(medcam.InputError, match="forward_kwargs"):
        medcam.explain(net, (x, clin), 0, layers="features.1", forward_kwargs=[1.0])
    bad = clin.clone()
    bad[1, 0] = float("nan")  # only the explained image is checked up front; the scores then
    with pytest.raises(medcam.ModelError, match=r"sample\(s\) \[1\]"):
        medcam.explain(net, (x, bad), 0, layers="features.1")
    assert count_hooks(net) == 0


# ------------------------------------------------------------------------------- at="input"


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam", "ablationcam"])
def test_layer_input_is_the_previous_layer_output(small_cnn, method):
    """features.5 (ReLU) receives features.4's (conv) output: explaining one's input is
    explaining the other's output."""
    net, x = small_cnn
    at_input = medcam.explain(net, x, "all", layers="features.5", at="input", method=method)
    output = medcam.explain(net, x, "all", layers="features.4", method=method)
    torch.testing.assert_close(at_input.raw["features.5"], output.raw["features.4"])
    assert at_input.metadata()["at"] == {"features.5": "input"}
    assert count_hooks(net) == 0


def test_at_per_layer():
    """A head whose input is the last feature map (Captum's attribute_to_layer_input case)."""
    torch.manual_seed(0)
    net = SmallCNN(spatial_dims=2).eval()
    x = torch.randn(2, 2, 12, 10)
    both = medcam.explain(net, x, 1, layers=["features.4", "pool"], at={"pool": "input"})
    assert both.metadata()["at"] == {"features.4": "output", "pool": "input"}
    alone = medcam.explain(net, x, 1, layers="features.5")
    torch.testing.assert_close(both.raw["pool"], alone.raw["features.5"])
    listed = medcam.explain(net, x, 1, layers=["features.4", "pool"], at=["output", "input"])
    torch.testing.assert_close(listed.raw["pool"], both.raw["pool"])
    with pytest.raises(medcam.MedcamError, match="'inside'"):
        medcam.Explainer(net, "pool", at="inside")
    with pytest.raises(medcam.MedcamError, match="one entry per named layer"):
        medcam.Explainer(net, ["pool"], at=["input", "output"])
    with pytest.raises(medcam.LayerError, match="not among layers"):
        medcam.Explainer(net, ["pool"], at={"features.1": "input"})


# --------------------------------------------------- explain_scan and the bundle handler


@pytest.fixture
def clinical_scan(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(12, 10, 8)).astype(np.float32), np.eye(4)), path)
    torch.manual_seed(0)
    return ImageClinicalNet(dims=3).eval(), path, torch.randn(3)


def test_explain_scan_passes_extra_inputs_and_kwargs(clinical_scan):
    net, path, clin = clinical_scan
    ours = medcam.explain_scan(net, path, target=1, layers="features.3", extra_inputs=[clin],
                               forward_kwargs={"scale": 0.5})  # fmt: skip
    bound = Bound(net, clin[None], scale=0.5)
    theirs = medcam.explain_scan(bound, path, target=1, layers="net.features.3")
    torch.testing.assert_close(ours.heatmap, theirs.heatmap)
    assert ours.cam.metadata()["forward_kwargs"] == ["scale"]


def test_bundle_handler_passes_extra_keys_and_kwargs(clinical_scan, tmp_path):
    import json

    import nibabel as nib
    from monai.transforms import LoadImage

    from medcam.bundle import CAMHandler

    net, path, clin = clinical_scan
    image = LoadImage(ensure_channel_first=True, image_only=True)(str(path))
    engine = SimpleNamespace(  # what the handler reads from a MONAI evaluator
        network=net,
        state=SimpleNamespace(batch=[{"image": image, "clinical": clin}]),
        data_loader=SimpleNamespace(dataset=SimpleNamespace(transform=None)),
    )
    handler = CAMHandler(tmp_path / "out", layers="features.3", target=1,
                         formats=["nifti", "json"], extra_keys=["clinical"],
                         forward_kwargs={"scale": 0.5})  # fmt: skip
    handler(engine)
    expected = medcam.explain_scan(Bound(net, clin[None], scale=0.5), path, target=1,
                                   layers="net.features.3")  # fmt: skip
    sidecar = json.loads(next(p for p in handler.written if p.suffix == ".json").read_text())
    explanation = sidecar["explanation"]
    assert explanation["inputs"] == 2 and explanation["forward_kwargs"] == ["scale"]
    np.testing.assert_allclose(explanation["scores"], expected.cam.scores.tolist(), rtol=1e-5)
    heatmap = nib.load(next(p for p in handler.written if p.suffix == ".gz")).get_fdata()
    np.testing.assert_allclose(heatmap, expected.heatmap[0].numpy(), rtol=1e-5, atol=1e-7)
