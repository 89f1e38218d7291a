"""Normalisation, fusion and upsampling on hand-made maps with known answers."""

from __future__ import annotations

import pytest
import torch

from medcam import MedcamError
from medcam.engine import fuse_maps, normalize_maps, upsample


def test_percentile_known_answer():
    maps = torch.arange(100.0).reshape(1, 1, 10, 10)
    out, record = normalize_maps(maps, "percentile", percentiles=(0.0, 50.0))
    # nearest-rank 50th percentile of 0..99 is 49: values >= 49 saturate (51 of 100)
    assert int((out == 1).sum()) == 51
    torch.testing.assert_close(out.flatten()[:49], torch.arange(49.0) / 49)
    assert record == {
        "method": "percentile",
        "percentiles": [0.0, 50.0],
        "scope": "per sample and target",
        "clipped": True,
    }


def test_percentile_of_sparse_map_uses_the_maximum():
    maps = torch.zeros(1, 1, 10, 10)
    maps[0, 0, 3, 4] = 2.0  # one hot voxel: the 99th percentile is 0
    out, _ = normalize_maps(maps, "percentile")
    assert out[0, 0, 3, 4] == 1 and out.sum() == 1


def test_minmax_known_answer_and_per_map_scope():
    maps = torch.tensor([[[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]]])  # (B=1, K=2, 3)
    out, record = normalize_maps(maps, "minmax")
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]]))
    assert record["method"] == "minmax"


def test_none_returns_input_unchanged():
    maps = torch.randn(2, 3, 4, 4)
    out, record = normalize_maps(maps, "none")
    assert out is maps and record == {"method": "none"}


def test_bad_normalisation_arguments():
    with pytest.raises(MedcamError, match="percentiles"):
        normalize_maps(torch.rand(1, 1, 4), "percentile", percentiles=(50.0, 10.0))
    with pytest.raises(MedcamError, match="minmax"):
        normalize_maps(torch.rand(1, 1, 4), "softmax")  # type: ignore[arg-type]


def test_fusion_known_answer():
    a = torch.tensor([[[0.0, 2.0, 4.0]]])  # peak 4 -> (0, .5, 1)
    b = torch.tensor([[[1.0, 1.0, 0.5]]])  # peak 1 -> (1, 1, .5)
    torch.testing.assert_close(fuse_maps([a, b], "mean"), torch.tensor([[[0.5, 0.75, 0.75]]]))
    torch.testing.assert_close(
        fuse_maps([a, b], "product"), torch.tensor([[[0.0, 0.5**0.5, 0.5**0.5]]])
    )
    zero = torch.zeros(1, 1, 3)
    torch.testing.assert_close(fuse_maps([a, zero], "mean"), torch.tensor([[[0.0, 0.25, 0.5]]]))
    # a layer without positive evidence for a sample is left out of that sample's product:
    # sample 0 fuses a and b, sample 1 has only b (its a-map is zero), nothing is zeroed
    a2, b2 = torch.cat([a, zero]), torch.cat([b, b])
    expected = torch.tensor([[[0.0, 0.5**0.5, 0.5**0.5]], [[1.0, 1.0, 0.5]]])
    torch.testing.assert_close(fuse_maps([a2, b2], "product"), expected)
    torch.testing.assert_close(fuse_maps([zero, -b], "product"), zero)


def test_trilinear_upsampling_of_a_linear_ramp():
    # A ramp along depth, 2 cells -> 4 voxels, align_corners=False: cell centres sit at voxel
    # coordinates 0.5 and 2.5, so voxels 0..3 read the ramp at (clamped) 0, 0.25, 0.75, 1.
    maps = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 3, 3)
    out = upsample(maps, (4, 3, 3))
    torch.testing.assert_close(out[0, 0, :, 1, 1], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert upsample(maps, (2, 3, 3)) is maps
