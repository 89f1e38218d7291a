"""Loading a scan: NIfTI, a DICOM series folder, a single 2D DICOM, PNG/JPEG, or a MetaTensor."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcam.errors import InputError

__all__ = ["Scan", "load_scan"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Scan:
    """A loaded scan in MONAI's convention, with what the writers need to go back to it.

    Attributes
    ----------
    image:
        ``monai.data.MetaTensor`` ``(C, *spatial)`` float32, channel-first; ``image.affine`` is
        the voxel-to-RAS-mm affine (4x4), ``image.meta`` carries ``filename_or_obj``,
        ``original_affine`` and ``spatial_shape`` as MONAI's ``LoadImage`` would.
    kind:
        ``"nifti"``, ``"dicom-series"`` (a DICOM volume: a slice series or an Enhanced
        multi-frame object), ``"dicom-mosaic"`` (a Siemens MOSAIC, unpacked to 3D: a volume, but
        not one DICOM viewers can overlay a derived object on), ``"dicom-2d"``, ``"image-2d"``
        or ``"tensor"``.
    source:
        The path that was read (``None`` for tensors).
    datasets:
        For DICOM: the pydicom headers (no pixel data), sorted along the slice normal, in the
        order of the last spatial axis.
    sha256:
        Hash of the input's bytes (files in sorted order), to identify it without its name.
    nifti_codes:
        ``(sform_code, qform_code)`` of a NIfTI source, reused when writing NIfTI.
    dicom_layout:
        For DICOM: ``"series"`` (one file per slice), ``"enhanced"`` (one Enhanced CT/MR/PET
        multi-frame object), ``"mosaic"`` (one Siemens MOSAIC image, unpacked) or ``"2d"``.
    source_frames:
        For an ``enhanced`` source: the 1-based frame number of each slice of the last spatial
        axis (slices are sorted along the normal, frames need not be).
    """

    image: Any
    kind: str
    source: Path | None = None
    datasets: list = field(default_factory=list)
    sha256: str = ""
    nifti_codes: tuple[int, int] | None = None
    dicom_layout: str = ""
    source_frames: list[int] | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 float64 voxel-to-RAS affine."""
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def affine_lps(self) -> np.ndarray:
        return LPS_TO_RAS @ self.affine_ras

    @property
    def has_frame_of_reference(self) -> bool:
        return bool(self.datasets) and "FrameOfReferenceUID" in self.datasets[0]

    @property
    def slice_sources(self) -> list[tuple[Any, int | None]]:
        """For DICOM volumes: ``(dataset, frame number or None)`` of each slice, in slice order.

        A series gives one dataset per slice; an Enhanced object gives its frame numbers; a
        MOSAIC gives the one image for every slice (its tiles have no identity of their own).
        """
        if self.kind == "dicom-mosaic":
            return [(self.datasets[0], None)] * int(self.spatial_shape[-1])
        if self.source_frames is not None:
            return [(self.datasets[0], f) for f in self.source_frames]
        return [(ds, None) for ds in self.datasets]

    @property
    def input_files(self) -> list[Path]:
        """Every file that was read (outputs must never replace one of these)."""
        if self.kind == "dicom-series":
            return [Path(ds.filename) for ds in self.datasets]
        return [self.source] if self.source is not None else []


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _metatensor(
    array: np.ndarray, affine_ras: np.ndarray, source: Path | None, channel_first: bool = False
):
    from monai.data import MetaTensor

    arr = np.asarray(array, dtype=np.float32)
    if not channel_first:
        arr = arr[None]
    meta = {
        "filename_or_obj": str(source) if source is not None else "",
        "original_affine": affine_ras.copy(),
        "spatial_shape": np.asarray(arr.shape[1:]),
        "space": "RAS",
        "original_channel_dim": "no_channel",
    }
    tensor = torch.from_numpy(np.ascontiguousarray(arr))
    return MetaTensor(tensor, affine=torch.as_tensor(affine_ras), meta=meta)


def _check_finite(image, where: str) -> None:
    bad = ~torch.isfinite(torch.as_tensor(image))
    if bool(bad.any()):
        raise InputError(
            f"{where} contains {int(bad.sum())} NaN/infinite voxels; the heatmap would be "
            "meaningless. Fix the volume (e.g. replace them with the background value)."
        )


def load_scan(source: str | Path | Any) -> Scan:
    """Load a scan for explanation.

    Parameters
    ----------
    source:
        A NIfTI file (``.nii``/``.nii.gz``), a folder holding one DICOM series, a single DICOM
        file (2D: CR/DX or one slice; 3D: an Enhanced CT/MR/PET multi-frame object or a Siemens
        MOSAIC), a PNG/JPEG, or a ``monai.data.MetaTensor`` ``(C, *spatial)`` (e.g. from
        ``LoadImage(ensure_channel_first=True)``).

    Returns
    -------
    Scan
        ``scan.image: (C, X, Y[, Z])`` MetaTensor with its RAS affine.

    Raises
    ------
    InputError
        Missing path, unsupported format, inconsistent DICOM series, NaN/Inf voxels.
    """
    from monai.data import MetaTensor

    if isinstance(source, MetaTensor):
        if source.ndim not in (3, 4):
            raise InputError(
                f"A MetaTensor scan must be channel-first (C, *spatial); got shape "
                f"{tuple(source.shape)}. Use LoadImage(ensure_channel_first=True)."
            )
        _check_finite(source, "The MetaTensor")
        digest = hashlib.sha256(source.detach().cpu().numpy().tobytes()).hexdigest()
        return Scan(source.float(), "tensor", None, [], digest)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    name = path.name.lower()
    if path.is_dir():
        from medcam.io.dicom import read_dicom_series

        vol = read_dicom_series(path)
        files = [Path(ds.filename) for ds in vol.datasets]
        scan = _from_dicom(vol, path if vol.layout == "series" else files[0])
        scan.sha256 = _hash_files(files)
    elif name.endswith(NIFTI_SUFFIXES):
        scan = _load_nifti(path)
    elif name.endswith(IMAGE_SUFFIXES):
        scan = _load_picture(path)
    else:
        from medcam.io.dicom import read_dicom_file

        scan = _from_dicom(read_dicom_file(path), path)
        scan.sha256 = _hash_files([path])
    _check_finite(scan.image, str(path))
    return scan


def _from_dicom(vol, path: Path) -> Scan:
    kind = "dicom-2d" if vol.array.ndim == 2 else "dicom-series"
    if vol.layout == "mosaic":
        kind = "dicom-mosaic"
    if vol.affine_lps is None:
        affine_ras = np.eye(4)
    else:
        affine_ras = LPS_TO_RAS @ vol.affine_lps
    scan = Scan(_metatensor(vol.array, affine_ras, path), kind, path, vol.datasets)
    scan.dicom_layout, scan.source_frames = vol.layout, vol.frames
    return scan


def _load_nifti(path: Path) -> Scan:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise InputError(f"Cannot read NIfTI file {path}: {err}") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise InputError(
            f"{path} has shape {data.shape}; medcam explains one 2D or 3D image per file. "
            "Split 4D series into volumes first."
        )
    _, sform_code = img.header.get_sform(coded=True)
    _, qform_code = img.header.get_qform(coded=True)
    scan = Scan(_metatensor(data, img.affine, path), "nifti", path)
    scan.nifti_codes = (int(sform_code), int(qform_code))
    scan.sha256 = _hash_files([path])
    return scan


def _load_picture(path: Path) -> Scan:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB") if im.mode not in ("L", "I", "I;16", "F") else im
            arr = np.asarray(im, dtype=np.float32)
    except Exception as err:
        raise InputError(f"Cannot read image {path}: {err}") from err
    # (H, W[, 3]) -> channel-first (C, X=W, Y=H), as MONAI's PILReader
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    arr = np.swapaxes(arr, 1, 2)
    scan = Scan(_metatensor(arr, np.eye(4), path, channel_first=True), "image-2d", path)
    scan.sha256 = _hash_files([path])
    return scan
