"""A series folder with a damaged file is refused with the file's name, never explained from
the files that remain; files that are not DICOM images (notes, OS litter, reports) are ignored.

One test per class of damage (a file that claims to be DICOM by its preamble, by a DICOM
extension, or by the other images' naming, and cannot be read), each at the first, a middle and
the last slice: the reader must not depend on where the gap is (a missing last slice leaves no
gap in the slice spacing)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import medcam
from medcam.data.synthetic import Geometry, write_dicom_series

N = 8


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series") / "ct"
    vol = np.arange(10 * 9 * N, dtype=np.float32).reshape(10, 9, N)
    info = write_dicom_series(vol, Geometry((10, 9, N), (1.0, 1.0, 2.5)), folder)
    return info, vol


def _copy(series, tmp_path, rename=None):
    info, _ = series
    dest = tmp_path / "case"
    shutil.copytree(info.folder, dest)
    files = [dest / f.name for f in info.files]  # in slice order
    if rename is not None:
        files = [f.rename(f.with_name(rename(k))) for k, f in enumerate(files)]
    return dest, files


def _truncate(keep):
    return lambda data: data[: keep(len(data))]


DAMAGE = {
    # pydicom reads these without an error (and without PixelData): a header cut short
    "header cut after the preamble": _truncate(lambda n: 200),
    "cut inside the header": _truncate(lambda n: n // 3),
    "cut inside the pixel data": _truncate(lambda n: n - 100),
    # pydicom refuses these
    "empty file": _truncate(lambda n: 0),
    "cut inside the preamble": _truncate(lambda n: 100),
    "random bytes": lambda data: os.urandom(len(data)),
    "preamble then random bytes": lambda data: bytes(128) + b"DICM" + os.urandom(300),
}


@pytest.mark.parametrize("where", [0, N // 2, N - 1], ids=["first", "middle", "last"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_named(series, tmp_path, damage, where):
    folder, files = _copy(series, tmp_path)
    bad = files[where]
    bad.write_bytes(DAMAGE[damage](bad.read_bytes()))
    with pytest.raises(medcam.InputError) as err:
        medcam.load_scan(folder)
    assert bad.name in str(err.value)
    assert "missing slice" not in str(err.value)


@pytest.mark.parametrize("where", [0, N - 1], ids=["first", "last"])
def test_a_damaged_file_without_extension_is_named_by_its_siblings_naming(series, tmp_path, where):
    """Files named IM000001, IM000002, ...: a binary file named like them is a damaged image;
    a binary file named otherwise (a viewer's VERSION file) is not."""
    folder, files = _copy(series, tmp_path, rename=lambda k: f"IM{k + 1:06d}")
    (folder / "VERSION").write_bytes(os.urandom(64))
    assert medcam.load_scan(folder).spatial_shape == (10, 9, N)
    files[where].write_bytes(os.urandom(300))
    with pytest.raises(medcam.InputError, match=files[where].name):
        medcam.load_scan(folder)


def test_files_that_are_not_dicom_images_are_ignored(series, tmp_path):
    """Notes, OS litter, a binary file named unlike the images and a complete structured
    report beside the slices: the series loads, voxel for voxel."""
    folder, _ = _copy(series, tmp_path)
    (folder / "README").write_text("Series exported 2026-01-01 ü\n")
    (folder / "notes.txt").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(os.urandom(256))
    (folder / "._slice_0000.dcm").write_bytes(os.urandom(256))  # macOS AppleDouble
    (folder / "Thumbs.db").write_bytes(os.urandom(256))
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report.dcm")
    assert "PixelData" not in pydicom.dcmread(folder / "report.dcm")
    scan = medcam.load_scan(folder)
    np.testing.assert_array_equal(scan.image[0].numpy(), series[1])


def test_a_damaged_single_file_says_so(series, tmp_path):
    _, files = _copy(series, tmp_path)
    files[0].write_bytes(files[0].read_bytes()[:300])
    with pytest.raises(medcam.InputError, match="without pixel data"):
        medcam.load_scan(files[0])


def test_an_unreadable_file_is_named(series, tmp_path, monkeypatch):
    """A slice the process may not read (permissions, an I/O error): simulated, as root reads
    any file."""
    import builtins
    import errno

    folder, files = _copy(series, tmp_path)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(files[3]):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(medcam.InputError, match=f"{files[3].name} cannot be opened"):
        medcam.load_scan(folder)
