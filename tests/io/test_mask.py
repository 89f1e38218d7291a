"""Masks of the evidence on a scan's grid: DICOM SEG (some slices, several segments), label
images stored in another axis order, crops, and the grids that must be refused."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes

import medcam
from medcam.data.synthetic import Geometry, torso_phantom, write_dicom_series
from medcam.errors import InputError
from medcam.io.mask import evidence, mask_on_scan


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """An oblique-free CT series (24 x 20 x 10, 2 x 2 x 3 mm), files shuffled, and its scan."""
    folder = tmp_path_factory.mktemp("mask") / "ct"
    g = Geometry((24, 20, 10), (2.0, 2.0, 3.0), (-20.0, -20.0, 0.0))
    write_dicom_series(torso_phantom(g, noise_hu=0), g, folder, shuffle=True)
    return folder, medcam.load_scan(folder)


def _seg(folder, scan, masks: list[np.ndarray], path):
    """A binary DICOM SEG, one segment per mask (medcam's array order), written by highdicom;
    empty frames are left out, so the SEG covers only the slices with a segment."""
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: p for p in folder.iterdir()}
    sources = [pydicom.dcmread(by_uid[d.SOPInstanceUID]) for d in scan.datasets]
    pixels = np.stack(masks, -1).transpose(2, 1, 0, 3).astype(np.uint8)  # frames, rows, cols
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n + 1, segment_label=f"finding {n + 1}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in range(len(masks))
    ]  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="tests",
        manufacturer_model_name="tests", software_versions="0", device_serial_number="0",
    )  # fmt: skip
    seg.save_as(path)
    return path


def test_a_dicom_seg_of_some_slices_lands_on_its_voxels(series, tmp_path):
    folder, scan = series
    lesion = np.zeros(scan.spatial_shape, bool)
    lesion[5:8, 6:9, 3:5] = True
    cyst = np.zeros(scan.spatial_shape, bool)
    cyst[15:18, 2:4, 7] = True
    one = _seg(folder, scan, [lesion], tmp_path / "one.dcm")
    assert pydicom.dcmread(one).NumberOfFrames == 2  # slices 3 and 4 only
    assert np.array_equal(mask_on_scan(one, scan).numpy(), lesion)
    two = _seg(folder, scan, [lesion, cyst], tmp_path / "two.dcm")
    with pytest.raises(InputError, match=r"several segments: 1 \(finding 1\), 2 \(finding 2\)"):
        mask_on_scan(two, scan)
    assert np.array_equal(mask_on_scan(two, scan, 1).numpy(), lesion)
    assert np.array_equal(mask_on_scan(two, scan, 2).numpy(), cyst)
    with pytest.raises(InputError, match=r"no segment 3 \(its segments: \[1, 2\]\)"):
        mask_on_scan(two, scan, 3)
    # as a PACS or OHIF export keeps it: the SEG alone in its series folder
    folder_of_one = tmp_path / "seg_series"
    folder_of_one.mkdir()
    (folder_of_one / "1.dcm").write_bytes(one.read_bytes())
    assert np.array_equal(mask_on_scan(folder_of_one, scan).numpy(), lesion)
    # the same grid, another patient's series (a swapped row in a case list): refused
    other = tmp_path / "other_ct"
    g = Geometry((24, 20, 10), (2.0, 2.0, 3.0), (-20.0, -20.0, 0.0))
    write_dicom_series(torso_phantom(g, noise_hu=0), g, other, patient_id="SOMEONE-ELSE")
    with pytest.raises(InputError, match="belongs to another patient than its scan"):
        mask_on_scan(one, medcam.load_scan(other))


def test_label_images_in_another_order_or_cropped_are_placed(tmp_path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 20.0]
    scan_path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 8, 6), np.float32), affine), scan_path)
    scan = medcam.load_scan(scan_path)
    truth = np.zeros((10, 8, 6), np.uint8)
    truth[2:4, 5, 1:3] = 1
    # the same voxels, axes swapped and the first one reversed
    flip = np.array(
        [[0, -1, 0, 9], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float
    )  # (j,i,k) -> (9-i,j,k)
    stored = truth[::-1].transpose(1, 0, 2).copy()  # stored[j, i, k] = truth[9 - i, j, k]
    swapped = tmp_path / "swapped.nii.gz"
    nib.save(nib.Nifti1Image(stored, affine @ flip), swapped)  # stored index -> scan index
    assert np.array_equal(mask_on_scan(swapped, scan).numpy(), truth.astype(bool))
    # a crop: voxels 1..5 x 4..7 x 0..3 of the scan
    crop = affine.copy()
    crop[:3, 3] = (affine @ [1, 4, 0, 1])[:3]
    cropped = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(truth[1:6, 4:8, 0:4].copy(), crop), cropped)
    assert np.array_equal(mask_on_scan(cropped, scan).numpy(), truth.astype(bool))
    # a crop stored with its first axis reversed: stored[i] = truth[5 - i] (scan voxels 5..1)
    reversed_crop = crop @ np.array([[-1, 0, 0, 4], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    path = tmp_path / "crop_reversed.nii.gz"
    nib.save(nib.Nifti1Image(truth[1:6, 4:8, 0:4][::-1].copy(), reversed_crop), path)
    assert np.array_equal(mask_on_scan(path, scan).numpy(), truth.astype(bool))
    # refused: half a voxel off, reaching outside the scan, another voxel size
    for shift, match in (([1.0, 0, 0], "centre shifted"), ([-40.0, 0, 0], "centre shifted")):
        moved = crop.copy()
        moved[:3, 3] += shift
        path = tmp_path / "moved.nii.gz"
        nib.save(nib.Nifti1Image(truth[1:6, 4:8, 0:4].copy(), moved), path)
        with pytest.raises(InputError, match=f"not on the scan's grid: .*{match}"):
            mask_on_scan(path, scan)
    fine = np.diag([1.0, 3.0, 4.0, 1.0])
    fine[:3, 3] = affine[:3, 3]
    nib.save(nib.Nifti1Image(np.zeros((20, 8, 6), np.uint8), fine), tmp_path / "fine.nii.gz")
    with pytest.raises(InputError, match="voxel size 1 x 3 x 4 mm instead of the scan's 2"):
        mask_on_scan(tmp_path / "fine.nii.gz", scan)
    # 1 % larger voxels: 0.18 voxel off at the far end of 10, refused as well
    scaled = crop.copy()
    scaled[:3, :3] *= 1.01
    nib.save(nib.Nifti1Image(np.zeros((10, 8, 6), np.uint8), scaled), tmp_path / "scaled.nii.gz")
    with pytest.raises(InputError, match="not on the scan's grid"):
        mask_on_scan(tmp_path / "scaled.nii.gz", scan)
    # another rank: a 2D mask for a volume
    nib.save(nib.Nifti1Image(np.ones((10, 8), np.uint8), affine), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match=r"is 2D \(10, 8\), the scan 3D"):
        mask_on_scan(tmp_path / "flat.nii.gz", scan)


def test_which_voxels_are_the_evidence():
    binary = torch.tensor([0, 1, 1, 0])
    assert evidence(binary, None, "m").tolist() == [False, True, True, False]
    resampled = torch.tensor([0.0001, 0.49, 0.51, 0.93])  # interpolated: >= 0.5
    assert evidence(resampled, None, "m").tolist() == [False, False, True, True]
    labels = torch.tensor([0, 1, 2, 2])
    with pytest.raises(InputError, match=r"m holds several labels \(1, 2\)"):
        evidence(labels, None, "m")
    assert evidence(labels, 2, "m").tolist() == [False, False, True, True]
    with pytest.raises(InputError, match=r"no voxel labelled 3 \(its labels: \[1.0, 2.0\]\)"):
        evidence(labels, 3, "m")
    with pytest.raises(InputError, match="NaN"):
        evidence(torch.tensor([0.0, float("nan")]), None, "m")
