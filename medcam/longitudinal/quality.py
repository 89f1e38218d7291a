"""When a longitudinal number may be wrong: stated limits, flags, and ``--strict`` refusal."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from medcam.errors import MedcamError

__all__ = ["Flag", "Limits", "UnreliableComparisonError"]


class UnreliableComparisonError(MedcamError):
    """``strict=True`` and a visit's registration or threshold is outside the stated limits."""


@dataclass(frozen=True)
class Limits:
    """Limits beyond which a visit is flagged (or, with ``strict``, refused).

    Defaults were set on medcam's torso phantom (see docs/longitudinal.md): correctly
    registered follow-ups reach a similarity of 0.95 and a rigid-affine disagreement under
    0.3 mm; a blank visit has similarity 0.00, a visit rescaled by 4 % has a 1.9-3.5 mm
    disagreement at the lesion and a scale of 1.040. Tune them on your own data.

    Attributes
    ----------
    min_similarity:
        Least correlation of baseline and registered follow-up inside the body.
    max_disagreement_mm:
        Most distance between the rigid and affine results at the heat centroids.
    max_scale_pct:
        Most linear scale difference (percent) the affine registration may find.
    max_inverse_consistency_mm:
        Most inverse-consistency error of the transform (B-spline).
    max_threshold_sensitivity:
        Most relative volume change when the threshold moves by +-10 %.
    """

    min_similarity: float = 0.8
    max_disagreement_mm: float = 2.0
    max_scale_pct: float = 2.0
    max_inverse_consistency_mm: float = 0.5
    max_threshold_sensitivity: float = 1.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Flag:
    """A reason to doubt a visit's numbers: ``kind`` is "registration" or "threshold"."""

    visit: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.visit}: {self.message}"


def registration_flags(label: str, reg, disagreement: float, limits: Limits) -> list[Flag]:
    """Flags for one follow-up's registration."""
    out = []

    def flag(msg: str) -> None:
        out.append(Flag(label, "registration", msg))

    if reg.kind == "none":
        flag("not registered (registration='none'): positions are compared in scanner "
             "coordinates")  # fmt: skip
        return out
    if reg.failed:
        flag(f"registration failed ({reg.stop_condition}); its numbers are not usable")
    if not reg.similarity >= limits.min_similarity:
        flag(
            f"images disagree after registration: similarity {reg.similarity:.2f} < "
            f"{limits.min_similarity:.2f} (wrong series, blank or failed registration?)"
        )
    if math.isfinite(disagreement) and disagreement > limits.max_disagreement_mm:
        flag(f"rigid and affine registrations disagree by {disagreement:.1f} mm at the "
             f"activation (limit {limits.max_disagreement_mm:g} mm)")  # fmt: skip
    if math.isfinite(reg.scale) and abs(reg.scale - 1) * 100 > limits.max_scale_pct:
        vol = 100 * (reg.scale**3 - 1)
        flag(
            f"anatomy scaled by {100 * (reg.scale - 1):+.1f} % vs baseline (pixel spacing or "
            f"calibration?); volumes differ by about {vol:+.0f} % for that reason alone"
        )
    if reg.inverse_consistency_mm > limits.max_inverse_consistency_mm:
        flag(f"transform not invertible within {limits.max_inverse_consistency_mm:g} mm "
             f"(inverse consistency {reg.inverse_consistency_mm:.2f} mm)")  # fmt: skip
    return out
