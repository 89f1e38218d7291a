"""Known-answer patient series for the longitudinal tests (and the benchmark).

Anatomy and findings are defined in patient coordinates (LPS mm); each visit places the patient
in the scanner with a known motion (rigid, optionally with a scale: a "rescaled" visit, as from a
wrong pixel spacing) on its own anisotropic grid. Heatmaps are spheres of known radius (value 1
inside, the edge smoothed over one voxel) at known positions, optionally over a uniform diffuse
background, so volumes, centroids and statuses have closed-form answers.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medcam.data.synthetic import Geometry, rigid_motion, sphere_heatmap, torso_phantom
from medcam.longitudinal import Timepoint

BASE_DATE = datetime.date(2026, 1, 5)


def scaled(motion: np.ndarray | None, factor: float) -> np.ndarray:
    """``motion`` after scaling the patient by ``factor`` about the origin."""
    s = np.diag([factor, factor, factor, 1.0])
    return (np.eye(4) if motion is None else motion) @ s


@dataclass
class Visit:
    """One visit: days after baseline, grid, motion (patient -> scanner), findings present."""

    days: int
    geometry: Geometry
    motion: np.ndarray | None = None
    # finding name -> (centre in patient LPS mm, radius mm); absent findings are left out
    findings: dict[str, tuple[tuple[float, float, float], float]] = field(default_factory=dict)
    diffuse: float = 0.0  # heatmap value added everywhere inside the body
    blank: bool = False  # image replaced by 0 HU + noise (a failed acquisition / wrong series)
    peak: float = 1.0  # heatmap value inside the findings

    @property
    def date(self) -> datetime.date:
        return BASE_DATE + datetime.timedelta(days=self.days)


def truth_volume_ml(radius_mm: float) -> float:
    return 4 / 3 * np.pi * radius_mm**3 / 1000


def build(visits: Sequence[Visit], *, patient: str = "P1", probabilities=None) -> list[Timepoint]:
    """Timepoints for ``visits``: torso image + heatmap of the findings on each visit's grid."""
    out = []
    for i, v in enumerate(visits):
        g = v.geometry
        lesions = list(v.findings.values())
        image = torso_phantom(g, v.motion, lesions[0][0] if lesions else (-45.0, -10.0, 15.0),
                              lesions[0][1] if lesions else 0.0, seed=i)  # fmt: skip
        heat = np.zeros(g.shape, np.float32)
        for centre, radius in lesions:
            heat = np.maximum(heat, v.peak * sphere_heatmap(g, centre, radius, v.motion))
        if v.diffuse:
            heat = np.maximum(heat, np.float32(v.diffuse) * (image > -500))
        if v.blank:
            image = np.random.default_rng(100 + i).normal(0, 10, g.shape).astype(np.float32)
        prob = None if probabilities is None else probabilities[i]
        out.append(
            Timepoint(
                image,
                g.affine_lps,
                heat,
                v.date,
                {"patient": patient, "method": "gradcam"},
                probability=prob,
            )
        )
    return out


def grid(i: int, n: int = 64, spacing: float = 5.0) -> Geometry:
    """An anisotropic grid covering the torso phantom; ``i`` varies spacing and origin."""
    sp = [(1.0, 0.9, 1.15), (0.95, 1.05, 1.1), (1.05, 0.95, 1.2), (1.0, 1.0, 1.05)][i % 4]
    spacing_mm = tuple(spacing * s for s in sp)
    extent = np.array(spacing_mm) * (np.array([n, n, n]) - 1)
    shift = [(0, 0, 0), (6, -8, 5), (-7, 5, -9), (4, 7, -6)][i % 4]
    origin = tuple(-extent / 2 + np.array(shift))
    return Geometry((n, n, n), spacing_mm, origin)


MOTIONS = [
    None,
    rigid_motion((12, -5, 6), (15, -10, 8)),  # 14 degrees, 20 mm
    rigid_motion((-8, 10, -9), (-20, 25, -15)),  # 16 degrees, 35 mm
    rigid_motion((5, 8, -14), (10, 30, -20)),  # 17 degrees, 37 mm
]


def sphere_on(affine_lps: np.ndarray, shape, centre, radius_mm: float) -> np.ndarray:
    """The phantom heatmap of one finding (1 inside, edge smoothed over one voxel) on any grid
    given by its voxel-to-LPS affine: for scans read back from DICOM or NIfTI."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    pts = idx @ affine_lps[:3, :3].T + affine_lps[:3, 3]
    dist = np.linalg.norm(pts - np.asarray(centre, float), axis=-1)
    edge = float(np.sqrt((affine_lps[:3, :3] ** 2).sum(axis=0)).min())
    return np.clip((radius_mm + edge / 2 - dist) / edge, 0, 1).astype(np.float32)


def dicom_visits(root, visits: Sequence[Visit], *, strip: Sequence[str] = ()):
    """Write each visit as a CT series (its own study, StudyDate = the visit's date) and return
    ``(folders, timepoints)``; the timepoints hold the loaded scans and the findings' heatmaps.
    ``strip``: attributes deleted from the first visit's files (e.g. PatientBirthDate)."""
    from pathlib import Path

    import pydicom

    from medcam.data.synthetic import write_dicom_series
    from medcam.io.scan import load_scan

    folders, tps = [], []
    for i, v in enumerate(visits):
        lesions = list(v.findings.values())
        first = lesions[0] if lesions else ((-45.0, -10.0, 15.0), -100.0)
        hu = torso_phantom(v.geometry, v.motion, first[0], first[1], seed=i)
        folder = Path(root) / f"visit{i}"
        write_dicom_series(hu, v.geometry, folder, study_date=v.date.strftime("%Y%m%d"),
                           patient_id="P-SR")  # fmt: skip
        if i == 0 and strip:
            for path in folder.iterdir():
                ds = pydicom.dcmread(path)
                for key in strip:
                    if key in ds:
                        delattr(ds, key)
                ds.save_as(path)
        scan = load_scan(folder)
        heat = np.zeros(scan.spatial_shape, np.float32)
        for centre, radius in lesions:
            moved = centre if v.motion is None else (v.motion @ np.append(centre, 1.0))[:3]
            heat = np.maximum(heat, sphere_on(scan.affine_lps, scan.spatial_shape, moved, radius))
        tps.append(Timepoint(scan.image[0].numpy(), scan.affine_lps, heat, v.date,
                             {"patient": "P-SR", "modality": "CT", "method": "gradcam"},
                             scan=scan))  # fmt: skip
        folders.append(folder)
    return folders, tps
