"""DICOM cases the conformance and viewer tests share, each built once per session.

- ``demo_case``: what ``medcam demo`` writes (synthetic oblique CT series, PM, SEG, SC), plus a
  FRACTIONAL SEG of the same heatmap.
- ``ct5n_case``: pydicom's real 5-slice CT series (a bright voxel added), explained by
  IntensityCAM and written in every DICOM format.
- ``enhanced_case``: one multi-frame CT (Legacy Converted Enhanced CT) whose frames are stored
  out of slice order, oblique and anisotropic, explained and written in every DICOM format.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import ScaleIntensityRange
from pydicom.data import get_testdata_file

import medcam
from medcam.data.synthetic import Geometry, blob_phantom, rotation, write_enhanced_ct
from tests.conftest import IntensityCAM


@dataclass
class Case:
    """A source, its scan and heatmap, and the DICOM objects written from them."""

    sources: list[Path]
    scan: object
    heatmap: np.ndarray  # (X, Y, Z) on the source grid
    pm: Path
    seg: Path
    seg_threshold: float
    seg_fractional: Path
    sc: list[Path] = field(default_factory=list)


def _fractional(scan, heat: np.ndarray, path: Path) -> Path:
    from medcam.writers.dicom_common import DicomIdentity
    from medcam.writers.dicom_seg import build_segmentation

    seg = build_segmentation(
        heat, scan, threshold=0.0, label="class1", method="gradcam", fractional=True,
        identity=DicomIdentity.new(9102),
    )  # fmt: skip
    seg.save_as(path)
    return path


def _write_all(explanation, out: Path, sources: list[Path]) -> Case:
    written = medcam.write_outputs(explanation, out, ["dicom-pm", "dicom-seg", "dicom-sc"])
    heat = explanation.heatmap[0].numpy()
    scan = explanation.scan
    return Case(
        sources=sources,
        scan=scan,
        heatmap=heat,
        pm=written["dicom-pm"][0],
        seg=written["dicom-seg"][0],
        seg_threshold=0.5 * float(heat.max()),  # write_outputs' default seg_threshold
        seg_fractional=_fractional(scan, heat, out / "fractional_seg.dcm"),
        sc=sorted(written["dicom-sc"][0].iterdir()),
    )


@pytest.fixture(scope="session")
def demo_case(tmp_path_factory) -> Case:
    from medcam.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(out, log=lambda _: None)
    scan = medcam.load_scan(out / "inputs" / "dicom")
    cls = out / "classifier"  # the classifier's case: every output format

    def one(pattern: str) -> Path:
        (path,) = cls.glob(pattern)
        return path

    heat = np.asarray(nib.load(one("*.nii.gz")).dataobj)
    return Case(
        sources=sorted((out / "inputs" / "dicom").iterdir()),
        scan=scan,
        heatmap=heat,
        pm=one("*_pm.dcm"),
        seg=one("*_seg.dcm"),
        seg_threshold=0.5 * float(heat.max()),
        seg_fractional=_fractional(scan, heat, out / "fractional_seg.dcm"),
        sc=sorted(one("*_sc").iterdir()),
    )


@pytest.fixture(scope="session")
def ct5n_case(tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp("ct5n")
    folder = root / "ct5n"
    shutil.copytree(get_testdata_file("dicomdirtests/98892001/CT5N/"), folder)
    for k, ds in enumerate(medcam.load_scan(folder).datasets):  # a bright voxel on slice 2
        full = pydicom.dcmread(ds.filename)
        pixels = full.pixel_array.copy()
        if k == 2:
            pixels[6, 9] = 3000
        full.PixelData = pixels.astype(full.pixel_array.dtype).tobytes()
        full.save_as(ds.filename)
    scan = medcam.load_scan(folder)
    top = float(scan.image.max())
    ex = medcam.explain_scan(
        IntensityCAM().eval(), scan, target=0, layers="conv",
        preprocess=ScaleIntensityRange(top - 100, top, 0, 1, clip=True),
    )  # fmt: skip
    return _write_all(ex, root / "out", sorted(folder.iterdir()))


ENHANCED_FRAME_ORDER = [5, 0, 7, 3, 1, 8, 6, 2, 4]  # frame f holds slice ENHANCED_FRAME_ORDER[f-1]


@pytest.fixture(scope="session")
def enhanced_case(tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp("enhanced")
    r = rotation((8, -6, 15))
    g = Geometry((28, 24, 9), (1.2, 1.0, 2.5), (-15.0, -12.0, 4.0), tuple(r[:, 0]), tuple(r[:, 1]))
    centre = g.affine_lps[:3] @ [17.0, 9.0, 5.0, 1.0]
    vol = blob_phantom(g, centre, 4.0, body_radius_mm=40)
    path = write_enhanced_ct(vol, g, root / "enhanced.dcm", frame_order=ENHANCED_FRAME_ORDER)
    ex = medcam.explain_scan(
        IntensityCAM().eval(), path, target=0, layers="conv",
        preprocess=ScaleIntensityRange(100.0, 300.0, 0.0, 1.0, clip=True),
    )  # fmt: skip
    return _write_all(ex, root / "out", [path])
