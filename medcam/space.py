"""From scan to model space and back: heatmaps on the original scan grid.

The scan (``Scan.image``, a MetaTensor with its RAS affine) goes through the user's MONAI
preprocessing (array transforms such as ``Orientation``, ``Spacing``, ``ScaleIntensityRange``,
``ResizeWithPadOrCrop``); the CAM is computed in model space, then put back on the source grid
with the source shape and affine: the spatial transforms recorded in the model input's
``applied_operations`` are composed into one map and the heatmap is resampled once
(:mod:`medcam.inverse`, on the model's device); a chain that cannot be composed is undone by
MONAI's own inverse transforms (logged, and recorded in the result). Intensity transforms are
not spatial and are skipped.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medcam.engine.core import Explainer
from medcam.engine.layers import model_device
from medcam.engine.postprocess import Normalization, normalize_maps
from medcam.engine.result import CAMResult
from medcam.errors import MedcamError
from medcam.io.scan import Scan, load_scan

__all__ = ["ScanExplanation", "explain_scan", "invert_to_source", "on_source", "preprocess_scan"]


@dataclass
class ScanExplanation:
    """Heatmaps of one scan, on the scan's own grid.

    Attributes
    ----------
    scan:
        The source :class:`~medcam.io.scan.Scan`.
    heatmap:
        ``(K, *source_spatial)`` float32 on the model's device: one map per target, on the source
        voxel grid (``scan.affine_ras``), normalised as ``normalization`` says (default raw).
    cam:
        The model-space :class:`~medcam.CAMResult` (raw feature maps, classes, scores, ...).
    normalization:
        What was applied to ``heatmap`` (after inversion).
    preprocessing:
        Names of the preprocessing transforms that ran.
    inverse:
        How the maps were put back on the scan grid: ``{"method": "composed", "transforms",
        "resamples": 1, "interpolation"}`` (one resample, :mod:`medcam.inverse`),
        ``{"method": "monai", "reason"}`` (MONAI's inverse transforms, and why) or
        ``{"method": "none"}`` (no geometry to undo).
    """

    scan: Scan
    heatmap: torch.Tensor
    cam: CAMResult
    normalization: dict[str, Any]
    preprocessing: list[str] = field(default_factory=list)
    inverse: dict[str, Any] = field(default_factory=dict)

    @property
    def target_labels(self) -> list[str]:
        """One file-name-safe label per map, e.g. ``["class1"]`` or ``["target0"]``."""
        labels = []
        for k, c in enumerate(self.cam.classes[0].tolist()):
            labels.append(f"class{c}" if c >= 0 else f"target{k}")
        return labels

    def probabilities(self) -> list[float] | None:
        """Softmax probability of each target class (classifiers only)."""
        if self.cam.logits is None:
            return None
        p = torch.softmax(self.cam.logits[0].float(), dim=0)
        return [float(p[c]) if c >= 0 else float("nan") for c in self.cam.classes[0].tolist()]

    def metadata(self) -> dict[str, Any]:
        meta = self.cam.metadata()
        meta.update(
            {
                "normalization": dict(self.normalization),
                "preprocessing": list(self.preprocessing),
                "inverse": dict(self.inverse),
                "source_shape": list(self.scan.spatial_shape),
                "source_affine_ras": self.scan.affine_ras.tolist(),
                "model_input_shape": list(self.cam.input_shape),
                "target_labels": self.target_labels,
                "probabilities": self.probabilities(),
            }
        )
        return meta


def _names(transform: Any) -> list[str]:
    inner = getattr(transform, "transforms", None)
    if inner is not None:
        return [type(t).__name__ for t in inner]
    return [type(transform).__name__]


def invert_to_source(
    maps: torch.Tensor, model_input: Any, preprocess: Any, scan: Scan, record: dict | None = None
):
    """Put ``maps: (K, *model_spatial)`` back on the scan grid.

    ``model_input`` is the preprocessed MetaTensor whose ``applied_operations`` and affine
    describe the geometry to undo. The spatial transforms are composed into one map from scan
    voxels to model voxels and the heatmap is resampled once, in float32, in slabs, on the
    maps' device (:mod:`medcam.inverse`). A chain that cannot be composed (a transform medcam
    does not compose, a lazy chain, ...) is undone by MONAI's inverse transforms instead, and
    the reason is logged (logger ``medcam``) and recorded in ``record`` when given
    (``{"method": "composed" | "monai" | "none", ...}``).

    MONAI's inverse lands on the grid of the image the preprocessing started from; when that
    image was read by another reader than ``scan`` (a bundle's ``LoadImage`` orders DICOM
    slices by InstanceNumber, :func:`medcam.load_scan` by position), the two grids are compared
    in world coordinates and the map is flipped / transposed onto the scan's grid when they
    cover the same voxels (the composed inverse places every scan voxel by world position).
    Returns a ``(K, *source_spatial)`` tensor.

    Raises
    ------
    MedcamError
        When the inverted grid and the scan's differ for real (voxel size, orientation, origin,
        shape), naming the difference.
    """
    from monai.data import MetaTensor

    from medcam.inverse import GridMap, compose_inverse, resample_to_grid
    from medcam.progress import stage

    record = {} if record is None else record
    if isinstance(model_input, torch.Tensor):
        maps = maps.to(model_input.device)  # invert where the preprocessing ran
    spatial_ops = getattr(model_input, "applied_operations", [])
    with stage("back to scan"):
        if preprocess is None or (isinstance(model_input, MetaTensor) and not spatial_ops):
            record.update(method="none")  # nothing geometric to undo (intensity transforms only)
            out = maps
            if isinstance(model_input, MetaTensor):
                out = MetaTensor(maps, affine=model_input.affine)
        elif not isinstance(model_input, MetaTensor):
            raise MedcamError(
                "The preprocessing returned a plain tensor, so its geometry cannot be undone. "
                "Use MONAI array transforms (they return MetaTensors with applied_operations)."
            )
        else:
            grid = compose_inverse(model_input, scan.affine_ras, scan.spatial_shape)
            if isinstance(grid, GridMap):
                record.update(method="composed", transforms=list(grid.transforms),
                              resamples=1, interpolation=grid.mode)  # fmt: skip
                return resample_to_grid(
                    maps, grid, scan.spatial_shape, first_axis_fastest=True
                )  # NIfTI / DICOM order
            record.update(method="monai", reason=grid)
            logging.getLogger("medcam").info(
                "medcam: back to the scan grid with MONAI's inverse transforms (%s)", grid
            )
            out = _monai_inverse(maps, model_input, preprocess, spatial_ops)
        if isinstance(out, MetaTensor):
            affine = np.asarray(out.affine, dtype=np.float64)
            out = _onto_scan_grid(out.as_tensor(), affine, scan, preprocess)
    shape = tuple(out.shape[1:])
    if shape != scan.spatial_shape:
        raise MedcamError(
            f"After undoing the preprocessing the heatmap has shape {shape}, but the scan has "
            f"{scan.spatial_shape}: a spatial transform in the preprocessing is not invertible "
            f"(transforms: {', '.join(_names(preprocess))}). Use MONAI's invertible transforms "
            "for geometry (Spacing, Orientation, Resize, SpatialPad, CropForeground, ...)."
        )
    return out.float()


def _monai_inverse(maps: torch.Tensor, model_input: Any, preprocess: Any, spatial_ops: list):
    """MONAI's own inverse of ``preprocess`` applied to ``maps`` (the fallback)."""
    from monai.data import MetaTensor

    if not hasattr(preprocess, "inverse"):
        raise MedcamError(
            f"The preprocessing {type(preprocess).__name__} changed the geometry but has no "
            "inverse(); use MONAI invertible transforms (a monai.transforms.Compose)."
        )
    wrapped = MetaTensor(
        maps,
        meta=copy.deepcopy(model_input.meta),  # holds the model-space affine
        applied_operations=copy.deepcopy(spatial_ops),
    )
    return preprocess.inverse(wrapped)


def _affine_nd(affine: np.ndarray, nd: int) -> np.ndarray:
    """The ``(nd + 1) x (nd + 1)`` spatial part of a 4x4 (or smaller) affine."""
    a = np.asarray(affine, dtype=np.float64)
    keep = [*range(nd), a.shape[0] - 1]
    return a[np.ix_(keep, keep)]


def _voxel_sizes(a: np.ndarray) -> np.ndarray:
    return np.sqrt((a[:-1, :-1] ** 2).sum(axis=0))


def _fmt(values) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def _onto_scan_grid(maps: torch.Tensor, affine: np.ndarray, scan: Scan, preprocess: Any):
    """``maps: (K, *S)`` on the grid ``affine`` (voxel -> RAS mm), brought onto the scan's grid.

    Identical grids pass through; grids covering the same voxel centres in another axis order
    or direction (e.g. slices numbered against the slice normal) are flipped / transposed; any
    other difference is an error that names it.
    """
    mapped = same_voxels(maps, affine, scan)
    if mapped is not None:
        return mapped
    nd = maps.ndim - 1
    a, b = _affine_nd(affine, nd), _affine_nd(scan.affine_ras, nd)
    raise MedcamError(_grid_difference(a, b, tuple(maps.shape[1:]), scan.spatial_shape,
                                       preprocess))  # fmt: skip


def same_voxels(maps: torch.Tensor, affine: np.ndarray, scan: Scan) -> torch.Tensor | None:
    """``maps: (K, *S)`` on the grid ``affine`` put on the scan's grid when both grids have
    the same voxel centres (to a tenth of a voxel), in any axis order or direction; else
    ``None``."""
    nd = maps.ndim - 1
    a = _affine_nd(affine, nd)
    b = _affine_nd(scan.affine_ras, nd)
    shape_in = tuple(maps.shape[1:])
    shape_scan = scan.spatial_shape
    spacing = _voxel_sizes(b)
    tol_mm = max(0.1 * float(spacing.min()), 1e-4)
    t = np.linalg.solve(b, a)  # voxel index in the map's grid -> voxel index in the scan's
    r = t[:nd, :nd]
    axes = [int(np.argmax(np.abs(r[i]))) for i in range(nd)]
    signs = [float(np.sign(r[i, axes[i]])) for i in range(nd)]
    mapped = None
    if sorted(axes) == list(range(nd)) and all(
        shape_scan[i] == shape_in[axes[i]] for i in range(nd)
    ):
        # index in the scan grid for each corner of the map's grid; compare world positions
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape_in], indexing="ij"))
        corners = corners.reshape(nd, -1).T.astype(np.float64)
        scan_idx = np.empty_like(corners)
        for i in range(nd):
            j = axes[i]
            scan_idx[:, i] = corners[:, j] if signs[i] > 0 else shape_in[j] - 1 - corners[:, j]
        world_in = (a @ np.c_[corners, np.ones(len(corners))].T)[:nd]
        world_scan = (b @ np.c_[scan_idx, np.ones(len(scan_idx))].T)[:nd]
        if np.abs(world_in - world_scan).max() <= tol_mm:
            mapped = maps.permute(0, *[1 + j for j in axes])
            flip = [1 + i for i in range(nd) if signs[i] < 0]
            if flip:
                mapped = mapped.flip(flip)
    return None if mapped is None else mapped.contiguous()


def grid_differences(a, b, shape_in, shape_scan) -> str:
    """How grid ``a`` (shape ``shape_in``) differs from the scan's ``b``, in words."""
    nd = len(shape_in)
    diffs = []
    sa, sb = _voxel_sizes(a), _voxel_sizes(b)
    if not np.allclose(np.sort(sa), np.sort(sb), rtol=1e-3, atol=1e-4):
        diffs.append(f"voxel size {_fmt(sa)} mm instead of the scan's {_fmt(sb)} mm")
    da, db = a[:nd, :nd] / sa, b[:nd, :nd] / sb
    # largest angle between an axis of the map's grid and the closest axis of the scan's grid
    cos = np.abs(da.T @ db).max(axis=1).clip(-1, 1)
    angle = float(np.degrees(np.arccos(cos)).max())
    if angle > 0.01:
        diffs.append(f"axes rotated by {angle:.3g} degrees")
    if tuple(sorted(shape_in)) != tuple(sorted(shape_scan)):
        diffs.append(f"shape {list(shape_in)} instead of {list(shape_scan)}")
    centre_a = a @ np.append((np.asarray(shape_in) - 1) / 2.0, 1.0)
    centre_b = b @ np.append((np.asarray(shape_scan) - 1) / 2.0, 1.0)
    shift = float(np.linalg.norm(centre_a[:nd] - centre_b[:nd]))
    if shift > 1e-3:
        diffs.append(f"centre shifted by {shift:.3g} mm")
    return "; ".join(diffs) if diffs else "a grid that does not cover the same voxel centres"


def _grid_difference(a, b, shape_in, shape_scan, preprocess) -> str:
    """A sentence naming how grid ``a`` (shape ``shape_in``) differs from the scan's ``b``."""
    what = grid_differences(a, b, shape_in, shape_scan)
    names = ", ".join(_names(preprocess)) if preprocess is not None else "none"
    return (
        f"After undoing the preprocessing, the heatmap lies on a grid that differs from the "
        f"scan's: {what}. Either a transform changed the geometry without recording it (not "
        f"invertible; transforms: {names}), or the image the preprocessing started from was read "
        "with another geometry than medcam.load_scan reads (e.g. a DICOM series whose slices "
        "are not equally spaced, or a reader that ignores the orientation). Use MONAI's "
        "invertible transforms, and check the input with medcam.load_scan."
    )


def on_source(
    scan: Scan, cam: CAMResult, model_input: Any, preprocess: Any, normalize: Normalization
) -> ScanExplanation:
    """The explanation of one scan from its (batch-of-one) model-space ``cam``: the maps inverted
    to the scan grid (:func:`invert_to_source`), then normalised as asked and recorded."""
    inverse: dict[str, Any] = {}
    source_maps = invert_to_source(cam.heatmap[0], model_input, preprocess, scan, inverse)
    heatmap, record = normalize_maps(source_maps[None], normalize)
    names = _names(preprocess) if preprocess is not None else []
    return ScanExplanation(scan, heatmap[0], cam, record, names, inverse)


def _window(inferer: Any, roi_size, sw_batch_size: int, overlap: float):
    """The inferer to follow: ``inferer`` as given, else a Gaussian-blended sliding window of
    ``roi_size`` when one is given, else ``None`` (whole input)."""
    if inferer is not None:
        return inferer
    if roi_size is None:
        return None
    from medcam.engine.sliding import SlidingWindow

    return SlidingWindow(tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap,
                         mode="gaussian")  # fmt: skip


def preprocess_scan(scan: Scan, preprocess: Any, device: Any, expect: Any = None):
    """``preprocess(scan.image)`` on ``device``, checked against what the network takes
    (``expect``, an :class:`medcam.engine.inferer.InputSpec`) before any model runs.

    Raises
    ------
    InputError
        The preprocessing failed on the scan, or its output has a rank or channel count the
        network does not take (e.g. a single 2D slice for a 3D network).
    """
    from medcam.engine.inferer import check_model_input
    from medcam.errors import InputError

    what = f"The scan {scan.source}" if scan.source is not None else "The scan"
    image = scan.image.to(device)
    if preprocess is None:
        model_input = image
    else:
        try:
            model_input = preprocess(image)
        except MedcamError:
            raise
        except Exception as err:
            check_model_input(tuple(image.shape), expect, what)  # a rank mismatch says more
            raise InputError(
                f"The preprocessing failed on {what.split(' ', 1)[1]} (shape "
                f"{list(image.shape)}): {type(err).__name__}: {err}"
            ) from err
    check_model_input(tuple(model_input.shape), expect, what)
    return model_input


def explain_scan(
    model: nn.Module,
    scan: Scan | str | Any,
    *,
    preprocess: Any = None,
    target: Any = "pred",
    layers: Any = "auto",
    method: str = "auto",
    normalize: Normalization = "none",
    explainer: Explainer | None = None,
    inferer: Any = None,
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    forward_kwargs: dict[str, Any] | None = None,
    extra_inputs: Sequence[Any] = (),
    expect: Any = None,
    **explainer_kwargs: Any,
) -> ScanExplanation:
    """Explain one scan and return heatmaps on its original grid.

    Parameters
    ----------
    model:
        The network (eager ``nn.Module``).
    scan:
        A :class:`Scan`, or anything :func:`medcam.load_scan` reads (path, MetaTensor).
    preprocess:
        MONAI array transform(s) applied to ``scan.image (C, *spatial)`` to make the model input
        (e.g. ``Compose([Orientation("RAS"), Spacing((2, 2, 2)), ScaleIntensityRange(...),
        ResizeWithPadOrCrop((96, 96, 96))])``); ``None`` feeds the scan as it is.
    target, layers, method:
        As in :func:`medcam.explain`; ``"pred"`` on a segmentation network is the predicted
        foreground (see :mod:`medcam.engine.inferer`).
    normalize:
        Applied to the maps on the source grid, recorded in the result.
    explainer:
        A configured :class:`medcam.Explainer` to use instead of ``layers``/``method``.
    inferer:
        How the network is run for inference, followed by the heatmap: a MONAI
        ``SlidingWindowInferer`` (e.g. a bundle's) or :class:`medcam.engine.sliding.
        SlidingWindow` explains window by window for a target on the whole stitched
        prediction; ``None`` or ``SimpleInferer`` runs the whole input, padded to a size the
        network takes where it needs one.
    roi_size, sw_batch_size, overlap:
        Shorthand for ``inferer=SlidingWindow(roi_size, sw_batch_size, overlap,
        mode="gaussian")``.
    forward_kwargs, extra_inputs:
        Keyword arguments for ``model.forward`` (passed as they are), and further positional
        inputs after the image (e.g. a clinical vector), each for this one scan: tensors and
        arrays get a batch dimension of 1, like the image. See :class:`medcam.Explainer`. They
        need the whole input in one forward pass (no sliding windows).
    expect:
        What the network takes (:class:`medcam.engine.inferer.InputSpec`); a scan that does not
        fit is refused before the model runs.

    Returns
    -------
    ScanExplanation
        ``heatmap: (K, *source_spatial)`` float32 on the source grid.
    """
    from medcam.engine.inferer import explain_with_inferer

    if not isinstance(scan, Scan):
        scan = load_scan(scan)
    if explainer is None:
        explainer = Explainer(model, layers, method, **explainer_kwargs)
    from medcam.progress import stage

    # preprocessing, CAM and inversion all run on the model's device (no host round trip)
    with stage("preprocess"):
        model_input = preprocess_scan(scan, preprocess, model_device(explainer.model, scan.image),
                                      expect)  # fmt: skip
    # a plain tensor into the network: MetaTensor's per-op metadata handling slows every layer
    plain = model_input.as_tensor() if hasattr(model_input, "as_tensor") else model_input
    batch = torch.as_tensor(plain)[None]
    window = _window(inferer, roi_size, sw_batch_size, overlap)
    extra = [torch.as_tensor(e)[None] if isinstance(e, (torch.Tensor, np.ndarray)) else e
             for e in extra_inputs]  # fmt: skip
    if extra or forward_kwargs:
        from medcam.engine.inferer import resolve_target
        from medcam.engine.sliding import SlidingWindow

        if SlidingWindow.from_inferer(window) is not None:
            raise MedcamError(
                "extra_inputs / forward_kwargs need the whole input in one forward pass; they "
                "cannot be combined with sliding windows (roi_size, a SlidingWindowInferer)."
            )
        with stage("explain"):
            cam = explainer((batch, *extra), resolve_target(target), forward_kwargs=forward_kwargs)
    else:
        with stage("explain"):
            cam = explain_with_inferer(explainer, batch, target, window)
    return on_source(scan, cam, model_input, preprocess, normalize)
