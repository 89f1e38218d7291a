"""One visit of a patient: the scan, its heatmap on the scan's own grid, a date, provenance."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcam.errors import InputError

__all__ = ["Timepoint", "dicom_date"]

# provenance keys that must agree between visits for their heatmaps to be comparable
COMPARABLE = ("patient", "modality", "model", "layers", "method", "target", "normalization")


def dicom_date(datasets: list) -> datetime.date | None:
    """StudyDate (else AcquisitionDate, SeriesDate) of a DICOM series."""
    if not datasets:
        return None
    ds = datasets[0]
    for tag in ("StudyDate", "AcquisitionDate", "SeriesDate"):
        value = str(ds.get(tag, "") or "")
        if len(value) >= 8:
            return datetime.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    return None


def _as_date(value: Any) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    text = str(value).replace("-", "")
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except (ValueError, IndexError):
        raise InputError(f"Cannot read the date {value!r}; use YYYY-MM-DD.") from None


@dataclass
class Timepoint:
    """A visit.

    Attributes
    ----------
    image:
        ``(X, Y, Z)`` intensities (HU for CT), used for registration and pictures.
    affine_lps:
        Voxel-to-LPS affine of ``image`` and ``heatmap`` (they share the scan's grid).
    heatmap:
        ``(X, Y, Z)`` float heatmap on the scan's grid.
    date:
        Acquisition date.
    provenance:
        Patient id, modality, model hash, layers, method, target and normalisation: visits are
        compared only when these agree.
    probability:
        The model's probability for the explained class, when known.
    scan:
        The source :class:`~medcam.io.scan.Scan` (for DICOM outputs on the baseline series).
    """

    image: np.ndarray
    affine_lps: np.ndarray
    heatmap: np.ndarray
    date: datetime.date
    provenance: dict[str, Any] = field(default_factory=dict)
    probability: float | None = None
    label: str = ""
    scan: Any = None

    def __post_init__(self) -> None:
        self.date = _as_date(self.date)
        self.label = self.label or self.date.isoformat()
        if self.heatmap.shape != self.image.shape:
            raise InputError(
                f"Heatmap shape {self.heatmap.shape} differs from the image's {self.image.shape}; "
                "a visit's heatmap must be on its scan's grid."
            )

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine_lps[:3, :3]))) / 1000.0

    @classmethod
    def from_explanation(
        cls, explanation, *, date: Any = None, index: int = 0, model: Any = None, label: str = ""
    ) -> Timepoint:
        """A visit from a :class:`medcam.ScanExplanation` (map ``index`` of its K maps)."""
        from medcam.writers.outputs import model_identity

        scan = explanation.scan
        when = _as_date(date) if date is not None else dicom_date(scan.datasets)
        if when is None:
            raise InputError(
                "This scan carries no StudyDate/AcquisitionDate; give the visit's date "
                "(date='YYYY-MM-DD')."
            )
        ds = scan.datasets[0] if scan.datasets else {}
        cam = explanation.cam
        probs = explanation.probabilities()
        provenance = {
            "patient": str(ds.get("PatientID", "")) or None,
            "modality": str(ds.get("Modality", "")) or None,
            "model": model_identity(model)["state_dict_sha256"] if model is not None else None,
            "layers": list(cam.layers),
            "method": cam.method,
            "target": cam.target,
            "normalization": explanation.normalization.get("method"),
            "class": int(cam.classes[0, index]),
        }
        return cls(
            image=scan.image[0].detach().cpu().numpy(),
            affine_lps=scan.affine_lps,
            heatmap=explanation.heatmap[index].detach().cpu().numpy(),
            date=when,
            provenance=provenance,
            probability=None if probs is None else probs[index],
            label=label or when.isoformat(),
            scan=scan,
        )

    @classmethod
    def from_files(
        cls, scan: str | Path, heatmap: str | Path, *, date: Any = None, label: str = ""
    ) -> Timepoint:
        """A visit from a scan and a heatmap NIfTI on its grid (e.g. written by medcam; its JSON
        sidecar, if beside it, supplies the provenance)."""
        import json

        import nibabel as nib

        from medcam.io.scan import load_scan

        s = load_scan(scan)
        img = nib.load(str(heatmap))
        heat = np.asarray(img.dataobj, dtype=np.float32)
        if heat.shape != s.spatial_shape or not np.allclose(img.affine, s.affine_ras, atol=1e-3):
            raise InputError(
                f"The heatmap {Path(heatmap).name} is not on the grid of its scan (shape "
                f"{heat.shape} vs {s.spatial_shape}, or a different affine); write heatmaps on "
                "the source grid (medcam does)."
            )
        when = _as_date(date) if date is not None else dicom_date(s.datasets)
        if when is None:
            raise InputError(f"No date for {Path(scan).name}: give one (YYYY-MM-DD).")
        provenance: dict[str, Any] = {}
        sidecars = list(Path(heatmap).parent.glob("*.json"))
        if len(sidecars) == 1:
            record = json.loads(sidecars[0].read_text())
            exp = record.get("explanation", {})
            provenance = {
                "model": (record.get("model") or {}).get("state_dict_sha256"),
                "layers": exp.get("layers"),
                "method": exp.get("method"),
                "target": exp.get("target"),
                "normalization": (exp.get("normalization") or {}).get("method"),
            }
        ds = s.datasets[0] if s.datasets else {}
        provenance["patient"] = str(ds.get("PatientID", "")) or None
        provenance["modality"] = str(ds.get("Modality", "")) or None
        return cls(s.image[0].numpy(), s.affine_lps, heat, when, provenance, None,
                   label or when.isoformat(), s)  # fmt: skip
