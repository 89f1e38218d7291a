"""Writers that stream: the same bytes as the objects built whole, frames from the right slices.

Parametric Maps and SEGs are built by highdicom without their pixel data, which medcam writes
slab by slab from the heatmap (:func:`medcam.writers.dicom_common.write_dataset`). These tests
check that file against pydicom's ``save_as`` of the complete dataset, the pixel data against
highdicom's own encoding of the same frames, and every frame against the heatmap slice it
references. NIfTI is streamed through gzip; Secondary Captures are made one slice at a time.
"""

from __future__ import annotations

import gzip

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

import medcam
from medcam.data.synthetic import Geometry, rotation, write_dicom_series, write_enhanced_ct
from medcam.writers.dicom_common import DicomIdentity, attach_pixels, write_dataset
from medcam.writers.dicom_pm import build_parametric_map
from medcam.writers.dicom_seg import build_segmentation


def _geometry(shape) -> Geometry:
    r = rotation((10.0, -5.0, 20.0))
    return Geometry(shape, (0.7, 0.9, 2.5), (5.0, -3.0, 8.0), tuple(r[:, 0]), tuple(r[:, 1]))


@pytest.fixture(scope="module", params=["series", "enhanced"])
def source(request, tmp_path_factory):
    """An oblique source whose rows x columns (11 x 13) is not a multiple of 8 (binary frames
    share bytes) and whose frame count is odd (an 8-bit SEG needs a pad byte): a shuffled
    series, or a multi-frame object whose frames are stored out of slice order."""
    shape = (13, 11, 7)
    g = _geometry(shape)
    rng = np.random.default_rng(1)
    vol = rng.normal(0, 100, shape).astype(np.float32)
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "series":
        write_dicom_series(vol, g, folder / "s", shuffle=True)
        scan = medcam.load_scan(folder / "s")
    else:
        path = write_enhanced_ct(vol, g, folder / "mf.dcm", frame_order=[3, 0, 6, 2, 5, 1, 4])
        scan = medcam.load_scan(path)
    heat = rng.random(shape).astype(np.float32)
    return scan, heat


def _builders(scan, heat):
    peak = float(heat.max())
    return {
        "pm": lambda stream: build_parametric_map(
            heat, scan, method="gradcam", label="class1", identity=DicomIdentity.new(9001),
            stream=stream),
        "seg": lambda stream: build_segmentation(
            heat, scan, threshold=0.5 * peak, label="class1", method="gradcam",
            identity=DicomIdentity.new(9002), stream=stream),
        "fractional": lambda stream: build_segmentation(
            heat, scan, threshold=0.0, label="class1", method="gradcam", fractional=True,
            identity=DicomIdentity.new(9003), stream=stream),
    }  # fmt: skip


def _frames(ds) -> np.ndarray:
    return ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))


def _slice_of_frames(ds, scan) -> list[int]:
    where = {(str(src.SOPInstanceUID), f): z for z, (src, f) in enumerate(scan.slice_sources)}
    out = []
    for group in ds.PerFrameFunctionalGroupsSequence:
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        out.append(where[(str(ref.ReferencedSOPInstanceUID), frame)])
    return out


@pytest.mark.parametrize("kind", ["pm", "seg", "fractional"])
def test_streamed_file_is_the_complete_objects_file(source, kind, tmp_path):
    scan, heat = source
    ds, pixels = _builders(scan, heat)[kind](True)
    write_dataset(ds, pixels, tmp_path / "streamed.dcm")
    attach_pixels(ds, pixels)  # the same object, complete in memory, written by pydicom
    ds.save_as(tmp_path / "whole.dcm")
    assert (tmp_path / "streamed.dcm").read_bytes() == (tmp_path / "whole.dcm").read_bytes()


@pytest.mark.parametrize("kind", ["pm", "seg", "fractional"])
def test_every_frame_holds_the_map_of_the_slice_it_references(source, kind, tmp_path):
    scan, heat = source
    ds, pixels = _builders(scan, heat)[kind](True)
    write_dataset(ds, pixels, tmp_path / "x.dcm")
    back = pydicom.dcmread(tmp_path / "x.dcm")
    frames = _frames(back)
    peak = float(heat.max())
    for j, z in enumerate(_slice_of_frames(back, scan)):
        plane = heat[:, :, z].T
        if kind == "pm":
            expected = plane
        elif kind == "seg":
            expected = (plane >= 0.5 * peak).astype(np.uint8)
        else:  # highdicom's FRACTIONAL encoding: round(fraction * 255)
            expected = np.around(np.clip(plane / peak, 0, 1) * 255.0).astype(np.uint8)
        np.testing.assert_array_equal(frames[j], expected)


def test_pixel_data_is_highdicoms_own_encoding(tmp_path):
    """The same map given to highdicom whole (it packs bits across frame boundaries, scales
    fractions to 8 bits, orders frames its own way): every slice decodes to the same frame as
    medcam's streamed object, and the pixel data has the same length."""
    shape = (13, 11, 7)
    rng = np.random.default_rng(4)
    write_dicom_series(rng.normal(0, 100, shape).astype(np.float32), _geometry(shape), tmp_path,
                       shuffle=True)  # fmt: skip
    scan = medcam.load_scan(tmp_path)
    heat = rng.random(shape).astype(np.float32)
    peak = float(heat.max())
    frames = np.stack([heat[:, :, z].T for z in range(shape[2])])  # the series' slice order
    common = dict(source_images=list(scan.datasets), series_instance_uid=hd.UID(),
                  series_number=1, sop_instance_uid=hd.UID(), instance_number=1,
                  manufacturer="x", manufacturer_model_name="x", software_versions="0",
                  device_serial_number="0")  # fmt: skip
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="x",
        segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
        segmented_property_type=codes.DCM.GradientWeightedClassActivation,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )  # fmt: skip
    references = {
        "seg": hd.seg.Segmentation(pixel_array=(frames >= 0.5 * peak).astype(np.uint8),
                                   segmentation_type="BINARY", segment_descriptions=[segment],
                                   omit_empty_frames=False, **common),
        "fractional": hd.seg.Segmentation(pixel_array=np.clip(frames / peak, 0, 1),
                                          segmentation_type="FRACTIONAL",
                                          segment_descriptions=[segment],
                                          omit_empty_frames=False, **common),
        "pm": hd.pm.ParametricMap(
            pixel_array=frames, contains_recognizable_visual_features=False,
            real_world_value_mappings=[hd.pm.RealWorldValueMapping(
                lut_label="x", lut_explanation="x", unit=codes.UCUM.NoUnits,
                value_range=(0.0, 1.0), intercept=0.0, slope=1.0)],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5,
                                                             window_width=1.0)],
            **common),
    }  # fmt: skip
    for kind, reference in references.items():
        ds, pixels = _builders(scan, heat)[kind](True)
        write_dataset(ds, pixels, tmp_path / f"{kind}.dcm")
        ours = pydicom.dcmread(tmp_path / f"{kind}.dcm")
        assert len(ours[pixels.keyword].value) == len(reference[pixels.keyword].value), kind
        theirs = dict(zip(_slice_of_frames(reference, scan), _frames(reference), strict=True))
        for z, frame in zip(_slice_of_frames(ours, scan), _frames(ours), strict=True):
            np.testing.assert_array_equal(frame, theirs[z], err_msg=f"{kind}, slice {z}")


def test_heatmap_memory_layout_does_not_change_the_file(source, tmp_path):
    scan, heat = source
    paths = []
    for name, h in (("c", np.ascontiguousarray(heat)), ("f", np.asfortranarray(heat))):
        ds, pixels = build_parametric_map(h, scan, method="gradcam", label="class1",
                                          identity=DicomIdentity.new(1, seed="s"),
                                          stream=True)  # fmt: skip
        ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = "1.2.3"
        for item in ds.DimensionIndexSequence:
            item.DimensionOrganizationUID = "1.2.3"
        ds.InstanceCreationTime = ds.ContentTime = "120000"
        for item in ds.get("ContributingEquipmentSequence", []):
            item.pop("ContributionDateTime", None)
        write_dataset(ds, pixels, tmp_path / f"{name}.dcm")
        paths.append(tmp_path / f"{name}.dcm")
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize("shape", [(20, 30, 10), (20, 30)], ids=["3d", "2d"])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_nifti_is_nibabels_own_serialisation_streamed_through_gzip(tmp_path, layout, shape):
    from medcam.writers.nifti import heatmap_to_nifti, write_nifti_file

    heat = np.random.default_rng(0).random(shape).astype(np.float32)
    heat = np.asfortranarray(heat) if layout == "F" else np.ascontiguousarray(heat)
    img = heatmap_to_nifti(heat, np.diag([2.0, 2.0, 3.0, 1.0]))
    write_nifti_file(img, tmp_path / "a.nii.gz")
    raw = (tmp_path / "a.nii.gz").read_bytes()
    assert raw[4:8] == b"\x00\x00\x00\x00"  # gzip header without a time stamp: reproducible
    assert gzip.decompress(raw) == img.to_bytes()  # nibabel's own bytes for the image
    back = nib.load(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), heat)


def test_secondary_captures_one_at_a_time_equal_the_list():
    from medcam.writers.dicom_sc import build_secondary_captures, iter_secondary_captures

    shape = (13, 11, 4)
    g = _geometry(shape)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_dicom_series(np.random.default_rng(2).normal(0, 200, shape).astype(np.float32), g,
                           tmp)  # fmt: skip
        scan = medcam.load_scan(tmp)
        image = scan.image[0].numpy()
        heat = np.random.default_rng(3).random(shape).astype(np.float32)
        whole = build_secondary_captures(image, heat, scan, label="c", method="gradcam",
                                         series_number=1, uid_seed="s")  # fmt: skip
        one = list(iter_secondary_captures(image, heat, scan, label="c", method="gradcam",
                                           series_number=1, uid_seed="s",
                                           vmax=float(heat.max())))  # fmt: skip
    assert len(whole) == len(one) == shape[2]
    for a, b in zip(whole, one, strict=True):
        assert a.PixelData == b.PixelData and a.SOPInstanceUID == b.SOPInstanceUID


def test_blend_is_matplotlibs_colormap_over_the_image():
    import matplotlib

    from medcam.writers.figures import blend_rgb

    rng = np.random.default_rng(0)
    gray = rng.random((64, 48)).astype(np.float32)
    heat = rng.random((64, 48)).astype(np.float32) * 2
    h = np.clip(heat / 1.5, 0, 1)
    a = (0.4 * h)[..., None]
    reference = np.round(((1 - a) * gray[..., None] + a * matplotlib.colormaps["jet"](h)[..., :3])
                         * 255).astype(np.uint8)  # fmt: skip
    ours = blend_rgb(gray, heat, 1.5, 0.4)
    diff = np.abs(ours.astype(int) - reference)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float32 vs float64 rounding at .5


def test_window_from_a_subsample_matches_the_full_percentiles():
    from medcam.writers.figures import WINDOW_SAMPLES, window_limits

    rng = np.random.default_rng(0)
    small = rng.normal(0, 100, (50, 40, 30)).astype(np.float32)
    assert small.size <= WINDOW_SAMPLES
    assert window_limits(small) == tuple(float(v) for v in np.percentile(small, [1, 99]))
    big = np.asfortranarray(rng.normal(40, 300, (256, 256, 40)).astype(np.float32))
    big[:, :40] = -1000.0  # air
    lo, hi = window_limits(big)
    exact = np.percentile(big, [1, 99])
    assert abs(lo - exact[0]) < 0.01 * (exact[1] - exact[0])
    assert abs(hi - exact[1]) < 0.01 * (exact[1] - exact[0])
