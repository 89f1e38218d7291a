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


def lure_model(dims: int = 3):
    """A classifier whose deep layers point at a lure and whose first layer at the lesion.

    Class-1 logit = mean over the input of ``relu(x - 0.5)``, pooled twice (1/2, 1/4) on the
    way. A lure (a 6-voxel cube at 0.7) outweighs a one-voxel lesion (1.0) in every pooled
    cell, so Grad-CAM at the 1/4 grid (the default) peaks on the lure; at ``stem`` the map is
    ``relu(x - 0.5)`` times a constant gradient, which peaks on the lesion.
    """
    import torch
    from torch import nn

    class Lure(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            conv = nn.Conv3d if dims == 3 else nn.Conv2d
            pool = nn.AvgPool3d if dims == 3 else nn.AvgPool2d
            self.stem, self.act = conv(1, 1, 1), nn.ReLU()
            self.down1, self.mid = pool(2), conv(1, 1, 1)
            self.down2, self.deep = pool(2), conv(1, 1, 1)
            self.head = nn.Linear(1, 2)
            with torch.no_grad():
                for c in (self.stem, self.mid, self.deep):
                    c.weight.fill_(1.0)
                    c.bias.zero_()
                self.stem.bias.fill_(-0.5)
                self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
                self.head.bias.zero_()

        def forward(self, x):
            h = self.deep(self.down2(self.mid(self.down1(self.act(self.stem(x))))))
            return self.head(h.flatten(2).mean(2))

    return Lure()


def lure_cases(n: int, dims: int = 3, size: int = 16, seed: int = 0):
    """``(x (n, 1, *S), masks (n, *S))`` for :func:`lure_model`: a lure cube and a one-voxel
    lesion outside it; the masks mark the lesion."""
    import torch

    if size < 10:
        raise ValueError("lure_cases needs size >= 10: room for the lesion beside the lure")
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, *(size,) * dims)
    masks = torch.zeros(n, *(size,) * dims, dtype=torch.bool)
    for i in range(n):
        a = int(torch.randint(0, size - 6, (1,), generator=g))
        x[(i, 0, *(slice(a, a + 6),) * dims)] = 0.7
        while True:
            c = tuple(int(v) for v in torch.randint(1, size - 1, (dims,), generator=g))
            if not all(a - 1 <= v <= a + 6 for v in c):  # not on or next to the lure
                break
        x[(i, 0, *c)] = 1.0
        masks[(i, *c)] = True
    return x, masks


def lure_preprocess():
    """Factory for ``--preprocess``: reorient to LPS and pad to 20^3 (geometry to undo)."""
    from monai.transforms import Compose, Orientation, SpatialPad

    return Compose([Orientation("LPS", labels=None), SpatialPad((20, 20, 20))])


def flatten_classifier():
    """MONAI's ``Classifier`` for 1 x 32^3 inputs: strided residual units, then flatten +
    linear (no global pooling), a head for which ``method="auto"`` picks HiResCAM."""
    import torch
    from monai.networks.nets import Classifier

    torch.manual_seed(0)
    return Classifier((1, 32, 32, 32), 2, channels=(4, 8), strides=(2, 2), num_res_units=1)
