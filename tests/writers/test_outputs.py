"""Output safety, the 2D paths, Secondary Capture, SEG variants and the JSON sidecar."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose, Lambda, Spacing
from pydicom.uid import generate_uid

import medcam
from medcam.data.synthetic import Geometry, blob_phantom, write_dicom_series
from medcam.io.output import OutputDir, safe_name
from medcam.writers import case_name
from tests.conftest import IntensityCAM


@pytest.fixture
def series(tmp_path):
    g = Geometry((20, 18, 8), (1.5, 1.5, 3.0), (-15.0, -12.0, 0.0))
    vol = blob_phantom(g, g.affine_lps[:3] @ [10, 9, 4, 1], 4.0, body_radius_mm=40)
    info = write_dicom_series(vol, g, tmp_path / "series", series_description="../../evil")
    return tmp_path / "series", info


def _explain(folder, model=None):
    from monai.transforms import ScaleIntensityRange

    return medcam.explain_scan(
        model or IntensityCAM().eval(),
        folder,
        preprocess=ScaleIntensityRange(100.0, 300.0, 0.0, 1.0, clip=True),
        target=0,
        layers="conv",
    )


def test_bad_format_requests_write_nothing(tmp_path):
    nifti_scan = tmp_path / "x.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.float32), np.eye(4)), nifti_scan)
    ex = medcam.explain_scan(IntensityCAM().eval(), nifti_scan, target=0, layers="conv")
    out = tmp_path / "out"
    for formats, match in [
        (["nifti", "dicom-pm"], "DICOM source series"),
        (["png", "dicom-sc"], "not DICOM"),
        (["nifti", "mp4"], "Unknown output format"),
    ]:
        with pytest.raises(medcam.MedcamError, match=match):
            medcam.write_outputs(ex, out, formats)
        assert not out.exists() or not any(out.iterdir())


def test_unwritable_output_folder(tmp_path, series):
    folder, _ = series
    ex = _explain(folder)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(medcam.OutputError, match="Cannot write to the output folder"):
        medcam.write_outputs(ex, blocker / "out", ["nifti"])


def test_inputs_are_never_replaced(tmp_path, series):
    folder, info = series
    out = OutputDir(folder, [info.files[0]])
    with pytest.raises(medcam.OutputError, match="one of the input files"):
        out.target(info.files[0].name)
    with pytest.raises(medcam.OutputError, match="plain file name"):
        out.target("../escape.nii.gz")
    ex = _explain(folder)
    before = {p: p.read_bytes() for p in info.files}
    medcam.write_outputs(ex, folder, ["nifti", "json"])  # output into the input folder is fine
    assert {p: p.read_bytes() for p in info.files} == before
    assert not list(folder.glob(".*tmp*"))  # no temporary files left behind


def test_tag_based_names_cannot_escape(series, tmp_path):
    folder, _ = series
    ex = _explain(folder)
    stem = case_name(ex.scan, "{SeriesDescription}_{PatientID}")
    assert "/" not in stem and ".." not in stem and stem == "evil_MEDCAM-PHANTOM"
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("..") == "unnamed"
    written = medcam.write_outputs(ex, tmp_path / "out", ["nifti"], case=stem)
    assert written["nifti"][0].parent == tmp_path / "out" / stem  # the case folder
    with pytest.raises(medcam.MedcamError, match="no 'Nope' tag"):
        case_name(ex.scan, "{Nope}")


def test_default_names_hold_no_identifiers(series, tmp_path):
    folder, _ = series
    ex = _explain(folder)
    written = medcam.write_outputs(ex, tmp_path / "out", ["nifti", "json", "png"])
    names = [p.name for paths in written.values() for p in paths]
    assert all(name.startswith("case-") for name in names)
    assert not any("MEDCAM-PHANTOM" in n or "Phantom" in n for n in names)


def test_json_sidecar(series, tmp_path):
    folder, _ = series
    model = IntensityCAM().eval()
    ex = _explain(folder, model)
    written = medcam.write_outputs(ex, tmp_path / "out", ["nifti", "json"], model=model)
    record = json.loads(written["json"][0].read_text())
    assert record["input"]["sha256"] == ex.scan.sha256 and record["input"]["kind"] == "dicom-series"
    assert record["model"]["parameters"] == 6 and len(record["model"]["state_dict_sha256"]) == 64
    exp = record["explanation"]
    assert exp["layers"] == ["conv"] and exp["feature_shapes"] == {"conv": [20, 18, 8]}
    assert exp["method"] == "gradcam" and exp["normalization"] == {"method": "none"}
    assert exp["classes"] == [[0]] and exp["target_labels"] == ["class0"]
    assert record["outputs"]["files"]["nifti"] == [written["nifti"][0].name]
    assert {"torch", "monai", "highdicom"} <= set(record["versions"])


def test_secondary_capture_series(series, tmp_path):
    folder, info = series
    ex = _explain(folder)
    written = medcam.write_outputs(ex, tmp_path / "out", ["dicom-sc"])
    files = sorted(written["dicom-sc"][0].iterdir())
    assert len(files) == 8
    sc = pydicom.dcmread(files[4])
    src = pydicom.dcmread(info.files[0])
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert (
        sc.StudyInstanceUID == src.StudyInstanceUID
        and sc.SeriesInstanceUID != src.SeriesInstanceUID
    )
    assert len({pydicom.dcmread(f).SeriesInstanceUID for f in files}) == 1
    rgb = sc.pixel_array
    assert rgb.shape == (18, 20, 3)
    # the blob (heat) is coloured: red != green != blue there; plain gray elsewhere
    assert rgb[9, 10, 0] != rgb[9, 10, 2]
    assert rgb[0, 0, 0] == rgb[0, 0, 1] == rgb[0, 0, 2]


def test_fractional_seg(series, tmp_path):
    folder, _ = series
    ex = _explain(folder)
    written = medcam.write_outputs(ex, tmp_path / "out", ["dicom-seg"], fractional_seg=True)
    seg = pydicom.dcmread(written["dicom-seg"][0])
    assert seg.SegmentationType == "FRACTIONAL" and seg.NumberOfFrames == 8
    assert int(seg.pixel_array.max()) == 255


def _radiograph(folder):
    """A DX image without frame of reference, with a bright square."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "DX1", "X^Y", "DX"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ds.PatientSex = ""
    ds.PatientOrientation = ["L", "F"]
    pixels = np.full((40, 32), 100, np.uint16)
    pixels[10:16, 20:26] = 1000
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 40, 32, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "dx.dcm", enforce_file_format=True)
    return folder / "dx.dcm"


def test_radiograph_gets_secondary_capture_not_parametric_map(tmp_path):
    path = _radiograph(tmp_path / "in")
    model = IntensityCAM(spatial_dims=2).eval()
    from monai.transforms import ScaleIntensityRange

    ex = medcam.explain_scan(
        model, path, preprocess=ScaleIntensityRange(500, 1000, 0, 1, clip=True), target=0,
        layers="conv",
    )  # fmt: skip
    assert ex.heatmap.shape == (1, 32, 40)  # (K, X=columns, Y=rows)
    peak = np.unravel_index(int(ex.heatmap[0].argmax()), (32, 40))
    assert 20 <= peak[0] < 26 and 10 <= peak[1] < 16
    with pytest.raises(medcam.MedcamError, match="Secondary Capture"):
        medcam.write_outputs(ex, tmp_path / "out", ["dicom-pm"])
    written = medcam.write_outputs(ex, tmp_path / "out", ["dicom-sc", "png"])
    sc = pydicom.dcmread(next(written["dicom-sc"][0].iterdir()))
    assert sc.pixel_array.shape == (40, 32, 3) and sc.BurnedInAnnotation == "YES"
    assert list(sc.PatientOrientation) == ["L", "F"]


def test_png_input_with_2d_model(tmp_path):
    from PIL import Image

    pixels = np.full((24, 36), 10, np.uint8)  # (H, W)
    pixels[5:9, 25:30] = 250
    Image.fromarray(pixels).save(tmp_path / "x.png")
    model = IntensityCAM(spatial_dims=2).eval()
    from monai.transforms import ScaleIntensityRange

    ex = medcam.explain_scan(
        model, tmp_path / "x.png", preprocess=ScaleIntensityRange(100, 250, 0, 1, clip=True),
        target=0, layers="conv",
    )  # fmt: skip
    x, y = np.unravel_index(int(ex.heatmap[0].argmax()), ex.heatmap[0].shape)
    assert 25 <= x < 30 and 5 <= y < 9
    written = medcam.write_outputs(ex, tmp_path / "out", ["png", "json"])
    assert written["png"][0].read_bytes()[:4] == b"\x89PNG"


def test_non_invertible_spatial_preprocessing_is_explained(series):
    folder, _ = series
    crop = Lambda(lambda t: t[:, 2:-2, 2:-2])  # changes the grid without recording it
    with pytest.raises(medcam.MedcamError, match="not invertible"):
        medcam.explain_scan(
            IntensityCAM().eval(), folder, preprocess=Compose([crop]), layers="conv"
        )


def test_spacing_only_preprocessing_inverts_exactly_on_the_grid(series):
    folder, _ = series
    ex = medcam.explain_scan(
        IntensityCAM().eval(), folder, preprocess=Spacing((3.0, 3.0, 3.0)), target=0,
        layers="conv", normalize="minmax",
    )  # fmt: skip
    assert ex.heatmap.shape == (1, 20, 18, 8)
    assert ex.normalization["method"] == "minmax" and float(ex.heatmap.max()) == 1.0
    assert torch.isfinite(ex.heatmap).all()
