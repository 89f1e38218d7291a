"""Explanation-quality metrics against your own masks, 2D or 3D.

Every function takes heatmaps and masks on one grid, ``(*spatial)`` or batched ``(B, *spatial)``
(tensors or arrays), and returns plain floats (batched: the mean, and per-sample values with
``reduce=False``).

- :func:`pointing_game`: is the heatmap maximum inside the object (optionally within a
  tolerance of ``k`` voxels)?
- :func:`energy_pointing_game`: the fraction of the (positive) heatmap mass inside the object.
- :func:`top_iou`: IoU between the object and the heatmap's top voxels (as many as the object
  has, by default).
- :func:`deletion_auc` / :func:`insertion_auc`: the model's score as the most important voxels
  are removed from (inserted into) the input; compare with ``order="random"``.
- :func:`randomization_spearman`: Spearman correlation between maps of the trained model and of
  a copy with re-initialised weights (Adebayo et al. 2018); high means the map ignores the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medcam.errors import InputError, MedcamError, ModelError

__all__ = [
    "deletion_auc",
    "energy_pointing_game",
    "insertion_auc",
    "pointing_game",
    "randomization_spearman",
    "randomized_copy",
    "spearman",
    "top_iou",
]


def _batched(heat: Any, mask: Any, spatial_rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.as_tensor(np.asarray(heat) if not isinstance(heat, torch.Tensor) else heat).float()
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
    if h.shape != m.shape:
        raise InputError(
            f"heatmap {tuple(h.shape)} and mask {tuple(m.shape)} differ in shape; put the mask "
            "on the heatmap's grid (e.g. ScanExplanation.heatmap is on the scan's grid)."
        )
    rank = spatial_rank or (h.ndim if h.ndim <= 3 else h.ndim - 1)
    if h.ndim == rank:
        h, m = h[None], m[None]
    return h.cpu(), m.cpu()


def _reduce(values: list[float], reduce: bool) -> float | list[float]:
    return float(np.mean(values)) if reduce else values


def pointing_game(heat, mask, tolerance: int = 0, *, spatial_rank: int | None = None,
                  reduce: bool = True):  # fmt: skip
    """1 if the heatmap's maximum lies in the mask dilated by ``tolerance`` voxels, else 0.

    ``tolerance=1`` accepts the 26 (3D) / 8 (2D) neighbours of the mask: a maximum one voxel
    off the object still counts, as in the ±1-voxel pointing game.
    """
    h, m = _batched(heat, mask, spatial_rank)
    if tolerance > 0:
        k = 2 * tolerance + 1
        pool = F.max_pool3d if m.ndim == 4 else F.max_pool2d
        m = pool(m[:, None].float(), k, stride=1, padding=tolerance)[:, 0].bool()
    hits = []
    for hb, mb in zip(h, m, strict=True):
        idx = int(torch.argmax(hb))
        hits.append(float(mb.reshape(-1)[idx]))
    return _reduce(hits, reduce)


def energy_pointing_game(heat, mask, *, spatial_rank: int | None = None, reduce: bool = True):
    """Fraction of the positive heatmap mass inside the mask (0 for an all-zero map)."""
    h, m = _batched(heat, mask, spatial_rank)
    h = h.clamp_min(0)
    out = []
    for hb, mb in zip(h, m, strict=True):
        total = float(hb.sum())
        out.append(float(hb[mb].sum()) / total if total > 0 else 0.0)
    return _reduce(out, reduce)


def top_iou(heat, mask, fraction: float | None = None, *, spatial_rank: int | None = None,
            reduce: bool = True):  # fmt: skip
    """IoU of the mask and the heatmap's top voxels.

    ``fraction=None`` takes as many top voxels as the mask has (a perfect map scores 1);
    otherwise the top ``fraction`` of all voxels.
    """
    h, m = _batched(heat, mask, spatial_rank)
    out = []
    for hb, mb in zip(h, m, strict=True):
        flat = hb.reshape(-1)
        k = int(mb.sum()) if fraction is None else max(1, round(fraction * flat.numel()))
        top = torch.zeros_like(flat, dtype=torch.bool)
        top[torch.topk(flat, k).indices] = True
        mflat = mb.reshape(-1)
        union = int((top | mflat).sum())
        out.append(int((top & mflat).sum()) / union if union else 1.0)
    return _reduce(out, reduce)


def _curve(score_fn, x, heat, steps, order, baseline, insert, seed, batch_size):
    flat_heat = torch.as_tensor(heat).reshape(-1).float()
    n = flat_heat.numel()
    if order == "heat":
        ranking = torch.argsort(flat_heat, descending=True, stable=True)
    elif order == "random":
        g = torch.Generator().manual_seed(seed)
        ranking = torch.randperm(n, generator=g)
    else:
        raise InputError(f"order must be 'heat' or 'random', not {order!r}.")
    if n != int(np.prod(x.shape[1:])) or steps < 1:
        raise InputError(
            f"heat has {n} voxels but the input {tuple(x.shape)} has "
            f"{int(np.prod(x.shape[1:]))} per channel (give x as (C, *spatial) and the heatmap "
            f"on its grid), or steps={steps} < 1."
        )
    counts = [round(i * n / steps) for i in range(steps + 1)]
    start = torch.full_like(x, float(baseline)) if insert else x
    source = x if insert else torch.full_like(x, float(baseline))
    # position of each voxel in the ranking: the first c voxels are those with position < c
    position = torch.empty(n, dtype=torch.long)
    position[ranking] = torch.arange(n)
    position = position.reshape(x.shape[1:]).to(x.device)
    inputs = [torch.where(position < c, source, start) for c in counts]
    scores = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            batch = torch.stack(inputs[i : i + batch_size])
            try:
                got = torch.as_tensor(score_fn(batch)).float().reshape(-1)
            except MedcamError:
                raise
            except Exception as err:
                raise ModelError(
                    f"score_fn failed on a batch of shape {tuple(batch.shape)}: "
                    f"{type(err).__name__}: {err}"
                ) from err
            if got.numel() != len(batch):
                raise InputError(
                    f"score_fn returned {got.numel()} values for a batch of {len(batch)}; it "
                    "must return one score per input, shape (N,)."
                )
            scores.append(got)
    y = torch.cat(scores).cpu().numpy()
    fr = np.asarray(counts, float) / n
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(fr))), y


def deletion_auc(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, heat,
                 *, steps: int = 20, order: str = "heat", baseline: float = 0.0, seed: int = 0,
                 batch_size: int = 8, return_curve: bool = False):  # fmt: skip
    """Area under the score curve as voxels are deleted (set to ``baseline``), most important
    first (``order="heat"``) or in random order.

    Parameters
    ----------
    score_fn:
        ``(N, C, *spatial) -> (N,)``, e.g. ``lambda b: model(b).softmax(1)[:, cls]``.
    x:
        One input ``(C, *spatial)``.
    heat:
        ``(*spatial)`` heatmap on the input grid (same for every channel).

    Returns the AUC over the deleted fraction in [0, 1] (trapezoid rule); lower is better for
    deletion. ``return_curve=True`` also returns the scores.
    """
    auc, curve = _curve(score_fn, x, heat, steps, order, baseline, False, seed, batch_size)
    return (auc, curve) if return_curve else auc


def insertion_auc(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, heat,
                  *, steps: int = 20, order: str = "heat", baseline: float = 0.0, seed: int = 0,
                  batch_size: int = 8, return_curve: bool = False):  # fmt: skip
    """Like :func:`deletion_auc`, starting from ``baseline`` and inserting voxels of ``x``;
    higher is better."""
    auc, curve = _curve(score_fn, x, heat, steps, order, baseline, True, seed, batch_size)
    return (auc, curve) if return_curve else auc


def spearman(a, b) -> float:
    """Spearman rank correlation of two maps (ties averaged)."""
    from medcam.longitudinal.metrics import pearson_spearman

    return pearson_spearman(np.asarray(a).ravel(), np.asarray(b).ravel())[1]


def randomized_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A deep copy of ``model`` with every resettable layer re-initialised (the original is
    untouched)."""
    clone = copy.deepcopy(model)
    cuda = sorted({p.device.index or 0 for p in clone.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        for m in clone.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return clone


def randomization_spearman(model: torch.nn.Module, x: torch.Tensor, *, seed: int = 0,
                           **explain_kwargs) -> list[float]:  # fmt: skip
    """Spearman between each sample's map from ``model`` and from :func:`randomized_copy`.

    A trustworthy method gives low values: its maps depend on what the model learned.
    """
    from medcam.engine.core import explain

    trained = explain(model, x, **explain_kwargs)
    same_classes = {**explain_kwargs, "target": trained.classes}  # not the random model's argmax
    random = explain(randomized_copy(model, seed), x, **same_classes)
    pairs = zip(trained.heatmap[:, 0].cpu(), random.heatmap[:, 0].cpu(), strict=True)
    return [spearman(a, b) for a, b in pairs]
