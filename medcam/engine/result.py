"""The result of one explanation call."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from medcam.errors import MedcamError

__all__ = ["CAMResult"]


@dataclass
class CAMResult:
    """Heatmaps and everything needed to say how they were made.

    All tensors are detached (no autograd graph is kept) and live on the model's device.

    Attributes
    ----------
    raw:
        Per layer, ``(B, K, *feature_shape)`` float32 maps exactly as the method defines them:
        never normalised, never flipped.
    heatmaps:
        Per layer, ``(B, K, *input_spatial)`` float32 maps upsampled (bi/trilinear,
        ``align_corners=False``) and then normalised as ``normalization`` says.
    fused:
        ``(B, K, *input_spatial)`` fusion of all layers (``fusion`` says how), else ``None``.
    classes:
        ``(B, K)`` int64 class index behind each map, ``-1`` for callable targets.
    scores:
        ``(B, K)`` float32 value of each target score (logit, or region sum for segmentation).
    logits:
        ``(B, num_classes)`` float32 model output for classifiers, ``None`` for segmentation.
    method, layers, feature_shapes, input_shape, target, normalization, fusion:
        What was computed: method name, layer names (in the given order), each layer's
        feature-grid shape, the input's shape ``(B, C, *spatial)``, a description of the target,
        the normalisation record (e.g. ``{"method": "none"}``) and the fusion rule.
    batched_backward:
        True when all K targets went through one batched backward pass, False when they were
        looped (an op without a batching rule) or no backward was needed.
    layers_chosen_by:
        How the layers were chosen: ``"auto: <rule>"`` (``layers="auto"``, the rule in words),
        ``"last: ..."`` or ``"user"`` (named layers).
    method_chosen_by:
        ``"auto: <why>"`` with ``method="auto"``, else ``"user"``.
    """

    raw: dict[str, torch.Tensor]
    heatmaps: dict[str, torch.Tensor]
    fused: torch.Tensor | None
    classes: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor | None
    method: str
    layers: list[str]
    feature_shapes: dict[str, tuple[int, ...]]
    input_shape: tuple[int, ...]
    target: str
    normalization: dict[str, Any]
    fusion: str | None = None
    batched_backward: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    layers_chosen_by: str | None = None
    method_chosen_by: str | None = None

    @property
    def heatmap(self) -> torch.Tensor:
        """``(B, K, *input_spatial)``: the fused map, or the single layer's map."""
        if self.fused is not None:
            return self.fused
        if len(self.layers) == 1:
            return self.heatmaps[self.layers[0]]
        raise MedcamError(
            f"{len(self.layers)} layers were explained without fusion; pick one from "
            "result.heatmaps[layer], or pass fusion='mean' or 'product'."
        )

    @property
    def empty_maps(self) -> list[list[int]]:
        """``[sample, target]`` pairs whose map has no positive value anywhere (every layer's,
        when several were explained without fusion): the map shows nothing."""
        if self.fused is not None or len(self.layers) == 1:
            maps = [self.heatmap]
        else:
            maps = list(self.heatmaps.values())
        positive = torch.stack([m.flatten(2).amax(dim=2) > 0 for m in maps]).any(dim=0)
        return [[int(b), int(k)] for b, k in (~positive).nonzero().tolist()]

    def warning(self, empty: list[list[int]] | None = None) -> str | None:
        """What a reader of the maps must know (an empty map), or ``None``; ``empty``: the
        :attr:`empty_maps` when already computed."""
        empty = self.empty_maps if empty is None else empty
        if not empty:
            return None
        which = ", ".join(f"sample {b} / target {k}" for b, k in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        return (
            f"empty map ({which}{more}): {self.method} found no positive evidence at "
            f"{', '.join(self.layers)}, so the map is zero everywhere and shows nothing. Try "
            "another layer (`medcam layers` lists them) or method (e.g. --method hirescam)."
        )

    def metadata(self) -> dict[str, Any]:
        """JSON-able description of the call (for sidecars and reports); an empty map adds
        ``empty_maps`` and ``warning``."""
        empty = self.empty_maps
        warning = self.warning(empty)
        return {
            "method": self.method,
            "layers": list(self.layers),
            "feature_shapes": {k: list(v) for k, v in self.feature_shapes.items()},
            "input_shape": list(self.input_shape),
            "target": self.target,
            "classes": self.classes.tolist(),
            "scores": self.scores.tolist(),
            "normalization": dict(self.normalization),
            "fusion": self.fusion,
            "upsampling": "linear/bilinear/trilinear, align_corners=False",
            "batched_backward": self.batched_backward,
            **({"layers_chosen_by": self.layers_chosen_by} if self.layers_chosen_by else {}),
            **({"method_chosen_by": self.method_chosen_by} if self.method_chosen_by else {}),
            **({"empty_maps": empty, "warning": warning} if warning else {}),
            **self.extra,
        }

    def sample(self, i: int) -> CAMResult:
        """The result of sample ``i`` alone, as a batch of one."""
        pick = slice(i, i + 1)
        return replace(
            self,
            raw={k: v[pick] for k, v in self.raw.items()},
            heatmaps={k: v[pick] for k, v in self.heatmaps.items()},
            fused=None if self.fused is None else self.fused[pick],
            classes=self.classes[pick],
            scores=self.scores[pick],
            logits=None if self.logits is None else self.logits[pick],
            input_shape=(1, *self.input_shape[1:]),
        )

    def cpu(self) -> CAMResult:
        """A copy with every tensor on the CPU."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.cpu()

        return replace(
            self,
            raw={k: v.cpu() for k, v in self.raw.items()},
            heatmaps={k: v.cpu() for k, v in self.heatmaps.items()},
            fused=move(self.fused),
            classes=self.classes.cpu(),
            scores=self.scores.cpu(),
            logits=move(self.logits),
        )
