"""The composed one-resample inverse against MONAI's own ``Invertd``, transform by transform.

Every case runs a dictionary preprocessing chain on an image, puts a map on the model grid,
inverts it with MONAI's ``Invertd`` (the reference) and with :func:`compose_inverse` +
:func:`resample_to_grid`, and compares them voxel by voxel on the scan grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    BorderPadd,
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    DivisiblePadd,
    Flipd,
    Invertd,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    Rotate90d,
    ScaleIntensityRanged,
    Spacingd,
)

from medcam.data.synthetic import rotation
from medcam.inverse import GridMap, compose_inverse, resample_to_grid

SHAPE = (46, 38, 21)


def _oblique_affine(spacing=(0.9, 0.7, 2.5)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation((12.0, -7.0, 25.0)) @ np.diag(spacing)
    a[:3, 3] = [30.0, -20.0, 10.0]
    return a


def _image(affine: np.ndarray, shape=SHAPE) -> MetaTensor:
    x = torch.zeros(1, *shape)
    x[:, 6 : shape[0] - 8, 4 : shape[1] - 6, 3 : shape[2] - 4] = 100.0  # a body, for cropping
    x += torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    return MetaTensor(x, affine=torch.as_tensor(affine))


def _model_map(shape, seed: int = 0, smooth: bool = False) -> torch.Tensor:
    if smooth:
        g = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
        m = np.sin(3 * g[0]) + np.cos(2 * g[1]) * g[-1] + 2
        return torch.as_tensor(m[None].astype(np.float32))
    return torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))


def _both(transforms, image, *, smooth=False, k: int = 1):
    """(MONAI Invertd's map, the composed inverse's map, the GridMap) on the scan grid."""
    pre = Compose(transforms)
    data = pre({"image": image})
    x = data["image"]
    cam = torch.cat([_model_map(x.shape[1:], seed=j, smooth=smooth) for j in range(k)])
    data["cam"] = MetaTensor(cam, affine=x.affine)
    reference = Invertd("cam", pre, orig_keys="image", nearest_interp=False)(data)["cam"]
    grid = compose_inverse(x, image.affine, image.shape[1:])
    assert isinstance(grid, GridMap), grid
    ours = resample_to_grid(cam, grid, image.shape[1:])
    return torch.as_tensor(reference).float(), ours, grid


KEYS = "image"


@pytest.mark.parametrize(
    "name, transforms",
    [
        ("oblique, anisotropic, padded", [
            Orientationd(KEYS, axcodes="RAS", labels=None), Spacingd(KEYS, pixdim=(3, 3, 3)),
            ScaleIntensityRanged(KEYS, 0, 100, 0, 1), ResizeWithPadOrCropd(KEYS, (20, 20, 24))]),
        ("oblique, cropped", [
            Orientationd(KEYS, axcodes="RAS", labels=None), Spacingd(KEYS, pixdim=(2, 2, 2)),
            ResizeWithPadOrCropd(KEYS, (12, 14, 20))]),
        ("to LPS, zero padding", [
            Orientationd(KEYS, axcodes="LPS", labels=None),
            Spacingd(KEYS, pixdim=(3, 2, 4), padding_mode="zeros"), DivisiblePadd(KEYS, 8)]),
        ("crop before resampling", [
            Orientationd(KEYS, axcodes="RAS", labels=None), Flipd(KEYS, spatial_axis=1),
            CropForegroundd(KEYS, source_key=KEYS, select_fn=lambda v: v > 50),
            Spacingd(KEYS, pixdim=(2, 2, 2)), CenterSpatialCropd(KEYS, (16, 12, 30))]),
        ("axis-aligned model grid (diagonal)", [
            Spacingd(KEYS, pixdim=(2.5, 2.5, 2.5), diagonal=True),
            ResizeWithPadOrCropd(KEYS, (24, 24, 24))]),
        ("no resampling", [
            Orientationd(KEYS, axcodes="RAS", labels=None),
            ResizeWithPadOrCropd(KEYS, (50, 30, 24))]),
    ],
)  # fmt: skip
def test_one_resample_chains_equal_monai_invertd(name, transforms):
    reference, ours, _ = _both(transforms, _image(_oblique_affine()), k=2)
    assert ours.shape == reference.shape == (2, *SHAPE)
    # one interpolation in both: the same numbers, voxel by voxel, edges and outside included
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=2e-5, rtol=0)
    assert reference.abs().max() > 0.5  # the map did land on the scan


def test_the_oblique_case_takes_the_general_sampler_and_the_aligned_one_the_separable():
    from medcam.inverse import _separable_axes

    image = _image(_oblique_affine())
    for diagonal, separable in ((True, False), (False, True)):
        pre = Compose([Spacingd(KEYS, pixdim=(2.5, 2.5, 2.5), diagonal=diagonal)])
        grid = compose_inverse(pre({"image": image})["image"], image.affine, SHAPE)
        assert (_separable_axes(grid.index_map, SHAPE) is not None) == separable


def test_two_resamplings_agree_within_interpolation():
    """Spacing then Resize: MONAI interpolates twice, the composed inverse once."""
    transforms = [Orientationd(KEYS, axcodes="RAS", labels=None), Spacingd(KEYS, pixdim=(2, 2, 3)),
                  Resized(KEYS, (32, 32, 16), mode="trilinear")]  # fmt: skip
    reference, ours, grid = _both(transforms, _image(_oblique_affine()), smooth=True)
    assert grid.transforms == ["Orientation", "SpatialResample", "Resize"]
    err = (ours - reference).abs()
    span = float(reference.max() - reference.min())
    assert float(err.max()) < 0.02 * span and float(err.mean()) < 0.002 * span
    r = np.corrcoef(ours.numpy().ravel(), reference.numpy().ravel())[0, 1]
    assert r > 0.999


def test_nearest_preprocessing_is_undone_with_nearest_neighbours():
    transforms = [Spacingd(KEYS, pixdim=(3, 3, 3), mode="nearest"), BorderPadd(KEYS, 2)]
    reference, ours, grid = _both(transforms, _image(_oblique_affine()))
    assert grid.mode == "nearest"
    values = set(np.unique(reference.numpy()).tolist()) | {0.0}
    assert set(np.unique(ours.numpy()).tolist()) <= values  # no interpolated values
    # where they differ, the scan voxel lies exactly half-way between two model voxels (a
    # tie, which the two round differently); everywhere else they agree
    differ = np.argwhere((ours != reference).numpy()[0])
    position = np.c_[differ, np.ones(len(differ))] @ grid.index_map.T
    frac = position[:, :3] - np.floor(position[:, :3])
    assert np.all(np.abs(frac - 0.5).min(axis=1) < 1e-6)
    assert float((ours == reference).float().mean()) > 0.8


def test_2d_chain_equals_monai():
    affine = np.diag([0.6, 0.8, 1.0, 1.0])
    affine[:2, 3] = [5.0, -3.0]
    image = MetaTensor(torch.rand(1, 70, 50), affine=torch.as_tensor(affine))
    transforms = [Spacingd(KEYS, pixdim=(1.5, 1.5)), ResizeWithPadOrCropd(KEYS, (40, 24))]
    reference, ours, _ = _both(transforms, image)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=2e-5, rtol=0)


def test_layout_memory_order_and_values():
    image = _image(_oblique_affine())
    pre = Compose([Spacingd(KEYS, pixdim=(2, 2, 2)), ResizeWithPadOrCropd(KEYS, (20, 20, 16))])
    x = pre({"image": image})["image"]
    grid = compose_inverse(x, image.affine, SHAPE)
    cam = _model_map(x.shape[1:])
    f = resample_to_grid(cam, grid, SHAPE, first_axis_fastest=True)
    c = resample_to_grid(cam, grid, SHAPE)
    assert c.is_contiguous() and not f.is_contiguous()
    assert f.stride()[1] == 1  # the first scan axis is the fastest in memory
    np.testing.assert_allclose(f.numpy(), c.numpy(), atol=1e-6)  # summed in another order


def test_slabs_do_not_change_the_result(monkeypatch):
    import medcam.inverse as inverse

    image = _image(_oblique_affine())
    for diagonal in (False, True):
        pre = Compose([Spacingd(KEYS, pixdim=(2, 2, 2), diagonal=diagonal)])
        x = pre({"image": image})["image"]
        grid = compose_inverse(x, image.affine, SHAPE)
        cam = torch.cat([_model_map(x.shape[1:], seed=s) for s in range(2)])
        whole = resample_to_grid(cam, grid, SHAPE)
        monkeypatch.setattr(inverse, "SLAB_ELEMENTS", 1)  # one slice per slab
        sliced = resample_to_grid(cam, grid, SHAPE)
        monkeypatch.undo()
        np.testing.assert_allclose(sliced.numpy(), whole.numpy(), atol=1e-6)


def test_long_model_axes_use_the_gather_path(monkeypatch):
    import medcam.inverse as inverse

    image = _image(_oblique_affine())
    pre = Compose(
        [Spacingd(KEYS, pixdim=(0.5, 0.5, 1.0)), ResizeWithPadOrCropd(KEYS, (60, 60, 40))]
    )
    x = pre({"image": image})["image"]
    grid = compose_inverse(x, image.affine, SHAPE)
    cam = _model_map(x.shape[1:])
    dense = resample_to_grid(cam, grid, SHAPE)
    monkeypatch.setattr(inverse, "DENSE_AXIS", 4)
    gathered = resample_to_grid(cam, grid, SHAPE)
    np.testing.assert_allclose(gathered.numpy(), dense.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "transforms, reason",
    [
        ([Rotate90d(KEYS)], "Rotate90"),
        ([Spacingd(KEYS, pixdim=(2, 2, 2)), CenterSpatialCropd(KEYS, (8, 8, 8)),
          Spacingd(KEYS, pixdim=(3, 3, 3))], "crop between two resampling"),
    ],
)  # fmt: skip
def test_chains_that_cannot_be_composed_say_why(transforms, reason):
    image = _image(_oblique_affine())
    x = Compose(transforms)({"image": image})["image"]
    result = compose_inverse(x, image.affine, SHAPE)
    assert isinstance(result, str) and reason in result


def test_a_chain_not_starting_on_the_scan_is_refused():
    image = _image(_oblique_affine())
    x = Compose([Spacingd(KEYS, pixdim=(2, 2, 2))])({"image": image})["image"]
    moved = _oblique_affine()
    moved[:3, 3] += 0.4  # another grid: not the scan the preprocessing started from
    assert "did not start from the scan" in compose_inverse(x, moved, SHAPE)
    assert "plain tensor" in compose_inverse(x.as_tensor(), image.affine, SHAPE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resampling_on_cuda_matches_cpu():
    image = _image(_oblique_affine())
    for diagonal in (False, True):
        pre = Compose([Orientationd(KEYS, axcodes="RAS", labels=None),
                       Spacingd(KEYS, pixdim=(2, 2, 3), diagonal=diagonal),
                       ResizeWithPadOrCropd(KEYS, (24, 20, 12))])  # fmt: skip
        x = pre({"image": image})["image"]
        grid = compose_inverse(x, image.affine, SHAPE)
        cam = _model_map(x.shape[1:])
        cpu = resample_to_grid(cam, grid, SHAPE)
        gpu = resample_to_grid(cam.cuda(), grid, SHAPE)
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-5)
