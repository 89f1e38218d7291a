"""A blob at a known world coordinate comes back there in every output format.

The scans go through real MONAI preprocessing (reorientation, resampling, crop/pad) and the
heatmap through MONAI's inverse; the model is IntensityCAM, whose Grad-CAM is the preprocessed
image itself. Each output is then read back by an independent reader: nibabel for NIfTI,
highdicom and dcmqi's paramap2itkimage (3D Slicer's loader) for the Parametric Map, dcmqi's
segimage2itkimage for the SEG.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.transforms import Compose, Orientation, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing
from pydicom.data import get_testdata_file

import medcam
from medcam.data.synthetic import Geometry, blob_phantom, rotation, write_dicom_series
from tests.helpers import voxel_size, weighted_centroid_world

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
needs_dcmqi = pytest.mark.skipif(
    shutil.which("paramap2itkimage") is None, reason="dcmqi is not installed (pip install dcmqi)"
)


def _preprocess(hu_window=(100.0, 300.0), spacing=3.0, size=32):
    return Compose(
        [
            Orientation(axcodes="RAS", labels=None),
            Spacing(pixdim=(spacing,) * 3, mode="bilinear"),
            ScaleIntensityRange(*hu_window, 0.0, 1.0, clip=True),
            ResizeWithPadOrCrop((size,) * 3),
        ]
    )


def _dcmqi(tool: str, dcm: Path, out: Path) -> sitk.Image:
    out.mkdir()
    done = subprocess.run(
        [tool, "--inputDICOM", str(dcm), "--outputDirectory", str(out), "-t", "nrrd"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    nrrd = sorted(out.glob("*.nrrd"))
    assert len(nrrd) == 1
    return sitk.ReadImage(str(nrrd[0]))


def _sitk_centroid_lps(image: sitk.Image) -> np.ndarray:
    a = sitk.GetArrayFromImage(image).astype(float)  # (z, y, x)
    idx = (np.argwhere(a > 0) * a[a > 0][:, None]).sum(axis=0) / a[a > 0].sum()
    return np.array(image.TransformContinuousIndexToPhysicalPoint(idx[::-1].tolist()))


@pytest.fixture
def oblique_series(tmp_path):
    """Oblique (12/-5/25 degrees), anisotropic (1.1 x 0.9 x 2.5 mm), shuffled CT series."""
    r = rotation((12, -5, 25))
    g = Geometry(
        (48, 40, 30), (1.1, 0.9, 2.5), (-30.0, -20.0, 10.0), tuple(r[:, 0]), tuple(r[:, 1])
    )
    centre = g.affine_lps[:3] @ [30.0, 15.0, 12.0, 1.0]
    vol = blob_phantom(g, centre, 6.0, body_radius_mm=60)
    n = g.shape[2]
    write_dicom_series(
        vol, g, tmp_path / "series", shuffle=True, instance_numbers=list(range(n, 0, -1))
    )
    return tmp_path / "series", centre, g


@needs_dcmqi
def test_dicom_series_roundtrip_all_formats(oblique_series, intensity_cam, tmp_path):
    folder, centre_lps, geometry = oblique_series
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    ex = medcam.explain_scan(
        intensity_cam, folder, preprocess=_preprocess(), target=0, layers="conv"
    )
    assert ex.heatmap.shape == (1, *geometry.shape)
    out = tmp_path / "out"
    written = medcam.write_outputs(
        ex, out, ["nifti", "dicom-pm", "dicom-seg", "json"], model=intensity_cam
    )
    tol = 0.5 * min(geometry.spacing)
    # the map itself, on the source grid
    c = weighted_centroid_world(ex.heatmap[0].numpy(), geometry.affine_lps)
    assert np.linalg.norm(c - centre_lps) <= tol
    # NIfTI, read by nibabel (RAS)
    nii = nib.load(written["nifti"][0])
    np.testing.assert_allclose(nii.affine, LPS_TO_RAS @ geometry.affine_lps, atol=1e-4)
    c_ras = weighted_centroid_world(np.asarray(nii.dataobj), nii.affine)
    assert np.linalg.norm(LPS_TO_RAS[:3, :3] @ c_ras - centre_lps) <= tol
    # Parametric Map, read back exactly by highdicom ...
    pm_path = written["dicom-pm"][0]
    volume = hd.imread(pm_path).get_volume()
    pm_lps = volume.affine  # (slices, rows, columns) -> LPS
    assert np.linalg.norm(weighted_centroid_world(volume.array, pm_lps) - centre_lps) <= tol
    # every voxel, matched through world space, holds exactly the value of the map
    heat = ex.heatmap[0].numpy()
    idx = np.argwhere(np.ones(heat.shape, bool))
    to_pm = np.linalg.inv(volume.affine) @ geometry.affine_lps
    pm_idx = idx @ to_pm[:3, :3].T + to_pm[:3, 3]
    np.testing.assert_allclose(pm_idx, np.round(pm_idx), atol=1e-3)
    pm_idx = np.round(pm_idx).astype(int)
    np.testing.assert_array_equal(volume.array[tuple(pm_idx.T)], heat[tuple(idx.T)])
    # ... and by dcmqi, the loader 3D Slicer uses
    pm_img = _dcmqi("paramap2itkimage", pm_path, tmp_path / "pm")
    assert np.linalg.norm(_sitk_centroid_lps(pm_img) - centre_lps) <= tol
    ds = pydicom.dcmread(pm_path)
    source = pydicom.dcmread(next(folder.iterdir()))
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert rwvm.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "130403"
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == geometry.shape[2]
    # SEG of the thresholded map, read by dcmqi
    seg_img = _dcmqi("segimage2itkimage", written["dicom-seg"][0], tmp_path / "seg")
    assert np.linalg.norm(_sitk_centroid_lps(seg_img) - centre_lps) <= 2 * tol
    # inputs untouched
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_nibabel_anatomical_las_roundtrip(intensity_cam, tmp_path):
    """nibabel's LAS 2 mm brain with a bright blob added at a known voxel."""
    src = nib.load(NIBABEL_DATA / "anatomical.nii")
    data = np.asarray(src.dataobj, np.float32)
    voxel = np.array([10.0, 25.0, 12.0])
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), axis=-1)
    data[np.linalg.norm(idx - voxel, axis=-1) <= 2.5] = 60000.0  # brain max is ~30000
    path = tmp_path / "brain.nii.gz"
    header = src.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(data, src.affine, header), path)
    centre_ras = (src.affine @ np.append(voxel, 1.0))[:3]
    ex = medcam.explain_scan(
        intensity_cam, path, preprocess=_preprocess((40000.0, 60000.0)), target=0, layers="conv"
    )
    written = medcam.write_outputs(ex, tmp_path / "out", ["nifti", "png", "json"])
    nii = nib.load(written["nifti"][0])
    assert nii.shape == data.shape and nib.aff2axcodes(nii.affine) == ("L", "A", "S")
    np.testing.assert_allclose(nii.affine, src.affine)
    hdr = nii.header
    assert hdr.get_sform(coded=True)[1] == 2 and hdr.get_qform(coded=True)[1] == 2
    assert hdr.get_xyzt_units()[0] == "mm" and hdr.get_data_dtype() == np.dtype("<f4")
    assert hdr.get_intent()[0] == "estimate" and hdr.get_intent()[2] == "gradcam"
    assert float(hdr["cal_max"]) == pytest.approx(float(np.asarray(nii.dataobj).max()))
    c = weighted_centroid_world(np.asarray(nii.dataobj), nii.affine)
    assert np.linalg.norm(c - centre_ras) <= 0.5 * voxel_size(src.affine)
    assert written["png"][0].stat().st_size > 10_000


@needs_dcmqi
def test_pydicom_ct5n_roundtrip(intensity_cam, tmp_path):
    """pydicom's real 5-slice CT series, with a blob written into its pixels."""
    folder = tmp_path / "ct5n"
    shutil.copytree(get_testdata_file("dicomdirtests/98892001/CT5N/"), folder)
    scan = medcam.load_scan(folder)
    target = np.array([9, 6, 2])
    for k, ds in enumerate(scan.datasets):
        full = pydicom.dcmread(ds.filename)
        pixels = full.pixel_array.copy()
        if k == target[2]:
            pixels[target[1], target[0]] = 3000  # (row, column)
        full.PixelData = pixels.astype(full.pixel_array.dtype).tobytes()
        full.save_as(ds.filename)
    scan = medcam.load_scan(folder)
    hu = scan.image[0].numpy()
    ex = medcam.explain_scan(
        intensity_cam,
        scan,
        preprocess=ScaleIntensityRange(float(hu.max()) - 100, float(hu.max()), 0, 1, clip=True),
        target=0,
        layers="conv",
    )
    assert tuple(np.unravel_index(int(ex.heatmap[0].argmax()), hu.shape)) == tuple(target)
    written = medcam.write_outputs(ex, tmp_path / "out", ["dicom-pm"])
    img = _dcmqi("paramap2itkimage", written["dicom-pm"][0], tmp_path / "pm")
    truth = scan.affine_lps @ np.append(target, 1.0)
    assert np.linalg.norm(_sitk_centroid_lps(img) - truth[:3]) < 1e-3


def test_frames_are_written_ascending_along_the_normal(oblique_series):
    """Sources handed over in descending order still give frames in dcmqi's order."""
    from medcam.writers.dicom_common import DicomIdentity
    from medcam.writers.dicom_pm import build_parametric_map
    from medcam.writers.dicom_seg import build_segmentation

    folder, _, geometry = oblique_series
    scan = medcam.load_scan(folder)
    heat = np.random.default_rng(0).random(scan.spatial_shape).astype(np.float32)
    scan.datasets = scan.datasets[::-1]  # as if the source list were sorted the other way
    flipped = heat[:, :, ::-1].copy()
    pm = build_parametric_map(
        flipped, scan, method="gradcam", label="c", identity=DicomIdentity.new(1)
    )
    seg = build_segmentation(
        flipped, scan, threshold=0.5, label="c", method="gradcam", identity=DicomIdentity.new(2)
    )
    for ds in (pm, seg):
        positions = [
            np.dot(g.PlanePositionSequence[0].ImagePositionPatient, geometry.normal)
            for g in ds.PerFrameFunctionalGroupsSequence
        ]
        assert positions == sorted(positions)
        pointers = [item.DimensionIndexPointer for item in ds.DimensionIndexSequence]
        d = pointers.index(0x00200032)  # the ImagePositionPatient dimension
        values = [
            int(np.atleast_1d(g.FrameContentSequence[0].DimensionIndexValues)[d])
            for g in ds.PerFrameFunctionalGroupsSequence
        ]
        assert values == list(range(1, len(positions) + 1))
    frames = np.frombuffer(pm.FloatPixelData, "<f4").reshape(-1, *heat.shape[1::-1])
    np.testing.assert_array_equal(frames, np.transpose(heat, (2, 1, 0)))
    seg_frames = seg.pixel_array.astype(bool)
    np.testing.assert_array_equal(seg_frames, np.transpose(heat >= 0.5, (2, 1, 0)))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_scan_to_source_grid_on_cuda_matches_cpu(oblique_series, intensity_cam):
    import torch

    folder, _, _ = oblique_series
    cpu = medcam.explain_scan(
        intensity_cam, folder, preprocess=_preprocess(), target=0, layers="conv"
    )
    gpu = medcam.explain_scan(
        intensity_cam.to("cuda"), folder, preprocess=_preprocess(), target=0, layers="conv"
    )
    assert gpu.heatmap.device.type == "cuda"
    torch.testing.assert_close(gpu.heatmap.cpu(), cpu.heatmap, rtol=1e-4, atol=1e-6)


@needs_dcmqi
def test_enhanced_source_roundtrip_dcmqi(enhanced_case, tmp_path):
    """A PM and SEG on a multi-frame source stored out of slice order load in dcmqi (Slicer)
    with the blob where it is in the source."""
    scan, heat = enhanced_case.scan, enhanced_case.heatmap
    truth = weighted_centroid_world(heat, scan.affine_lps)
    tol = 1e-3  # mm: the same voxels at the same places
    pm_img = _dcmqi("paramap2itkimage", enhanced_case.pm, tmp_path / "pm")
    assert np.linalg.norm(_sitk_centroid_lps(pm_img) - truth) <= tol
    seg_img = _dcmqi("segimage2itkimage", enhanced_case.seg, tmp_path / "seg")
    mask = (heat >= enhanced_case.seg_threshold).astype(float)
    assert (
        np.linalg.norm(_sitk_centroid_lps(seg_img) - weighted_centroid_world(mask, scan.affine_lps))
        <= tol
    )
