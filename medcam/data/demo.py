"""The built-in demo: a small 3D classifier and segmenter trained on synthetic CT-like volumes.

Everything is generated here (nothing is downloaded). A "case" is a CT-like body cylinder with
a spine and, for class 1, a round lesion. ``examples/train_demo_models.py`` trains the two
networks on model-space volumes made by :func:`model_space_batch` and writes the weights that
ship in ``medcam/data/weights/``; :func:`ct_phantom` makes the same anatomy in physical space,
written as a DICOM series for the demo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medcam.data.synthetic import Geometry

__all__ = [
    "DEMO_HU_WINDOW",
    "DEMO_ROI",
    "DEMO_SPACING",
    "ct_phantom",
    "demo_classifier",
    "demo_preprocess",
    "demo_segmenter",
    "load_demo_weights",
    "model_space_batch",
]

WEIGHTS = Path(__file__).parent / "weights"
DEMO_SPACING = (4.0, 4.0, 4.0)  # mm, model space
DEMO_ROI = (48, 48, 48)
DEMO_HU_WINDOW = (-200.0, 400.0)
BODY_HU, SPINE_HU, LESION_HU = 40.0, 700.0, 220.0


def demo_classifier() -> torch.nn.Module:
    """MONAI DenseNet, 3D, 1 channel, 2 classes (no lesion / lesion); ~30k parameters.

    At the demo's 48^3 input its last dense block has a 6x6x6 feature grid.
    """
    from monai.networks.nets import DenseNet

    return DenseNet(
        spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=8,
        block_config=(3, 3), bn_size=2,
    )  # fmt: skip


def demo_segmenter() -> torch.nn.Module:
    """MONAI UNet, 3D, 1 channel, 2 classes (background / lesion); ~35k parameters."""
    from monai.networks.nets import UNet

    return UNet(3, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


def load_demo_weights(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Load the shipped weights ``name`` ("classifier" or "segmenter") and set eval mode."""
    state = torch.load(WEIGHTS / f"demo_{name}.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def demo_preprocess():
    """The demo models' preprocessing (MONAI array transforms, all invertible in geometry)."""
    from monai.transforms import (
        Compose,
        Orientation,
        ResizeWithPadOrCrop,
        ScaleIntensityRange,
        Spacing,
    )

    return Compose(
        [
            Orientation(axcodes="RAS", labels=None),
            Spacing(pixdim=DEMO_SPACING, mode="bilinear"),
            ScaleIntensityRange(*DEMO_HU_WINDOW, 0.0, 1.0, clip=True),
            ResizeWithPadOrCrop(DEMO_ROI),
        ]
    )


def _scale(hu: np.ndarray) -> np.ndarray:
    lo, hi = DEMO_HU_WINDOW
    return np.clip((hu - lo) / (hi - lo), 0.0, 1.0)


def model_space_batch(
    n: int, rng: np.random.Generator, lesion_fraction: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training volumes in model space: ``(n, 1, 48, 48, 48)`` in [0, 1], labels, lesion masks.

    Voxels are 4 mm; axes (x, y, z) = RAS. Body: elliptic cylinder along z covering a random z
    range; spine: bright cylinder posterior; lesion (class 1): sphere of radius 2-4 voxels inside
    the body.
    """
    size = DEMO_ROI[0]
    ax = np.arange(size, dtype=np.float32)
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    vols = np.zeros((n, 1, size, size, size), np.float32)
    masks = np.zeros((n, size, size, size), np.float32)
    labels = (rng.random(n) < lesion_fraction).astype(np.int64)
    for i in range(n):
        cx, cy = size / 2 + rng.normal(0, 2, 2)
        rx, ry = rng.uniform(15, 21), rng.uniform(11, 16)
        z0 = rng.integers(0, 10)
        z1 = size - rng.integers(0, 10)
        body = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1) & (z >= z0) & (z < z1)
        hu = np.where(body, BODY_HU, -1000.0)
        spine = ((x - cx) ** 2 + (y - (cy - 0.6 * ry)) ** 2 <= rng.uniform(2, 3.5) ** 2) & body
        hu = np.where(spine, SPINE_HU, hu)
        if labels[i]:
            r = rng.uniform(2.0, 4.0)
            for _ in range(100):  # a centre well inside the body, away from the spine
                c = np.array([cx + rng.uniform(-0.6, 0.6) * rx, cy + rng.uniform(-0.3, 0.7) * ry,
                              rng.uniform(z0 + r + 1, z1 - r - 1)])  # fmt: skip
                if np.hypot(c[0] - cx, c[1] - (cy - 0.6 * ry)) > r + 5:
                    break
            lesion = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r**2
            hu = np.where(lesion, LESION_HU + rng.normal(0, 20), hu)
            masks[i] = lesion
        hu = hu + rng.normal(0, 25, hu.shape)
        vols[i, 0] = _scale(hu)
    return torch.from_numpy(vols), torch.from_numpy(labels), torch.from_numpy(masks)


def ct_phantom(
    geometry: Geometry,
    lesion_centre_lps: Sequence[float] | None,
    lesion_radius_mm: float = 12.0,
    *,
    seed: int = 0,
) -> np.ndarray:
    """The demo anatomy in physical space, ``(X, Y, Z)`` HU on ``geometry``.

    The body is an elliptic cylinder along the patient's S-I axis (LPS z) centred in the field
    of view, the spine posterior to its centre, the lesion a sphere at ``lesion_centre_lps``.
    """
    pts = geometry.world_points_lps()
    centre = pts.reshape(-1, 3).mean(axis=0)
    dx, dy = pts[..., 0] - centre[0], pts[..., 1] - centre[1]
    rx, ry = 72.0, 52.0
    body = (dx / rx) ** 2 + (dy / ry) ** 2 <= 1
    hu = np.where(body, BODY_HU, -1000.0).astype(np.float32)
    spine = (dx**2 + (dy - 0.6 * ry) ** 2 <= 11.0**2) & body  # +y is posterior in LPS
    hu[spine] = SPINE_HU
    if lesion_centre_lps is not None:
        dist = np.linalg.norm(pts - np.asarray(lesion_centre_lps, float), axis=-1)
        edge = min(geometry.spacing)
        w = np.clip((lesion_radius_mm + edge / 2 - dist) / edge, 0, 1).astype(np.float32)
        hu = hu + w * (LESION_HU - hu)
    hu += np.random.default_rng(seed).normal(0, 25, hu.shape).astype(np.float32)
    return hu
