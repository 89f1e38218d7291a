"""Upsampling, multi-layer fusion and explicit normalisation of CAM maps.

All functions work on ``(B, K, *S)`` tensors on any device and never change their input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from medcam.errors import MedcamError

__all__ = ["Fusion", "Normalization", "fuse_maps", "normalize_maps", "upsample"]

Normalization = Literal["none", "minmax", "percentile"]
Fusion = Literal["mean", "product"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``maps: (B, K, *S)`` to ``(B, K, *size)``.

    Linear / bilinear / trilinear interpolation with ``align_corners=False`` (the convention of
    ``torch``, MONAI and Captum): each feature cell is centred on the input region it covers.
    """
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = _MODES.get(len(size))
    if mode is None:
        raise MedcamError(f"Cannot upsample maps with {len(size)} spatial dims; 1 to 3 supported.")
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


def _per_map(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2)


def _scale_to_max(m: torch.Tensor) -> torch.Tensor:
    peak = _per_map(m).abs().amax(dim=2).reshape(*m.shape[:2], *([1] * (m.ndim - 2)))
    return torch.where(peak > 0, m / peak.clamp_min(torch.finfo(m.dtype).tiny), 0.0)


def fuse_maps(maps: Sequence[torch.Tensor], how: Fusion) -> torch.Tensor:
    """Fuse per-layer maps already upsampled to one grid.

    Each map is first divided by its own peak (per sample and target), since raw maps of
    different layers have unrelated scales; then ``"mean"`` averages them (result in [0, 1] for
    non-negative methods) and ``"product"`` takes their geometric mean, which keeps only what
    all layers agree on (coarse deep layers localise, fine shallow layers sharpen). A map that is
    zero everywhere (no positive evidence at that layer for that sample and target) is left out
    of the product instead of zeroing it.
    """
    scaled = [_scale_to_max(m) for m in maps]
    if how == "mean":
        return torch.stack(scaled).mean(dim=0)
    if how == "product":
        # A layer whose map has no positive value for a sample and target carries no evidence
        # there; it is left out of that map's product (else it would zero every other layer).
        pos = torch.stack([s.clamp_min(0) for s in scaled])  # (L, B, K, *S)
        spatial = [1] * (pos.ndim - 3)
        has = (pos.flatten(3).amax(dim=3) > 0).reshape(*pos.shape[:3], *spatial)
        n = has.sum(dim=0)  # (B, K, 1, ...)
        prod = torch.where(has, pos, torch.ones_like(pos)).prod(dim=0)
        fused = prod.pow(1.0 / n.clamp_min(1).to(pos.dtype))
        return torch.where(n > 0, fused, torch.zeros_like(fused))
    raise MedcamError(f"Unknown fusion {how!r}; use 'mean' or 'product'.")


def _kth_per_map(flat: torch.Tensor, q: float) -> torch.Tensor:
    """q-th percentile (nearest rank) of each row of ``flat: (N, V)``; no size limit."""
    n = flat.shape[1]
    k = min(max(math.ceil(q / 100.0 * n), 1), n)
    return flat.kthvalue(k, dim=1).values


def normalize_maps(
    maps: torch.Tensor,
    how: Normalization = "none",
    percentiles: tuple[float, float] = (0.0, 99.0),
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Normalise each map (per sample and target) and say what was done.

    Parameters
    ----------
    maps:
        ``(B, K, *S)`` float maps.
    how:
        ``"none"`` keeps raw values (comparable across scans); ``"minmax"`` maps each map's
        [min, max] to [0, 1]; ``"percentile"`` maps the ``percentiles`` (lo, hi) to [0, 1] and
        clips, which ignores a few hot voxels (nearest-rank percentiles; where the hi percentile
        equals the lo one, as in a sparse map, the maximum is used). A constant map becomes all
        zeros, never NaN.

    Returns
    -------
    maps:
        ``(B, K, *S)`` float32.
    record:
        JSON-able description of what was applied, stored in the result.
    """
    if how == "none":
        return maps, {"method": "none"}
    flat = maps.reshape(maps.shape[0] * maps.shape[1], -1).float()
    if how == "minmax":
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        record: dict[str, Any] = {"method": "minmax", "scope": "per sample and target"}
    elif how == "percentile":
        p_lo, p_hi = percentiles
        if not 0 <= p_lo < p_hi <= 100:
            raise MedcamError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {percentiles}.")
        lo = _kth_per_map(flat, p_lo) if p_lo > 0 else flat.amin(dim=1)
        hi = _kth_per_map(flat, p_hi)
        # A sparse map (mostly zeros) can have hi == lo: scale by its maximum instead.
        hi = torch.where(hi > lo, hi, flat.amax(dim=1))
        record = {
            "method": "percentile",
            "percentiles": [p_lo, p_hi],
            "scope": "per sample and target",
            "clipped": True,
        }
    else:
        raise MedcamError(f"Unknown normalisation {how!r}; use 'none', 'minmax' or 'percentile'.")
    span = (hi - lo)[:, None]
    out = torch.where(span > 0, (flat - lo[:, None]) / span.clamp_min(1e-30), 0.0)
    return out.clamp(0, 1).reshape(maps.shape), record
