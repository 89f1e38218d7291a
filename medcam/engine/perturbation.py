"""Gradient-free CAM methods: Score-CAM and Ablation-CAM.

Both weigh the target layer's channels by forward passes instead of gradients, so they work
for models with non-differentiable parts and serve as a gradient-free check of Grad-CAM.

- **Score-CAM** (Wang et al., CVPR-W 2020, Algorithm 1): each channel, upsampled to the input
  and min-max scaled to [0, 1], masks the input; the channel's weight is the softmax, over
  channels, of the target score of the masked input. Map: ``ReLU(sum_c w_c A_c)``.
- **Ablation-CAM** (Desai & Ramaswamy, WACV 2020, Eq. 1): the channel's weight is the relative
  drop of the target score when that channel of the layer is set to zero,
  ``(y - y_c) / |y|``. Map: ``ReLU(sum_c w_c A_c)``.

Cost: one forward pass per channel and sample (``C * B`` in all), run
``perturbations_per_eval`` at a time (Captum's name; pytorch-grad-cam's ``batch_size``). Only
one batch of perturbed inputs exists at a time, so peak memory is bounded by
``perturbations_per_eval`` no-grad forward passes whatever the number of channels
(pytorch-grad-cam's Score-CAM builds all ``C`` masked inputs first). All K targets of a sample
share the same forward passes. Targets are held fixed from the unperturbed call
(:func:`medcam.engine.targets.fixed_target`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medcam.engine.inputs import ModelInputs
from medcam.engine.methods import MethodContext, register_method
from medcam.engine.postprocess import upsample
from medcam.engine.reshape import Layout
from medcam.engine.targets import ScoreFn, select_output
from medcam.errors import MedcamError

__all__ = ["Perturbation", "ablation_cam", "score_cam"]


@dataclass
class Perturbation:
    """Runs the model on perturbed copies of the input (or of one layer's tensor).

    Attributes
    ----------
    model, inputs, output:
        The model, its call (:class:`medcam.engine.inputs.ModelInputs`) and the output selector.
    score:
        ``score(out, rows) -> (M, K)``: the fixed targets of samples ``rows`` on outputs ``out``.
    module, at, layout, raw:
        The target layer's module, whether its ``"output"`` or ``"input"`` is the activation, its
        layout and its raw (un-reshaped) tensor ``(B, ...)`` from the unperturbed call.
    base_scores:
        ``(B, K)`` target scores of the unperturbed call.
    per_eval:
        Perturbed copies per forward pass.
    forwards:
        Forward passes run so far (recorded in the result).
    """

    model: nn.Module
    inputs: ModelInputs
    output: Any
    score: ScoreFn
    module: nn.Module
    at: str
    layout: Layout
    raw: torch.Tensor
    base_scores: torch.Tensor
    per_eval: int
    forwards: int = 0
    _thread: int = field(default_factory=threading.get_ident)

    def _run(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = select_output(self.inputs.rows(x, rows)(self.model), self.output)
            self.forwards += 1
            scores = self.score(out, rows)
        if scores.ndim == 1:
            scores = scores[:, None]
        return scores.detach().float()

    def score_inputs(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``(M, K)`` scores of perturbed images ``x: (M, C, *spatial)`` of samples ``rows``."""
        return self._run(x, rows)

    def score_ablated(self, rows: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """``(M, K)`` scores of samples ``rows`` with channel ``channels[i]`` of the layer's
        tensor set to zero (over the map's grid)."""
        values = self.raw.index_select(0, rows).clone()
        self.layout.zero_channels(values, torch.arange(len(rows), device=rows.device), channels)
        thread = self._thread

        def replace_output(module: nn.Module, args: object, output: object) -> object:
            return values if threading.get_ident() == thread else None

        def replace_input(module: nn.Module, args: tuple) -> object:
            if threading.get_ident() != thread:
                return None
            i = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
            return (*args[:i], values, *args[i + 1 :])

        if self.at == "input":
            handle = self.module.register_forward_pre_hook(replace_input)
        else:
            handle = self.module.register_forward_hook(replace_output)
        try:
            return self._run(self.inputs.x.index_select(0, rows), rows)
        finally:
            handle.remove()


def _pairs(b: int, c: int, device: torch.device, chunk: int):
    """(rows, channels) for every (sample, channel) pair, ``chunk`` at a time."""
    rows = torch.arange(b, device=device).repeat_interleave(c)
    channels = torch.arange(c, device=device).repeat(b)
    for start in range(0, b * c, chunk):
        yield rows[start : start + chunk], channels[start : start + chunk]


def _weighted_relu(weights: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.einsum("bkc,bc...->bk...", weights, a))


def _perturbation(ctx: MethodContext, name: str) -> Perturbation:
    if ctx.perturbation is None:
        raise MedcamError(f"{name} needs the model to run perturbed inputs; call it through "
                          "medcam.explain or medcam.Explainer.")  # fmt: skip
    return ctx.perturbation


@register_method("scorecam", perturbation=True, reference="Wang et al., CVPR-W 2020, Alg. 1")
def score_cam(a: torch.Tensor, g: torch.Tensor | None, ctx: MethodContext) -> torch.Tensor:
    """Weights: softmax over channels of the target score of the input masked by each channel
    (upsampled like the heatmaps, min-max scaled to [0, 1])."""
    p = _perturbation(ctx, "Score-CAM")
    x = p.inputs.x
    b, c = a.shape[:2]
    k = p.base_scores.shape[1]
    scores = a.new_zeros(b, c, k)
    for rows, channels in _pairs(b, c, a.device, p.per_eval):
        masks = upsample(a[rows, channels][None], x.shape[2:])[0]  # (M, *spatial)
        flat = masks.flatten(1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        span = (hi - lo).reshape(-1, *([1] * (masks.ndim - 1)))
        lo = lo.reshape(span.shape)
        masks = torch.where(span > 0, (masks - lo) / span.clamp_min(1e-30), 0.0)
        masked = x.index_select(0, rows) * masks[:, None].to(x.dtype)
        scores[rows, channels] = p.score_inputs(masked, rows)
    weights = torch.softmax(scores.transpose(1, 2), dim=-1)  # (B, K, C)
    return _weighted_relu(weights, a)


@register_method("ablationcam", perturbation=True, reference="Desai & Ramaswamy, WACV 2020, Eq. 1")
def ablation_cam(a: torch.Tensor, g: torch.Tensor | None, ctx: MethodContext) -> torch.Tensor:
    """Weights: relative drop of the target score, ``(y - y_c) / |y|``, when channel ``c`` of
    the layer is zeroed (0 where ``y = 0``)."""
    p = _perturbation(ctx, "Ablation-CAM")
    b, c = a.shape[:2]
    y = p.base_scores.float()  # (B, K)
    drops = a.new_zeros(b, c, y.shape[1])
    for rows, channels in _pairs(b, c, a.device, p.per_eval):
        drops[rows, channels] = y.index_select(0, rows) - p.score_ablated(rows, channels)
    drops = drops.transpose(1, 2)  # (B, K, C)
    denom = y.abs()[..., None]
    weights = torch.where(denom > 0, drops / denom.clamp_min(1e-30), 0.0)
    return _weighted_relu(weights, a)
