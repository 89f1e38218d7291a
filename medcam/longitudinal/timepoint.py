"""One visit of a patient: the scan, its heatmap on the scan's own grid, a date, provenance."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcam.errors import InputError

__all__ = ["Timepoint", "dicom_date", "parse_date"]

# provenance keys that must agree between visits for their heatmaps to be comparable
COMPARABLE = ("patient", "modality", "model", "layers", "method", "target", "normalization")


_ISO = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_DICOM = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def parse_date(value: Any, visit: str = "") -> datetime.date:
    """A visit date from a ``date``/``datetime``, an ISO 8601 ``YYYY-MM-DD`` or a DICOM DA
    ``YYYYMMDD`` string; anything else (``2020-1-25``, ``25/01/2020``) is refused.

    Raises
    ------
    InputError
        Naming ``visit`` and the value, so the user knows which row or series to fix.
    """
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    text = str(value).strip()
    match = _ISO.match(text) or _DICOM.match(text)
    where = f"visit {visit!r}" if visit else "a visit"
    if match is None:
        raise InputError(
            f"Cannot read the date {str(value)!r} of {where}: use YYYY-MM-DD (ISO 8601, e.g. "
            "2020-01-25) or YYYYMMDD (DICOM)."
        )
    try:
        return datetime.date(*(int(g) for g in match.groups()))
    except ValueError as err:
        raise InputError(f"The date {text!r} of {where} does not exist ({err}).") from None


def dicom_date(datasets: list, visit: str = "") -> datetime.date | None:
    """StudyDate (else AcquisitionDate, SeriesDate) of a DICOM series; ``None`` if none is set.

    A malformed value raises :class:`InputError` naming the tag and ``visit``.
    """
    if not datasets:
        return None
    ds = datasets[0]
    for tag in ("StudyDate", "AcquisitionDate", "SeriesDate"):
        value = str(ds.get(tag, "") or "").strip()
        if value:
            return parse_date(value, f"{visit} ({tag})" if visit else tag)
    return None


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
        self.date = parse_date(self.date, self.label)
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
        name = label or (scan.source.name if scan.source is not None else "")
        when = parse_date(date, name) if date is not None else dicom_date(scan.datasets, name)
        if when is None:
            raise InputError(
                f"The scan of visit {name!r} carries no StudyDate/AcquisitionDate; give the "
                "visit's date (date='YYYY-MM-DD')."
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
        name = label or Path(scan).name
        when = parse_date(date, name) if date is not None else dicom_date(s.datasets, name)
        if when is None:
            raise InputError(f"No date for visit {name!r}: give one (YYYY-MM-DD).")
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
