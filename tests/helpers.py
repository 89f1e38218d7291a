"""Geometry helpers shared by the I/O and writer tests."""

from __future__ import annotations

import numpy as np


def weighted_centroid_world(values: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Value-weighted centroid of ``values (X, Y, Z)`` mapped through ``affine`` (4x4)."""
    v = np.clip(np.asarray(values, float), 0, None)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in v.shape], indexing="ij"), axis=-1)
    c = (idx * v[..., None]).reshape(-1, v.ndim).sum(axis=0) / v.sum()
    return (affine @ np.append(c, 1.0))[:3]


def voxel_size(affine: np.ndarray) -> float:
    """Largest voxel edge of an affine (mm)."""
    return float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).max())
