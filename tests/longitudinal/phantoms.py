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
