"""Back to the scan grid in one resample: the preprocessing's geometry composed into one map.

MONAI undoes a preprocessing chain transform by transform (``Compose.inverse``): every
``Spacing`` inverse builds a float64 sampling grid over the whole output, so a 512 x 512 x 300
CT costs seconds and gigabytes to put a 48^3 heatmap back. Every invertible spatial transform
medcam meets in practice (orientation, spacing, pad/crop, resize, flip) only changes which
world positions the voxels sit at, and MONAI records that in the MetaTensor's affine. So the
whole chain is undone by one resample: for each scan voxel, its world position in the model
grid (``inv(model affine) @ scan affine``, one affine), sampled from the heatmap once,
trilinearly, in float32, slab by slab, on the heatmap's device.

:func:`compose_inverse` reads the chain from ``applied_operations`` and says whether it can be
composed (the transforms it knows, applied eagerly, starting from the scan's voxels); it also
finds the "data box": the part of the model grid that holds resampled image (not padding), so
that values outside it behave as MONAI's inverse makes them (the last resampling transform's
padding mode: border values, or zeros). :func:`resample_to_grid` samples: separably (three 1D
interpolations, no coordinate grid) when the map's axes run along the scan's axes, which
``Orientation`` + ``Spacing`` + pad/crop + ``Resize`` always give; else with
``torch.nn.functional.grid_sample`` on slabs of coordinates.

The result equals MONAI's inverse up to interpolation: exactly (to float rounding) for chains
with one resampling transform; within the difference between one and two interpolations where
a chain resamples twice (``Spacing`` then ``Resize``): MONAI interpolates twice, this once.
``Resize``'s default ``area`` mode is undone as trilinear here (MONAI's inverse of an ``area``
resize is a blocky nearest-like upsampling of a heatmap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["GridMap", "compose_inverse", "resample_to_grid"]

#: The transforms composed (MONAI's names as recorded in ``applied_operations``).
COMPOSABLE = (
    "Orientation",
    "SpatialResample",  # Spacing records itself under this name
    "Resize",
    "Flip",
    "ResizeWithPadOrCrop",
    "CropForeground",
    "SpatialPad",
    "BorderPad",
    "DivisiblePad",
    "Pad",
    "SpatialCrop",
    "CenterSpatialCrop",
    "CenterScaleCrop",
    "Crop",
)

#: Output elements per slab (the sampling temporaries stay below a few hundred MB).
SLAB_ELEMENTS = 1 << 23


@dataclass
class GridMap:
    """How maps on the model grid land on the scan grid.

    Attributes
    ----------
    index_map:
        ``(nd + 1, nd + 1)`` float64: scan voxel index -> continuous model voxel index.
    box:
        ``(lo, hi)`` per model axis: the model voxels holding resampled image data (the last
        resampling transform's output grid), or ``None`` when nothing was resampled.
    scan_box:
        ``(lo, hi)`` per scan axis: the scan voxels the first resampling transform read (a
        crop before it leaves the rest out: zero there, as MONAI's inverse pads them), or
        ``None``.
    clamp:
        ``True``: positions outside ``box`` take its border values (MONAI's ``border``
        padding, ``Spacing``'s default, and ``Resize``); ``False``: zeros outside it.
    mode:
        ``"linear"`` (trilinear / bilinear) or ``"nearest"``.
    transforms:
        Names of the spatial transforms composed, in the order they ran.
    """

    index_map: np.ndarray
    box: tuple[np.ndarray, np.ndarray] | None = None
    scan_box: tuple[np.ndarray, np.ndarray] | None = None
    clamp: bool = True
    mode: str = "linear"
    transforms: list[str] = field(default_factory=list)


def _nd(affine: Any, nd: int) -> np.ndarray:
    """The ``(nd + 1) x (nd + 1)`` spatial part of a (4 x 4 or smaller) affine, float64."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine,
                   dtype=np.float64)  # fmt: skip
    keep = [*range(nd), a.shape[0] - 1]
    return a[np.ix_(keep, keep)]


def _shift(nd: int, offset: Sequence[float]) -> np.ndarray:
    m = np.eye(nd + 1)
    m[:nd, nd] = offset
    return m


def _pairs(info: dict, nd: int, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(before, after)`` per spatial axis from a crop's flat list or a pad's pairs."""
    value = info.get(key)
    if value is None:
        return None
    if key == "padded":  # ((0, 0) for the channel, then (before, after) per axis)
        pairs = np.asarray(value, dtype=np.int64).reshape(-1, 2)[-nd:]
    else:  # [before0, after0, before1, after1, ...]
        pairs = np.asarray(value, dtype=np.int64).reshape(-1, 2)[:nd]
    return pairs[:, 0], pairs[:, 1]


class _Chain:
    """The grid before each transform, found walking ``applied_operations`` backwards."""

    def __init__(self, affine: np.ndarray, shape: Sequence[int]) -> None:
        self.affine = affine
        self.shape = np.asarray(shape, dtype=np.int64)
        self.nd = len(self.shape)
        self.box: tuple[np.ndarray, np.ndarray] | None = None  # (affine, shape) of the data
        self.source: tuple[np.ndarray, np.ndarray] | None = None  # what the first one read
        self.clamp = True
        self.mode = "linear"
        self.cropped_after_resampling = False  # a crop seen since the last resampling

    def unpad(self, pads) -> None:
        before, after = pads
        self.affine = self.affine @ _shift(self.nd, before)
        self.shape = self.shape - before - after

    def uncrop(self, crops, orig_size) -> None:
        before, after = crops
        if self.box is not None and (np.any(before) or np.any(after)):
            self.cropped_after_resampling = True
        self.affine = self.affine @ _shift(self.nd, -before)
        self.shape = np.asarray(orig_size[: self.nd], dtype=np.int64)

    def resampled(self, mode: Any, padding_mode: Any = "border") -> str | None:
        """The current grid is the output of a resampling transform."""
        if self.cropped_after_resampling:
            return "a crop between two resampling transforms"
        if self.box is None:
            self.box = (self.affine.copy(), self.shape.copy())
            self.clamp = str(getattr(padding_mode, "value", padding_mode)) != "zeros"
            mode = str(getattr(mode, "value", mode))
            self.mode = "nearest" if mode.startswith("nearest") or mode == "0" else "linear"
        return None

    def read_by_resampling(self) -> None:
        """The current grid is the input of a resampling transform (the earliest so far)."""
        self.source = (self.affine.copy(), self.shape.copy())


def _undo(chain: _Chain, op: dict) -> str | None:
    """Step ``chain`` back over one recorded transform; a reason when it cannot."""
    name = str(op.get("class", "?"))
    info = op.get("extra_info") or {}
    orig = tuple(int(v) for v in op.get("orig_size", ()))
    nd = chain.nd
    if op.get("lazy"):
        return f"{name} ran lazily"
    if not op.get("do_transforms", True):
        return None  # a random transform that did not fire
    if name not in COMPOSABLE:
        return f"{name} is not one of the transforms composed ({', '.join(COMPOSABLE)})"
    if len(orig) < nd:
        return f"{name} recorded no original size"
    pad_info, crop_info = info.get("pad_info"), info.get("crop_info")
    if name == "ResizeWithPadOrCrop" or pad_info is not None or crop_info is not None:
        # forward: crop, then pad (ResizeWithPadOrCrop, CropForeground); backward: the reverse
        if pad_info is not None:
            pads = _pairs(pad_info.get("extra_info") or {}, nd, "padded")
            if pads is not None:
                chain.unpad(pads)
        crops = _pairs(info, nd, "cropped")
        if crop_info is not None:
            crops = _pairs(crop_info.get("extra_info") or {}, nd, "cropped")
        if crops is not None:
            chain.uncrop(crops, orig)
        chain.shape = np.asarray(orig[:nd], dtype=np.int64)
        return None
    if "padded" in info:
        chain.unpad(_pairs(info, nd, "padded"))
    elif "cropped" in info:
        chain.uncrop(_pairs(info, nd, "cropped"), orig)
    elif name == "Orientation":
        chain.affine = _nd(info["original_affine"], nd)
        chain.shape = np.asarray(orig[:nd], dtype=np.int64)
    elif name == "SpatialResample":
        reason = chain.resampled(info.get("mode", "bilinear"), info.get("padding_mode", "border"))
        if reason:
            return reason
        chain.affine = _nd(info["src_affine"], nd)
        chain.shape = np.asarray(orig[:nd], dtype=np.int64)
        chain.read_by_resampling()
    elif name == "Resize":
        if info.get("align_corners") is True:
            return "Resize ran with align_corners=True"
        reason = chain.resampled(info.get("mode", "area"))
        if reason:
            return reason
        old = np.asarray(orig[:nd], dtype=np.float64)
        scale = old / chain.shape
        # MONAI's Resize keeps the field of view: old index = scale * (new + 0.5) - 0.5
        to_old = np.diag([*scale, 1.0])
        to_old[:nd, nd] = (scale - 1.0) / 2.0
        chain.affine = chain.affine @ np.linalg.inv(to_old)
        chain.shape = old.astype(np.int64)
        chain.read_by_resampling()
    elif name == "Flip":
        axes = info.get("axes")
        axes = range(nd) if axes is None else np.atleast_1d(axes).tolist()
        flip = np.eye(nd + 1)
        for a in axes:
            flip[a, a], flip[a, nd] = -1.0, chain.shape[a] - 1
        chain.affine = chain.affine @ flip
    else:
        return f"{name} recorded no padding or cropping"
    if tuple(chain.shape) != orig[:nd]:
        return f"undoing {name} gives shape {tuple(chain.shape)}, it recorded {orig[:nd]}"
    return None


def _signed_permutation(m: np.ndarray, tol: float = 1e-4) -> bool:
    """``m`` (n x n) has one entry of magnitude ~1 per row and column, zeros elsewhere."""
    a = np.abs(m)
    return bool(
        np.allclose(np.sort(a, axis=1)[:, :-1], 0.0, atol=tol)
        and np.allclose(a.max(axis=1), 1.0, atol=tol)
        and sorted(np.argmax(a, axis=1).tolist()) == list(range(m.shape[0]))
    )


def compose_inverse(
    model_input: Any, scan_affine: np.ndarray, scan_shape: Sequence[int]
) -> GridMap | str:
    """Compose the spatial transforms recorded on ``model_input`` into one :class:`GridMap`
    back to the scan grid (``scan_affine``: voxel -> RAS mm, ``scan_shape``: spatial shape).

    Returns a sentence saying why, instead, when the chain cannot be composed: a transform
    medcam does not compose (e.g. ``Rotate``, ``Affine``, ``Zoom``, a lazy chain), or a chain
    that does not start on the scan's voxels.
    """
    nd = len(scan_shape)
    affine = getattr(model_input, "affine", None)
    ops = list(getattr(model_input, "applied_operations", None) or [])
    if affine is None:
        return "the model input is a plain tensor (no affine)"
    if getattr(model_input, "pending_operations", None):
        return "the preprocessing left lazy operations pending"
    model_shape = tuple(model_input.shape[1:])
    if len(model_shape) != nd:
        return f"the model input has {len(model_shape)} spatial axes, the scan {nd}"
    model_affine = _nd(affine, nd)
    chain = _Chain(model_affine, model_shape)
    names = []
    for op in reversed(ops):
        reason = _undo(chain, op)
        if reason is not None:
            return reason
        names.append(str(op.get("class", "?")))
    scan_affine = _nd(scan_affine, nd)
    # the chain must start on the scan's voxels (in another axis order or direction is fine:
    # a reader that orders slices differently; the map is placed by world position)
    start = np.linalg.solve(chain.affine, scan_affine)  # scan index -> start index
    if not _signed_permutation(start[:nd, :nd]):
        return "the preprocessing did not start from the scan's voxel grid"
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in scan_shape], indexing="ij"))
    mapped = start[:nd, :nd] @ corners.reshape(nd, -1) + start[:nd, nd : nd + 1]
    if not (
        np.allclose(mapped.min(axis=1), 0.0, atol=0.01)
        and np.allclose(mapped.max(axis=1), chain.shape - 1, atol=0.01)
    ):
        return "the preprocessing did not start from the scan's voxel grid"
    index_map = np.linalg.solve(model_affine, scan_affine)
    box = scan_box = None
    if chain.box is not None:
        box = _grid_box(model_affine, *chain.box)
        scan_box = _grid_box(scan_affine, *chain.source)
        if box is None or scan_box is None:
            return "a transform next to a resampling changed voxel sizes or axes"
    return GridMap(index_map, box, scan_box, chain.clamp, chain.mode, names[::-1])


def _grid_box(target: np.ndarray, affine: np.ndarray, shape) -> tuple | None:
    """The voxels of grid ``(affine, shape)`` as an index box ``(lo, hi)`` of the grid whose
    affine is ``target`` (``None`` unless the two grids share axes and voxel centres)."""
    nd = len(shape)
    to_target = np.linalg.solve(target, affine)
    if not _signed_permutation(to_target[:nd, :nd]):
        return None
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"))
    pts = to_target[:nd, :nd] @ corners.reshape(nd, -1) + to_target[:nd, nd : nd + 1]
    return np.round(pts.min(axis=1)), np.round(pts.max(axis=1))


# ----------------------------------------------------------------------------- resampling


def _axis_weights(pos: torch.Tensor, size: int, lo: float, hi: float, clamp, mode: str):
    """1D sampling of positions ``pos`` on an axis of ``size`` voxels: ``(i0, i1, w0, w1)``;
    positions first clamped to ``clamp = (lo, hi)`` (the data box, or ``None``), then zero
    weight (and a safe index) for neighbours outside ``[lo, hi]`` (the box within the grid)."""
    if clamp is not None:
        pos = pos.clamp(*clamp)
    if mode == "nearest":
        i0 = torch.round(pos)
        w0 = ((i0 >= lo) & (i0 <= hi)).to(pos.dtype)
        i0 = i0.clamp(0, size - 1).long()
        return i0, i0, w0, torch.zeros_like(w0)
    f = torch.floor(pos)
    frac = pos - f
    i0, i1 = f, f + 1
    w0 = (1 - frac) * ((i0 >= lo) & (i0 <= hi))
    w1 = frac * ((i1 >= lo) & (i1 <= hi))
    return i0.clamp(0, size - 1).long(), i1.clamp(0, size - 1).long(), w0, w1


#: Model axes up to this many voxels are interpolated as a dense matrix product (fast); longer
#: axes (a sliding-window model grid at full resolution) by gathering the two neighbours.
DENSE_AXIS = 128


def _weight_matrix(weights, size: int) -> torch.Tensor:
    """``(n, size)`` interpolation matrix: row ``i`` holds ``w0`` at ``i0`` and ``w1`` at ``i1``."""
    i0, i1, w0, w1 = weights
    rows = torch.arange(len(i0), device=i0.device)
    w = torch.zeros((len(i0), size), dtype=w0.dtype, device=w0.device)
    w.index_put_((rows, i0), w0, accumulate=True)
    w.index_put_((rows, i1), w1, accumulate=True)
    return w


def _along(a: torch.Tensor, dim: int, weights, size: int, out=None) -> torch.Tensor:
    """Interpolate ``a`` along ``dim`` (``size`` voxels) at the positions of ``weights``.

    A short model axis that is not upsampled much is a dense matrix product (fast for a few
    outputs per input); otherwise each output takes its two neighbours (gather: a few passes
    over the output, whatever the upsampling factor)."""
    i0, i1, w0, w1 = weights
    if size <= DENSE_AXIS and len(i0) <= 2 * size:
        w = _weight_matrix(weights, size)
        if dim == a.ndim - 1:
            return torch.matmul(a, w.T, out=out) if out is not None else torch.matmul(a, w.T)
        result = torch.movedim(torch.matmul(torch.movedim(a, dim, -1), w.T), -1, dim)
        if out is not None:
            out.copy_(result)
            return out
        return result
    shape = [1] * a.ndim
    shape[dim] = -1
    if out is None:
        out = a.index_select(dim, i0).mul_(w0.view(shape))
    else:
        torch.mul(a.index_select(dim, i0), w0.view(shape), out=out)
    return out.addcmul_(a.index_select(dim, i1), w1.view(shape))


def _step_order(outputs: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """The order to interpolate the axes in (dims in memory order; ``sizes`` on the model
    grid, ``outputs`` on the scan slab): the one with the fewest element operations, a gather
    along the last (contiguous) dim counted 8x (it gathers element by element; along any
    other dim it copies whole rows). The temporaries stay small, and the last step writes
    the slab of the output."""
    import itertools

    best, best_cost = list(range(len(sizes))), math.inf
    for order in itertools.permutations(range(len(sizes))):
        shape, cost = list(sizes), 0
        for d in order:
            shape[d] = outputs[d]
            cost += math.prod(shape) * (8 if d == len(sizes) - 1 else 1)
        if cost < best_cost:
            best, best_cost = list(order), cost
    return best


def _separable_axes(m: np.ndarray, scan_shape: Sequence[int]) -> list[int] | None:
    """For each model axis, the one scan axis it depends on, when the map is axis-aligned
    (off-axis terms below 1e-4 voxel over the whole scan); else ``None``."""
    nd = len(scan_shape)
    axes = []
    for r in range(nd):
        c = int(np.argmax(np.abs(m[r, :nd])))
        off = sum(abs(m[r, j]) * (scan_shape[j] - 1) for j in range(nd) if j != c)
        if off > 1e-4:
            return None
        axes.append(c)
    return axes if sorted(axes) == list(range(nd)) else None


def resample_to_grid(
    maps: torch.Tensor,
    grid: GridMap,
    scan_shape: Sequence[int],
    *,
    first_axis_fastest: bool = False,
) -> torch.Tensor:
    """Sample ``maps: (K, *model_spatial)`` at every scan voxel: ``(K, *scan_shape)`` float32
    on the maps' device.

    The result is C-contiguous, like :func:`medcam.load_scan`'s volumes (MONAI's layout);
    ``first_axis_fastest`` lays it out with the first scan axis fastest instead (a transposed
    view; NIfTI and DICOM frame order). Slabs along the slowest axis bound the temporaries
    (:data:`SLAB_ELEMENTS`).
    """
    maps = maps.float()
    device = maps.device
    nd = len(scan_shape)
    k = maps.shape[0]
    model_shape = tuple(maps.shape[1:])
    order = list(range(nd))[::-1] if first_axis_fastest else list(range(nd))  # slow -> fast
    out_mem = torch.empty((k, *[scan_shape[c] for c in order]), dtype=torch.float32,
                          device=device)  # fmt: skip
    m = grid.index_map
    lo, hi = [0.0] * nd, [float(n - 1) for n in model_shape]
    clamp = [None] * nd
    if grid.box is not None:  # valid voxels: the box within the grid; clamping: the box
        lo = [max(a, float(v)) for a, v in zip(lo, grid.box[0], strict=True)]
        hi = [min(b, float(v)) for b, v in zip(hi, grid.box[1], strict=True)]
        if grid.clamp:
            clamp = [(float(a), float(b)) for a, b in zip(*grid.box, strict=True)]
    per_row = max(1, math.prod(scan_shape[c] for c in order[1:]) * k)
    step = max(1, SLAB_ELEMENTS // per_row)
    axes = _separable_axes(m, scan_shape)
    if axes is not None:
        # model dims reordered to follow the output's memory order
        model_dim = {c: r for r, c in enumerate(axes)}  # scan axis -> model axis
        a = maps.permute(0, *[1 + model_dim[c] for c in order])
        weights = []
        for c in order:
            r = model_dim[c]
            i = torch.arange(scan_shape[c], dtype=torch.float64)
            w = _axis_weights(i * m[r, c] + m[r, nd], model_shape[r], lo[r], hi[r], clamp[r],
                              grid.mode)  # fmt: skip
            if grid.scan_box is not None:  # scan voxels the resampling never read: zero
                inside = (i >= grid.scan_box[0][c]) & (i <= grid.scan_box[1][c])
                w = (w[0], w[1], w[2] * inside, w[3] * inside)
            weights.append(tuple(t.to(device=device, dtype=torch.float32 if t.is_floating_point()
                                      else torch.long) for t in w))  # fmt: skip
        sizes = [model_shape[model_dim[c]] for c in order]
        for s0 in range(0, scan_shape[order[0]], step):
            s1 = min(s0 + step, scan_shape[order[0]])
            ws = [tuple(t[s0:s1] for t in weights[0]), *weights[1:]]
            axes_order = _step_order([len(w[0]) for w in ws], sizes)
            for j in range(k):  # one map at a time: its slab of the output is contiguous
                b = a[j]
                for n, d in enumerate(axes_order):
                    last = out_mem[j, s0:s1] if n == nd - 1 else None
                    b = _along(b, d, ws[d], sizes[d], out=last)
    else:
        _grid_sample_slabs(maps, m, scan_shape, order, lo, hi, clamp, grid.mode, out_mem, step)
        if grid.scan_box is not None:  # scan voxels the resampling never read: zero
            for i, c in enumerate(order):
                a, b = int(grid.scan_box[0][c]), int(grid.scan_box[1][c])
                index = [slice(None)] * (nd + 1)
                index[1 + i] = slice(0, max(a, 0))
                out_mem[tuple(index)] = 0
                index[1 + i] = slice(b + 1, None)
                out_mem[tuple(index)] = 0
    inverse = [0] * nd
    for pos_, c in enumerate(order):
        inverse[c] = pos_
    return out_mem.permute(0, *[1 + inverse[c] for c in range(nd)])


def _grid_sample_slabs(maps, m, scan_shape, order, lo, hi, clamp, mode, out_mem, step) -> None:
    """The general (oblique) case: coordinates per slab, ``grid_sample`` with zero padding on
    the data box (``align_corners=True``: index ``i`` is voxel centre ``i``)."""
    import torch.nn.functional as F

    nd = len(scan_shape)
    device = maps.device
    # the data box as its own tensor, so grid_sample's zero padding is MONAI's outside
    lo_i = [math.floor(v) for v in lo]
    hi_i = [math.ceil(v) for v in hi]
    crop = maps[(slice(None), *[slice(a, b + 1) for a, b in zip(lo_i, hi_i, strict=True)])]
    size = [b - a + 1 for a, b in zip(lo_i, hi_i, strict=True)]
    m32 = torch.as_tensor(m, dtype=torch.float64)
    rot = m32[:nd, :nd].to(device=device, dtype=torch.float32)
    for s0 in range(0, scan_shape[order[0]], step):
        s1 = min(s0 + step, scan_shape[order[0]])
        ranges = []
        for i, c in enumerate(order):
            n0, n1 = (s0, s1) if i == 0 else (0, scan_shape[c])
            ranges.append(torch.arange(n0, n1, device=device, dtype=torch.float32))
        idx = torch.meshgrid(*ranges, indexing="ij")  # scan index per axis, in memory order
        coords = []
        for r in range(nd):  # model coordinate r at every sample
            p = torch.full_like(idx[0], float(m[r, nd]))
            for i, c in enumerate(order):
                if rot[r, c] != 0:
                    p.add_(idx[i], alpha=float(rot[r, c]))
            if clamp[r] is not None:
                p.clamp_(*clamp[r])
            p.sub_(lo_i[r])
            p.mul_(2.0 / max(size[r] - 1, 1)).sub_(1.0)  # to [-1, 1], align_corners=True
            coords.append(p)
        g = torch.stack(coords[::-1], dim=-1)[None]  # grid_sample: last coordinate = dim 1
        sampled = F.grid_sample(crop[None], g, mode="nearest" if mode == "nearest" else
                                "bilinear", padding_mode="zeros", align_corners=True)  # fmt: skip
        out_mem[:, s0:s1] = sampled[0]
