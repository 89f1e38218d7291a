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


def lesion_window():
    """Preprocessing for IntensityCAM on torso phantoms: only the lesion (150 HU) lights up
    (bone, > 300 HU, is set to air first; liver, 65 HU, falls below the window)."""
    from monai.transforms import Compose, ScaleIntensityRange, ThresholdIntensity

    return Compose(
        [
            ThresholdIntensity(threshold=300.0, above=False, cval=-1000.0),
            ScaleIntensityRange(100.0, 140.0, 0.0, 1.0, clip=True),
        ]
    )


def intensity_cam_3d():
    """Factory for ``medcam --model tests.helpers:intensity_cam_3d``."""
    from tests.conftest import IntensityCAM

    return IntensityCAM(spatial_dims=3)


def slow_intensity_cam_3d():
    """IntensityCAM that takes 0.6 s per forward, so a test can kill a worker mid-run."""
    import time

    from tests.conftest import IntensityCAM

    class Slow(IntensityCAM):
        def forward(self, x):
            time.sleep(0.6)
            return super().forward(x)

    return Slow(spatial_dims=3)


def exploding_model():
    """Factory for a model that fails if it ever runs (checks that refusals come first)."""
    from torch import nn

    class Exploding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 1, 1)

        def forward(self, x):
            raise RuntimeError("forward ran")

    return Exploding()


def identity_segmenter():
    """Factory for the sliding-window CLI test: logits [0, x] (see tests/engine/test_sliding)."""
    from tests.engine.test_sliding import IdentitySegmenter

    return IdentitySegmenter()
