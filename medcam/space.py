"""From scan to model space and back: heatmaps on the original scan grid.

The scan (``Scan.image``, a MetaTensor with its RAS affine) goes through the user's MONAI
preprocessing (array transforms such as ``Orientation``, ``Spacing``, ``ScaleIntensityRange``,
``ResizeWithPadOrCrop``); the CAM is computed in model space, then wrapped as a MetaTensor that
carries the image's ``applied_operations`` and inverted with the same preprocessing, so it lands
on the source grid with the source shape and affine (MONAI's invertible transforms do the
geometry; intensity transforms are not spatial and are skipped).
"""

from __future__ import annotations

import copy
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

__all__ = ["ScanExplanation", "explain_scan", "invert_to_source", "on_source"]


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
    """

    scan: Scan
    heatmap: torch.Tensor
    cam: CAMResult
    normalization: dict[str, Any]
    preprocessing: list[str] = field(default_factory=list)

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


def invert_to_source(maps: torch.Tensor, model_input: Any, preprocess: Any, scan: Scan):
    """Put ``maps: (K, *model_spatial)`` back on the scan grid with MONAI's inverse transforms.

    ``model_input`` is the preprocessed MetaTensor whose ``applied_operations`` describe the
    geometry to undo. Returns a ``(K, *source_spatial)`` tensor, checked to have the source shape
    and affine.
    """
    from monai.data import MetaTensor

    if isinstance(model_input, torch.Tensor):
        maps = maps.to(model_input.device)  # invert where the preprocessing ran
    spatial_ops = getattr(model_input, "applied_operations", [])
    if preprocess is None or (isinstance(model_input, MetaTensor) and not spatial_ops):
        out = maps  # nothing geometric to undo (intensity transforms only)
    else:
        if not isinstance(model_input, MetaTensor):
            raise MedcamError(
                "The preprocessing returned a plain tensor, so its geometry cannot be undone. "
                "Use MONAI array transforms (they return MetaTensors with applied_operations)."
            )
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
        out = preprocess.inverse(wrapped)
    shape = tuple(out.shape[1:])
    if shape != scan.spatial_shape:
        raise MedcamError(
            f"After undoing the preprocessing the heatmap has shape {shape}, but the scan has "
            f"{scan.spatial_shape}: a spatial transform in the preprocessing is not invertible "
            f"(transforms: {', '.join(_names(preprocess))}). Use MONAI's invertible transforms "
            "for geometry (Spacing, Orientation, Resize, SpatialPad, CropForeground, ...)."
        )
    if isinstance(out, MetaTensor):
        err = np.abs(np.asarray(out.affine, dtype=np.float64) - scan.affine_ras).max()
        if err > 1e-3 * max(1.0, np.abs(scan.affine_ras).max()):
            raise MedcamError(
                "After undoing the preprocessing the heatmap's affine differs from the scan's "
                f"by {err:.4g}; a transform changed the geometry without recording it."
            )
        out = out.as_tensor()
    return out.float()


def on_source(
    scan: Scan, cam: CAMResult, model_input: Any, preprocess: Any, normalize: Normalization
) -> ScanExplanation:
    """The explanation of one scan from its (batch-of-one) model-space ``cam``: the maps inverted
    to the scan grid (:func:`invert_to_source`), then normalised as asked and recorded."""
    source_maps = invert_to_source(cam.heatmap[0], model_input, preprocess, scan)
    heatmap, record = normalize_maps(source_maps[None], normalize)
    names = _names(preprocess) if preprocess is not None else []
    return ScanExplanation(scan, heatmap[0], cam, record, names)


def _sliding_window_cam(explainer, batch, target, roi_size, sw_batch_size, overlap) -> CAMResult:
    """The stitched map as a CAMResult whose other fields describe the central window."""
    from dataclasses import replace

    from medcam.engine.sliding import explain_sliding_window

    stitched = explain_sliding_window(explainer, batch, roi_size, target,
                                      sw_batch_size=sw_batch_size, overlap=overlap)  # fmt: skip
    spatial = batch.shape[2:]
    start = [max(0, (n - r) // 2) for n, r in zip(spatial, roi_size, strict=True)]
    crop = tuple(slice(s0, s0 + r) for s0, r in zip(start, roi_size, strict=True))
    window = batch[(slice(None), slice(None), *crop)]
    pad = [p for w, r in zip(reversed(window.shape[2:]), reversed(roi_size), strict=True)
           for p in (0, r - w)]  # fmt: skip
    centre = explainer(torch.nn.functional.pad(window, pad), target)  # padded like MONAI
    return replace(
        centre,
        heatmaps={},
        fused=stitched,
        input_shape=tuple(batch.shape),
        fusion=None,
        extra={"sliding_window": {"roi_size": list(roi_size), "overlap": overlap,
                                  "blending": "gaussian"}},
    )  # fmt: skip


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
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
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
        As in :func:`medcam.explain`.
    normalize:
        Applied to the maps on the source grid, recorded in the result.
    explainer:
        A configured :class:`medcam.Explainer` to use instead of ``layers``/``method``.
    roi_size, sw_batch_size, overlap:
        With ``roi_size``, the model input is explained in sliding windows of that size (MONAI's
        sliding-window inference, Gaussian blending; for fully convolutional networks larger than
        their training patch), and ``cam`` describes the central window.

    Returns
    -------
    ScanExplanation
        ``heatmap: (K, *source_spatial)`` float32 on the source grid.
    """
    if not isinstance(scan, Scan):
        scan = load_scan(scan)
    if explainer is None:
        explainer = Explainer(model, layers, method, **explainer_kwargs)
    # preprocessing, CAM and inversion all run on the model's device (no host round trip)
    image = scan.image.to(model_device(explainer.model, scan.image))
    model_input = preprocess(image) if preprocess is not None else image
    batch = torch.as_tensor(model_input)[None]
    if roi_size is None:
        cam = explainer(batch, target)
    else:
        cam = _sliding_window_cam(explainer, batch, target, roi_size, sw_batch_size, overlap)
    return on_source(scan, cam, model_input, preprocess, normalize)
