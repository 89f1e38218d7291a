"""Back on the scan's grid: grids compared in world coordinates, real differences named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcam.data.synthetic import Geometry, torso_phantom, write_dicom_series
from medcam.errors import InputError, MedcamError
from medcam.io.scan import load_scan
from medcam.space import invert_to_source


@pytest.fixture(scope="module")
def descending_series(tmp_path_factory):
    """A CT series whose InstanceNumber decreases along the slice normal (feet-first
    numbering), files shuffled."""
    g = Geometry((40, 36, 12), (4.0, 4.0, 6.0), (-80.0, -70.0, -30.0))
    folder = tmp_path_factory.mktemp("descending")
    write_dicom_series(torso_phantom(g, noise_hu=0), g, folder, shuffle=True,
                       instance_numbers=list(range(12, 0, -1)))  # fmt: skip
    return folder


def _on_grid(array: torch.Tensor, affine: np.ndarray):
    from monai.data import MetaTensor

    return MetaTensor(array, affine=torch.as_tensor(affine))


def test_pydicom_reader_grid_is_mirrored_and_the_map_lands_on_the_scan(descending_series):
    """MONAI's PydicomReader orders slices by InstanceNumber: a mirrored grid of the same world.
    A map computed on it comes back on load_scan's grid, voxel for voxel."""
    from monai.transforms import LoadImage

    scan = load_scan(descending_series)
    monai_image = LoadImage(reader="PydicomReader", ensure_channel_first=True)(
        str(descending_series)
    )
    assert not np.allclose(np.asarray(monai_image.affine), scan.affine_ras)
    torch.testing.assert_close(monai_image[0].flip(2), scan.image[0])  # mirrored along z
    maps = monai_image.as_tensor().float() * 2.0  # a "heatmap" on the reader's grid
    out = invert_to_source(maps, monai_image, None, scan)
    torch.testing.assert_close(out, scan.image.as_tensor().float() * 2.0)


def test_a_map_through_spatial_preprocessing_from_a_mirrored_read(descending_series):
    from monai.transforms import Compose, LoadImage, Orientation, Spacing

    scan = load_scan(descending_series)
    image = LoadImage(reader="PydicomReader", ensure_channel_first=True)(str(descending_series))
    pre = Compose([Orientation("LPS", labels=None), Spacing((3.0, 5.0, 4.0), mode="bilinear")])
    model_input = pre(image)
    out = invert_to_source(model_input.as_tensor(), model_input, pre, scan)
    assert out.shape == scan.image.shape
    # the map (the resampled image) inverted is close to the scan itself, not its mirror
    ref = scan.image.as_tensor()
    err = (out - ref).abs().mean() / ref.abs().mean()
    mirrored = (out - ref.flip(3)).abs().mean() / ref.abs().mean()
    assert err < 0.1 and mirrored > 4 * err


def test_transposed_and_flipped_grids_are_aligned(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 5, 4)).astype(np.float32)
    affine = np.array([[0, 0, 2.0, 10], [1.5, 0, 0, -3], [0, -1.2, 0, 4], [0, 0, 0, 1]])
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), tmp_path / "s.nii.gz")
    scan = load_scan(tmp_path / "s.nii.gz")
    # the same voxels on a grid with axes (z, x, y) and x running backwards
    arr = torch.from_numpy(np.ascontiguousarray(np.transpose(data, (2, 0, 1))[:, ::-1, :]))
    flip_x = np.eye(4)
    flip_x[0, 0], flip_x[0, 3] = -1, data.shape[0] - 1
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1  # grid index (k, i, j) -> (i, j, k)
    other = scan.affine_ras @ flip_x @ perm
    out = invert_to_source(arr[None], _on_grid(arr[None], other), None, scan)
    torch.testing.assert_close(out[0], torch.from_numpy(data))


@pytest.mark.parametrize(
    ("change", "named"),
    [("spacing", "voxel size"), ("rotation", "rotated"), ("shift", "shifted"),
     ("shape", "shape")],
)  # fmt: skip
def test_a_real_geometry_change_is_refused_and_named(tmp_path, change, named):
    import nibabel as nib

    from medcam.data.synthetic import rotation

    data = np.zeros((8, 8, 6), np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "s.nii.gz")
    scan = load_scan(tmp_path / "s.nii.gz")
    affine = scan.affine_ras.copy()
    shape = (8, 8, 6)
    if change == "spacing":
        affine[2, 2] = 3.5
    elif change == "rotation":
        affine[:3, :3] = rotation((0, 0, 10)) @ affine[:3, :3]
    elif change == "shift":
        affine[:3, 3] += (0.0, 4.0, 0.0)
    else:
        shape = (8, 8, 5)
    maps = torch.zeros(1, *shape)
    with pytest.raises(MedcamError, match=named):
        invert_to_source(maps, _on_grid(maps, affine), None, scan)


def test_sub_voxel_rounding_is_not_a_geometry_change(tmp_path):
    import nibabel as nib

    data = np.zeros((8, 8, 6), np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "s.nii.gz")
    scan = load_scan(tmp_path / "s.nii.gz")
    affine = scan.affine_ras.copy()
    affine[:3, 3] += 0.05  # 1/40 voxel: header rounding, not a different grid
    maps = torch.ones(1, 8, 8, 6)
    torch.testing.assert_close(invert_to_source(maps, _on_grid(maps, affine), None, scan), maps)


def test_a_2d_slice_for_a_3d_network_is_refused_before_the_model_runs():
    import pydicom.data

    import medcam
    from medcam.engine.inferer import InputSpec

    calls = []
    net = torch.nn.Conv3d(1, 2, 1)
    net.register_forward_hook(lambda *a: calls.append(1))
    slice_2d = pydicom.data.get_testdata_file("CT_small.dcm")
    with pytest.raises(InputError, match=r"2D .* takes 3D .*DICOM series folder"):
        medcam.explain_scan(net, slice_2d, target=1, expect=InputSpec(3, 1, "network_def"))
    rgb = torch.rand(3, 16, 16, 16)
    from monai.data import MetaTensor

    with pytest.raises(InputError, match=r"3 channel.*takes 1"):
        medcam.explain_scan(net, MetaTensor(rgb), target=1, expect=InputSpec(3, 1))
    assert calls == []
