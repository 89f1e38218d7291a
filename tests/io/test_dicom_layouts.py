"""Every DICOM layout a clinic sends: Enhanced multi-frame, Siemens MOSAIC, and the DICOM files
pydicom and nibabel ship, each checked voxel by voxel against an independent reader
(SimpleITK/GDCM, nibabel's nicom) or a volume written with a known geometry."""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

import medcam
from medcam.data.synthetic import (
    Geometry,
    rotation,
    write_dicom_series,
    write_enhanced_ct,
    write_mosaic,
)

NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"


def _geometry(shape=(24, 20, 11)) -> Geometry:
    r = rotation((10, -4, 20))
    return Geometry(shape, (1.5, 1.25, 3.0), (-20.0, -15.0, 5.0), tuple(r[:, 0]), tuple(r[:, 1]))


def _gunzip(name: str, folder: Path) -> Path:
    out = folder / name.removesuffix(".gz")
    out.write_bytes(gzip.open(NICOM_DATA / name).read())
    return out


def _voxels(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)


def _through_world(
    scan, other_affine: np.ndarray, sample: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """medcam's voxel indices and the other reader's indices of the same world points.

    ``sample``: only the 8 corners and this many random voxels (both maps are affine, so the
    corners decide the geometry; the sample checks the values)."""
    idx = _voxels(scan.spatial_shape) if not sample else None
    if sample:
        shape = np.array(scan.spatial_shape)
        corners = _voxels((2, 2, 2)) * (shape - 1)
        rng = np.random.default_rng(0)
        idx = np.concatenate([corners, (rng.random((sample, 3)) * shape).astype(int)])
    world = idx @ scan.affine_lps[:3, :3].T + scan.affine_lps[:3, 3]
    inv = np.linalg.inv(other_affine)
    return idx, world @ inv[:3, :3].T + inv[:3, 3]


def _sitk_affine(image: sitk.Image) -> np.ndarray:
    """SimpleITK index (x, y, z) -> LPS mm."""
    a = np.eye(4)
    a[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    a[:3, 3] = image.GetOrigin()
    return a


def _nibabel_wrapper(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom: "highly experimental"
        from nibabel.nicom import dicomwrappers

        return dicomwrappers.wrapper_from_file(str(path))


# ----------------------------------------------------------------------------- enhanced


def test_enhanced_ct_in_shuffled_frame_order_equals_its_series(tmp_path):
    """A multi-frame CT whose frames are stored out of slice order loads like the same slices
    as a single-frame series: same voxels, same geometry, and each slice knows its frame."""
    g = _geometry()
    vol = np.random.default_rng(1).integers(-1000, 1000, g.shape).astype(np.float32)
    frame_order = [3, 1, 4, 0, 5, 9, 2, 6, 10, 8, 7]  # frame f holds slice frame_order[f - 1]
    path = write_enhanced_ct(vol, g, tmp_path / "enhanced.dcm", frame_order=frame_order)
    write_dicom_series(vol, g, tmp_path / "series")
    enhanced = medcam.load_scan(path)
    series = medcam.load_scan(tmp_path / "series")
    assert enhanced.kind == "dicom-series" and enhanced.dicom_layout == "enhanced"
    np.testing.assert_array_equal(enhanced.image[0].numpy(), vol)
    np.testing.assert_array_equal(enhanced.image[0].numpy(), series.image[0].numpy())
    np.testing.assert_allclose(enhanced.affine_lps, series.affine_lps, atol=1e-6)
    np.testing.assert_allclose(enhanced.affine_lps, g.affine_lps, atol=1e-5)
    assert [frame_order[f - 1] for f in enhanced.source_frames] == list(range(g.shape[2]))
    assert enhanced.input_files == [path]
    assert medcam.load_scan(tmp_path).dicom_layout == "enhanced"  # its folder: the one object


def test_philips_enhanced_mr_geometry_matches_simpleitk_and_nibabel(tmp_path):
    """nibabel's real Philips Enhanced MR (176 frames, oblique; orientation per frame)."""
    path = _gunzip("philips_mprage.dcm.gz", tmp_path)
    scan = medcam.load_scan(path)
    assert scan.spatial_shape == (256, 256, 176) and scan.dicom_layout == "enhanced"
    # nibabel steps slices by SliceThickness (1 mm); the frames are 1.0000014 mm apart, which
    # SimpleITK and medcam measure: 175 slices further that is 1.3e-3 of a voxel
    readers = [
        (_sitk_affine(sitk.ReadImage(str(path))), 1e-4),
        (_nibabel_wrapper(path).affine, 2e-3),
    ]
    for other_affine, tol in readers:
        _, other = _through_world(scan, other_affine, sample=1000)
        assert np.abs(other - np.round(other)).max() < tol  # every voxel on one of theirs
        corners = np.sort(np.round(other[:8]), axis=0)  # the same box of voxels
        assert corners.min() == 0 and sorted(corners.max(axis=0)) == [175, 255, 255]
    positions = [
        np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, float)
        for g in pydicom.dcmread(path, stop_before_pixels=True).PerFrameFunctionalGroupsSequence
    ]
    for k, f in enumerate(scan.source_frames):  # slice k is frame f, at frame f's position
        np.testing.assert_allclose(
            scan.affine_lps @ [0, 0, k, 1], [*positions[f - 1], 1], atol=1e-3
        )


def test_enhanced_refusals(tmp_path):
    g = _geometry((8, 8, 4))
    path = write_enhanced_ct(np.zeros(g.shape, np.float32), g, tmp_path / "e.dcm")
    ds = pydicom.dcmread(path)
    groups = ds.PerFrameFunctionalGroupsSequence
    groups[1].PlanePositionSequence[0].ImagePositionPatient = list(
        groups[0].PlanePositionSequence[0].ImagePositionPatient
    )
    ds.save_as(tmp_path / "two_echoes.dcm")
    with pytest.raises(medcam.InputError, match="4 frames at 3 slice positions"):
        medcam.load_scan(tmp_path / "two_echoes.dcm")
    with pytest.raises(medcam.InputError, match="Segmentation Storage object, not an image"):
        medcam.load_scan(get_testdata_file("liver_1frame.dcm"))
    with pytest.raises(medcam.InputError, match="RT Dose Storage object with 15 frames"):
        medcam.load_scan(get_testdata_file("rtdose.dcm"))
    (tmp_path / "two").mkdir()
    shutil.copy(path, tmp_path / "two" / "a.dcm")
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "two" / "b.dcm")
    with pytest.raises(medcam.InputError, match="2 multi-frame objects"):
        medcam.load_scan(tmp_path / "two")


# ----------------------------------------------------------------------------- mosaic


@pytest.mark.parametrize("reverse", [False, True], ids=["tiles-along-normal", "tiles-reversed"])
def test_mosaic_is_unpacked_with_its_true_geometry(tmp_path, reverse):
    """A MOSAIC built from a known volume comes back as that volume on its grid, and nibabel's
    MosaicWrapper (nicom) reads the same voxels at the same places."""
    g = _geometry()
    vol = np.random.default_rng(2).integers(0, 4000, g.shape).astype(np.float32)
    path = write_mosaic(vol, g, tmp_path / "mosaic.dcm", reverse_tiles=reverse)
    scan = medcam.load_scan(path)
    assert scan.kind == "dicom-mosaic" and scan.spatial_shape == g.shape
    np.testing.assert_array_equal(scan.image[0].numpy(), vol)
    np.testing.assert_allclose(scan.affine_lps, g.affine_lps, atol=1e-5)
    w = _nibabel_wrapper(path)
    assert type(w).__name__ == "MosaicWrapper"
    idx, other = _through_world(scan, w.affine)
    assert np.abs(other - np.round(other)).max() < 1e-4
    other = np.round(other).astype(int)
    np.testing.assert_array_equal(scan.image[0].numpy()[tuple(idx.T)], w.get_data()[tuple(other.T)])


def test_real_siemens_dwi_mosaic_matches_nibabel(tmp_path):
    """nibabel's Siemens DWI MOSAIC (896x896 = 7x7 tiles of 128x128, 48 slices; its pixel data
    is blanked, so this checks the geometry: every voxel at the place nibabel puts it)."""
    path = _gunzip("siemens_dwi_1000.dcm.gz", tmp_path)
    scan = medcam.load_scan(path)
    assert scan.spatial_shape == (128, 128, 48)
    w = _nibabel_wrapper(path)
    idx, other = _through_world(scan, w.affine)
    assert np.abs(other - np.round(other)).max() < 1e-6
    other = np.round(other).astype(int)
    data = w.get_data()
    np.testing.assert_array_equal(scan.image[0].numpy()[tuple(idx.T)], data[tuple(other.T)])
    assert sorted(np.round(other).max(axis=0)) == [47, 127, 127]


def test_mosaic_refusals(tmp_path):
    g = _geometry((8, 8, 5))
    vol = np.ones(g.shape, np.float32)
    with pytest.raises(medcam.InputError, match="NumberOfImagesInMosaic is missing"):
        medcam.load_scan(write_mosaic(vol, g, tmp_path / "anon.dcm", csa=False))
    folder = tmp_path / "fmri"
    first = write_mosaic(vol, g, folder / "t0.dcm")
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "t1.dcm")
    with pytest.raises(medcam.InputError, match="2 Siemens MOSAIC images: a 4D series"):
        medcam.load_scan(folder)
    # nibabel's 0.dcm: a 256x256 MOSAIC that claims 48 slices (7x7 tiles cannot split 256)
    with pytest.raises(medcam.InputError, match="does not split into 7x7 tiles"):
        medcam.load_scan(NICOM_DATA / "0.dcm")


# ----------------------------------------------------------------------------- shipped files


def test_pydicom_ct_series_matches_simpleitk():
    folder = Path(get_testdata_file("dicomdirtests/98892001/CT5N/"))
    scan = medcam.load_scan(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    idx, other = _through_world(scan, _sitk_affine(ref))
    assert np.abs(other - np.round(other)).max() < 1e-6
    other = np.round(other).astype(int)
    ref_values = sitk.GetArrayFromImage(ref)[other[:, 2], other[:, 1], other[:, 0]]
    np.testing.assert_array_equal(scan.image[0].numpy()[tuple(idx.T)], ref_values)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_pydicom_single_images_match_simpleitk(name):
    path = get_testdata_file(name)
    scan = medcam.load_scan(path)
    ref = sitk.ReadImage(path)
    assert scan.kind == "dicom-2d" and scan.spatial_shape == ref.GetSize()[:2]
    np.testing.assert_allclose(scan.affine_lps[:3, :2], _sitk_affine(ref)[:3, :2], atol=1e-6)
    np.testing.assert_allclose(scan.affine_lps[:3, 3], ref.GetOrigin(), atol=1e-6)
    np.testing.assert_array_equal(scan.image[0].numpy(), sitk.GetArrayFromImage(ref)[0].T)
