"""Heatmaps for volumes larger than the model's input: sliding windows, stitched.

MONAI's ``sliding_window_inference`` tiles the volume and blends overlapping windows
(constant or Gaussian importance); here each window's "prediction" is its heatmap, so the
tiling, batching of windows and blending are MONAI's own. Everything stays on the input's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medcam.engine.core import Explainer

__all__ = ["explain_sliding_window"]


def explain_sliding_window(
    explainer: Explainer,
    x: torch.Tensor,
    roi_size: Sequence[int],
    target: Any,
    *,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    mode: str = "gaussian",
    forward_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Stitched heatmap ``(B, K, *spatial)`` of ``x: (B, C, *spatial)`` from windows of
    ``roi_size``.

    Each window is explained on its own (its own forward, target and backward): use it with
    fully convolutional (segmentation) networks and a :class:`medcam.SegmentationTarget`, whose
    score is defined per window. Maps are raw (not normalised) so overlapping windows blend on one
    scale; normalise the stitched map if you need to. ``forward_kwargs`` go to every window's
    forward pass as they are.
    """
    from monai.inferers import sliding_window_inference

    def heatmap_of(windows: torch.Tensor) -> torch.Tensor:
        return explainer(windows, target, forward_kwargs=forward_kwargs).heatmap

    return sliding_window_inference(
        torch.as_tensor(x), roi_size, sw_batch_size, heatmap_of, overlap=overlap, mode=mode,
        padding_mode="constant",
    )  # fmt: skip
