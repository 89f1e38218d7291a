"""Loading scans: DICOM series order and geometry, NIfTI, 2D images, and the input errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import medcam
from medcam.data.synthetic import Geometry, blob_phantom, rotation, write_dicom_series

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _oblique_geometry() -> Geometry:
    r = rotation((12, -5, 25))
    return Geometry(
        (24, 20, 14), (1.1, 0.9, 2.5), (-30.0, -20.0, 10.0), tuple(r[:, 0]), tuple(r[:, 1])
    )


def test_series_is_sorted_by_position_not_instance_number(tmp_path):
    g = _oblique_geometry()
    vol = blob_phantom(g, g.affine_lps[:3] @ [12, 10, 9, 1], 5.0, body_radius_mm=50)
    n = g.shape[2]
    write_dicom_series(vol, g, tmp_path, shuffle=True, instance_numbers=list(range(n, 0, -1)))
    scan = medcam.load_scan(tmp_path)
    assert scan.kind == "dicom-series" and scan.spatial_shape == g.shape
    np.testing.assert_allclose(scan.image[0].numpy(), vol, atol=0.51)  # int16 storage
    np.testing.assert_allclose(scan.affine_lps, g.affine_lps, atol=1e-5)
    positions = [np.dot(ds.ImagePositionPatient, g.normal) for ds in scan.datasets]
    assert positions == sorted(positions)
    assert len(scan.sha256) == 64 and len(scan.input_files) == n


def test_pydicom_ct5n_series():
    folder = Path(get_testdata_file("dicomdirtests/98892001/CT5N/"))
    scan = medcam.load_scan(folder)
    assert scan.spatial_shape == (16, 16, 5)
    first = pydicom.dcmread(scan.datasets[0].filename)
    assert float(scan.image[0, 3, 4, 0]) == pytest.approx(
        float(first.pixel_array[4, 3]) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    )
    origin_lps = scan.affine_lps[:3, 3]
    np.testing.assert_allclose(origin_lps, [float(v) for v in first.ImagePositionPatient])


def test_nifti_las():
    scan = medcam.load_scan(NIBABEL_DATA / "anatomical.nii")
    img = nib.load(NIBABEL_DATA / "anatomical.nii")
    assert scan.spatial_shape == (33, 41, 25) and scan.kind == "nifti"
    np.testing.assert_allclose(scan.affine_ras, img.affine)
    assert nib.aff2axcodes(scan.affine_ras) == ("L", "A", "S")
    assert scan.nifti_codes == (2, 2)


def test_single_dicom_and_png(tmp_path):
    ct = medcam.load_scan(get_testdata_file("CT_small.dcm"))
    assert ct.kind == "dicom-2d" and ct.spatial_shape == (128, 128) and ct.has_frame_of_reference
    from PIL import Image

    pixels = (np.arange(20 * 30).reshape(20, 30) % 251).astype(np.uint8)  # (H, W)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    png = medcam.load_scan(tmp_path / "x.png")
    assert png.spatial_shape == (30, 20)  # (X = width, Y = height), as MONAI's PILReader
    assert png.image[0, 7, 3] == pixels[3, 7]


def test_metatensor_passthrough():
    from monai.data import MetaTensor

    mt = MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))
    scan = medcam.load_scan(mt)
    assert scan.kind == "tensor" and scan.affine_ras[0, 0] == 2.0


# ----------------------------------------------------------------------------- errors


def _small_series(folder: Path, **kwargs):
    g = Geometry((8, 8, 6), (1.0, 1.0, 2.0))
    return write_dicom_series(np.zeros(g.shape, np.float32), g, folder, **kwargs)


def test_mixed_series_are_refused(tmp_path):
    _small_series(tmp_path)
    _small_series(tmp_path / "other")
    for f in (tmp_path / "other").iterdir():
        shutil.move(f, tmp_path / f"b_{f.name}")
    with pytest.raises(medcam.InputError, match="mixes 2 DICOM series"):
        medcam.load_scan(tmp_path)


def test_missing_slice_is_refused(tmp_path):
    info = _small_series(tmp_path)
    info.files[3].unlink()
    with pytest.raises(medcam.InputError, match="1 missing slice"):
        medcam.load_scan(tmp_path)


def test_duplicate_slice_is_refused(tmp_path):
    info = _small_series(tmp_path)
    ds = pydicom.dcmread(info.files[2])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "dup.dcm")
    with pytest.raises(medcam.InputError, match="share one position"):
        medcam.load_scan(tmp_path)


def test_mixed_orientation_is_refused(tmp_path):
    info = _small_series(tmp_path)
    ds = pydicom.dcmread(info.files[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(info.files[0])
    with pytest.raises(medcam.InputError, match="ImageOrientationPatient"):
        medcam.load_scan(tmp_path)


def test_nan_volume_is_refused(tmp_path):
    data = np.zeros((6, 6, 6), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(medcam.InputError, match="1 NaN"):
        medcam.load_scan(tmp_path / "nan.nii.gz")


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(medcam.InputError, match="does not exist"):
        medcam.load_scan(tmp_path / "nope.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(medcam.InputError, match="No DICOM image files"):
        medcam.load_scan(tmp_path / "empty")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(medcam.InputError, match="not a DICOM image"):
        medcam.load_scan(tmp_path / "junk.dcm")


def _pydicom_volume(scan) -> np.ndarray:
    """The reference: each file decoded by pydicom and rescaled in float64, stacked as
    ``(X, Y, Z)`` in the scan's slice order."""
    from pydicom.pixels import apply_rescale

    slices = []
    for ds in scan.datasets:
        full = pydicom.dcmread(ds.filename)
        slices.append(apply_rescale(full.pixel_array, full).T)
    return np.stack(slices, axis=-1).astype(np.float32)


@pytest.mark.parametrize("rescale", [(1.0, -1024.0), (0.37, -812.5)], ids=["ct", "fractional"])
def test_series_volume_is_float32_and_equals_pydicom(tmp_path, rescale, monkeypatch):
    import medcam.io.dicom

    monkeypatch.setattr(medcam.io.dicom, "BLOCK_SLICES", 4)  # blocks of slices, one partial
    g = _oblique_geometry()
    vol = blob_phantom(g, g.affine_lps[:3] @ [12, 10, 7, 1], 5.0, body_radius_mm=50)
    write_dicom_series(vol, g, tmp_path, shuffle=True, rescale=rescale)
    scan = medcam.load_scan(tmp_path)
    image = scan.image[0].numpy()
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, _pydicom_volume(scan))  # one float32 rounding, exact
    assert image.flags.c_contiguous  # MONAI's layout
    # the datasets keep no pixel data (the volume is the only copy)
    assert all("PixelData" not in ds for ds in scan.datasets)


def test_enhanced_and_nifti_volumes_load_in_monai_layout(tmp_path):
    from medcam.data.synthetic import write_enhanced_ct

    g = _oblique_geometry()
    vol = blob_phantom(g, g.affine_lps[:3] @ [12, 10, 7, 1], 5.0, body_radius_mm=50)
    order = list(np.random.default_rng(3).permutation(g.shape[2]))
    path = write_enhanced_ct(vol, g, tmp_path / "mf.dcm", frame_order=order)
    scan = medcam.load_scan(path)
    np.testing.assert_allclose(scan.image[0].numpy(), vol, atol=0.51)
    assert scan.image[0].numpy().flags.c_contiguous
    nii = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), nii)
    image = medcam.load_scan(nii).image[0].numpy()
    np.testing.assert_array_equal(image, vol)
    assert image.flags.c_contiguous  # nibabel's Fortran-ordered array, reordered once
