"""Explanation-quality metrics on hand-made cases with known values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcam import evaluate as ev
from tests.conftest import SmallCNN


def test_pointing_game_strict_and_tolerant():
    mask = np.zeros((8, 8, 8), bool)
    mask[2:4, 2:4, 2:4] = True
    heat = np.zeros((8, 8, 8))
    heat[3, 3, 3] = 1.0
    assert ev.pointing_game(heat, mask) == 1.0
    heat = np.zeros((8, 8, 8))
    heat[4, 3, 3] = 1.0  # one voxel off the object
    assert ev.pointing_game(heat, mask) == 0.0
    assert ev.pointing_game(heat, mask, tolerance=1) == 1.0
    heat = np.zeros((8, 8, 8))
    heat[6, 6, 6] = 1.0
    assert ev.pointing_game(heat, mask, tolerance=1) == 0.0
    # batched: one hit, one miss -> 0.5; 2D works too
    batch_h = np.stack([np.eye(4), np.fliplr(np.eye(4)) * 2])
    batch_m = np.zeros((2, 4, 4), bool)
    batch_m[:, 0, 0] = True
    assert ev.pointing_game(batch_h, batch_m, spatial_rank=2) == 0.5
    assert ev.pointing_game(batch_h, batch_m, spatial_rank=2, reduce=False) == [1.0, 0.0]


def test_energy_pointing_game():
    heat = np.ones((10, 10))
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    assert ev.energy_pointing_game(heat, mask) == pytest.approx(0.25)
    heat[mask] = 3.0  # 75 of 150
    assert ev.energy_pointing_game(heat, mask) == pytest.approx(0.5)
    assert ev.energy_pointing_game(np.zeros((10, 10)), mask) == 0.0
    assert ev.energy_pointing_game(-np.ones((10, 10)), mask) == 0.0  # negatives ignored


def test_top_iou():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True  # 4 voxels
    assert ev.top_iou(mask.astype(float), mask) == 1.0
    heat = np.zeros((6, 6))
    heat[1:3, 2:4] = 1.0  # shifted by one column: 2 shared of 6 in the union
    heat += np.arange(36).reshape(6, 6) * 1e-6  # break ties deterministically, top 4 = block
    assert ev.top_iou(heat, mask) == pytest.approx(2 / 6)
    assert ev.top_iou(mask.astype(float), mask, fraction=0.5) == pytest.approx(4 / 18)


def _sum_score(batch: torch.Tensor) -> torch.Tensor:
    return batch.reshape(batch.shape[0], -1).sum(dim=1)


def test_deletion_and_insertion_auc_known_answer():
    x = torch.tensor([4.0, 3.0, 2.0, 1.0]).reshape(1, 2, 2)  # (C, H, W)
    heat = x[0]
    # deleting the largest first: scores 10, 6, 3, 1, 0 at fractions 0, .25, .5, .75, 1
    auc, curve = ev.deletion_auc(_sum_score, x, heat, steps=4, return_curve=True)
    np.testing.assert_allclose(curve, [10, 6, 3, 1, 0])
    assert auc == pytest.approx(0.25 * (8 + 4.5 + 2 + 0.5))
    # inserting the largest first: 0, 4, 7, 9, 10
    ins, curve = ev.insertion_auc(_sum_score, x, heat, steps=4, return_curve=True)
    np.testing.assert_allclose(curve, [0, 4, 7, 9, 10])
    assert ins == pytest.approx(0.25 * (2 + 5.5 + 8 + 9.5))
    # a good map deletes faster than random order; a reversed map slower
    big = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    good = ev.deletion_auc(_sum_score, big, big[0], steps=16)
    rand = ev.deletion_auc(_sum_score, big, big[0], steps=16, order="random")
    bad = ev.deletion_auc(_sum_score, big, -big[0], steps=16)
    assert good < rand < bad


def test_randomization_sanity_check():
    torch.manual_seed(0)
    net = SmallCNN(spatial_dims=2).eval()
    x = torch.randn(2, 2, 16, 16)
    same = ev.randomization_spearman(net, x, layers="features.3", target=0)
    assert len(same) == 2 and all(-1 <= v <= 1 for v in same)
    clone = ev.randomized_copy(net, seed=1)
    assert not torch.equal(clone.fc.weight, net.fc.weight)
    assert ev.spearman(np.arange(10), np.arange(10) ** 2) == pytest.approx(1.0)
    assert ev.spearman(np.arange(10), -np.arange(10.0)) == pytest.approx(-1.0)


def test_bad_arguments_are_medcam_errors():
    import medcam
    from medcam import evaluate

    with pytest.raises(medcam.InputError, match="differ in shape"):
        evaluate.pointing_game(np.zeros((4, 4)), np.zeros((4, 5), bool))
    x = torch.zeros(1, 4, 4)
    with pytest.raises(medcam.InputError, match="order"):
        evaluate.deletion_auc(lambda b: b.mean((1, 2, 3)), x, torch.zeros(4, 4), order="best")
    with pytest.raises(medcam.InputError, match="16 per channel"):
        evaluate.deletion_auc(lambda b: b.mean((1, 2, 3)), x, torch.zeros(5, 4))
    with pytest.raises(medcam.InputError, match="one score per input"):
        evaluate.insertion_auc(lambda b: b.mean((2, 3)).repeat(1, 2), x, torch.zeros(4, 4))

    def broken(batch):
        raise RuntimeError("model on another device")

    with pytest.raises(medcam.ModelError, match="another device") as err:
        evaluate.deletion_auc(broken, x, torch.zeros(4, 4))
    assert isinstance(err.value.__cause__, RuntimeError)


def test_randomized_copy_leaves_the_callers_random_state():
    from medcam import evaluate

    net = torch.nn.Conv2d(1, 2, 3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    copy = evaluate.randomized_copy(net, seed=7)
    assert torch.equal(torch.rand(3), expected)
    again = evaluate.randomized_copy(net, seed=7)
    assert torch.equal(copy.weight, again.weight) and not torch.equal(copy.weight, net.weight)
