"""Heatmaps the way a sliding-window inferer predicts: per window, for a whole-volume target.

MONAI's ``SlidingWindowInferer`` predicts a volume from windows: with ``p_w`` the network's
output on window ``w``, ``imp`` the inferer's importance map (``mode``, ``sigma_scale``) and
``count`` the sum of the importance maps of every window covering a voxel, the stitched
prediction is ``P = sum_w beta_w * p_w`` with ``beta_w = imp / count`` (on the input padded to
at least ``roi_size``, padding cropped afterwards). A target defined on the whole prediction,
``s = f(P)`` (e.g. a class's logits summed over the region the stitched prediction assigns to
it), then has, by the chain rule, the gradient w.r.t. the target layer's output in window ``w``
of the *window* score ``s_w = sum_v M(v) * beta_w(v) * p_w(v)`` with ``M = df/dP``. Each window
is explained on its own with that score, one window graph at a time; the maps are then stitched
as the quantities they are made of combine over the volume:

- **gradients add** (they are parts of the derivative of one score) and **activations blend**
  with the inferer's weights ``beta_w`` (they are repeated measurements of one feature map);
- **element-wise methods** (``hirescam``, ``layercam``) are per-cell products of the two, so each
  window's map is added into the volume;
- **global-weight methods** (``gradcam``, ``xgradcam``, ``gradcam++``) first accumulate their
  channel weights over every window (Grad-CAM's mean gradient is a mean over the whole volume,
  not per window), then weight each window's activations and blend them with the inferer's own
  ``sliding_window_inference`` (same ``mode``, ``overlap``, padding) before the final ReLU;
- ``cam`` (no gradients) blends the per-window maps like the prediction.

For a network whose windows predict what the whole volume would (a network of 1x1 convolutions,
or a volume that is one window), this is exactly the whole-volume CAM, for every method. For a
real CNN, windows see zero padding at their borders, so the stitched prediction itself differs
from a whole-volume forward; the heatmap is then exactly the CAM of the inferer as the bundle
runs it (the composite ``f(sliding_window_inference(net, x))``), which is what the bundle's
output depends on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from medcam.engine.auto import auto_method
from medcam.engine.core import Explainer
from medcam.engine.inputs import model_dtype
from medcam.engine.layers import eval_mode, model_device
from medcam.engine.methods import GRADCAM_PP_EPS, XGRADCAM_EPS, CAMMethod, get_method
from medcam.engine.postprocess import fuse_maps
from medcam.engine.result import CAMResult
from medcam.engine.targets import select_output
from medcam.errors import MedcamError, ModelError, TargetError

__all__ = ["SlidingWindow", "WindowLayout", "explain_sliding_window", "window_layout"]

ELEMENTWISE = ("hirescam", "layercam")
GLOBAL_WEIGHTS = ("gradcam", "xgradcam", "gradcam++")
BLENDED = ("cam",)


@dataclass(frozen=True)
class SlidingWindow:
    """The sliding-window settings of MONAI's ``SlidingWindowInferer``, as medcam uses them.

    Attributes
    ----------
    roi_size:
        Window size (non-positive entries take the image's size, as in MONAI).
    sw_batch_size:
        Windows per forward pass in the passes that need no gradient (the pass with gradients
        always takes one window at a time).
    overlap, mode, sigma_scale, padding_mode, cval:
        As in :func:`monai.inferers.sliding_window_inference`.
    device:
        Where the stitched maps are accumulated (``None``: the input's device); MONAI's
        ``device`` argument, e.g. ``"cpu"`` to keep large volumes off the GPU.
    """

    roi_size: tuple[int, ...]
    sw_batch_size: int = 1
    overlap: float | tuple[float, ...] = 0.25
    mode: str = "constant"
    sigma_scale: float | tuple[float, ...] = 0.125
    padding_mode: str = "constant"
    cval: float = 0.0
    device: str | None = None

    def __post_init__(self) -> None:
        roi = self.roi_size
        roi = (int(roi),) if isinstance(roi, int) else tuple(int(r) for r in roi)
        object.__setattr__(self, "roi_size", roi)
        overlaps = self.overlap if isinstance(self.overlap, Sequence) else [self.overlap]
        if any(not 0 <= float(o) < 1 for o in overlaps):
            raise MedcamError(f"Sliding-window overlap must be in [0, 1), got {self.overlap}.")
        if int(self.sw_batch_size) < 1:
            raise MedcamError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}.")
        if str(self.mode) not in ("constant", "gaussian"):
            raise MedcamError(
                f"Sliding-window mode must be 'constant' or 'gaussian', not {self.mode!r}."
            )

    @classmethod
    def from_inferer(cls, inferer: Any) -> SlidingWindow | None:
        """Settings of a MONAI ``SlidingWindowInferer`` (or subclass), ``None`` for a
        ``SimpleInferer`` or ``None``; a :class:`SlidingWindow` is returned as it is.

        Raises
        ------
        MedcamError
            For other inferers, which medcam cannot follow window by window.
        """
        if inferer is None or isinstance(inferer, SlidingWindow):
            return inferer
        from monai.inferers import SimpleInferer, SlidingWindowInferer

        if isinstance(inferer, SlidingWindowInferer):
            device = getattr(inferer, "device", None)
            return cls(
                roi_size=tuple(inferer.roi_size) if isinstance(inferer.roi_size, Sequence)
                else (int(inferer.roi_size),),
                sw_batch_size=int(inferer.sw_batch_size),
                overlap=inferer.overlap,
                mode=str(getattr(inferer.mode, "value", inferer.mode)),
                sigma_scale=inferer.sigma_scale,
                padding_mode=str(getattr(inferer.padding_mode, "value", inferer.padding_mode)),
                cval=float(inferer.cval),
                device=None if device is None else str(device),
            )  # fmt: skip
        if isinstance(inferer, SimpleInferer):
            return None
        raise MedcamError(
            f"medcam cannot follow a {type(inferer).__name__} window by window; it follows "
            "SimpleInferer and SlidingWindowInferer. Give the window explicitly (roi_size / "
            "--roi-size) or explain the whole volume."
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able settings (recorded in the sidecar)."""
        overlap = list(self.overlap) if isinstance(self.overlap, Sequence) else self.overlap
        sigma = (
            list(self.sigma_scale) if isinstance(self.sigma_scale, Sequence) else self.sigma_scale
        )
        return {
            "roi_size": list(self.roi_size),
            "sw_batch_size": int(self.sw_batch_size),
            "overlap": overlap,
            "mode": str(self.mode),
            "sigma_scale": sigma,
            "padding_mode": str(self.padding_mode),
            "cval": float(self.cval),
        }


@dataclass
class WindowLayout:
    """Where the windows of one volume lie, and how the inferer weights them.

    Attributes
    ----------
    spatial:
        The input's spatial shape.
    padded:
        The shape the windows tile (the input padded to at least ``roi_size``).
    pad:
        ``torch.nn.functional.pad`` widths (last dimension first), MONAI's symmetric padding.
    crop:
        The input's region in the padded grid.
    roi:
        The window size.
    slices:
        One tuple of spatial slices (in the padded grid) per window, in MONAI's order.
    importance:
        ``(*roi)`` importance map of a window.
    count:
        ``(*padded)`` sum of the importance maps of every window covering each voxel.
    """

    spatial: tuple[int, ...]
    padded: tuple[int, ...]
    pad: list[int]
    crop: tuple[slice, ...]
    roi: tuple[int, ...]
    slices: list[tuple[slice, ...]]
    importance: torch.Tensor
    count: torch.Tensor = field(repr=False)

    def beta(self, i: int) -> torch.Tensor:
        """``(*roi)`` weight of window ``i``'s prediction in the stitched one: imp / count."""
        return self.importance / self.count[self.slices[i]]

    def inside(self, i: int) -> torch.Tensor:
        """``(*roi)`` 1 where window ``i`` covers the input, 0 on its padding."""
        mask = torch.ones(self.roi, device=self.count.device)
        for d, (sl, keep) in enumerate(zip(self.slices[i], self.crop, strict=True)):
            lo, hi = max(keep.start - sl.start, 0), min(keep.stop - sl.start, self.roi[d])
            index = [slice(None)] * len(self.roi)
            index[d] = slice(0, lo)
            mask[tuple(index)] = 0
            index[d] = slice(hi, None)
            mask[tuple(index)] = 0
        return mask


def window_layout(
    spatial: Sequence[int], window: SlidingWindow, device: torch.device | str = "cpu"
) -> WindowLayout:
    """The windows MONAI's ``sliding_window_inference`` uses on a volume of shape ``spatial``
    (same padding, scan interval, order and importance weighting)."""
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.utils import ensure_tuple_rep, fall_back_tuple

    spatial = tuple(int(s) for s in spatial)
    nd = len(spatial)
    if len(window.roi_size) not in (1, nd):
        raise MedcamError(
            f"The window size {list(window.roi_size)} has {len(window.roi_size)} dimensions but "
            f"the model input has {nd} spatial dimensions {list(spatial)}."
        )
    roi = tuple(int(r) for r in fall_back_tuple(ensure_tuple_rep(window.roi_size, nd), spatial))
    overlap = ensure_tuple_rep(window.overlap, nd)
    padded = tuple(max(s, r) for s, r in zip(spatial, roi, strict=True))
    pad: list[int] = []
    for d in reversed(range(nd)):  # F.pad order: last dimension first, MONAI's halves
        diff = padded[d] - spatial[d]
        pad.extend([diff // 2, diff - diff // 2])
    starts = [pad[2 * (nd - 1 - d)] for d in range(nd)]
    crop = tuple(slice(s0, s0 + n) for s0, n in zip(starts, spatial, strict=True))
    interval = []
    for r, n, o in zip(roi, padded, overlap, strict=True):
        interval.append(r if r == n else max(int(r * (1 - float(o))), 1))
    slices = [
        tuple(slice(int(s.start), int(s.stop)) for s in sl)
        for sl in dense_patch_slices(padded, roi, interval, return_slice=True)
    ]
    importance = compute_importance_map(
        roi, mode=window.mode, sigma_scale=window.sigma_scale, device=device, dtype=torch.float32
    )
    count = torch.zeros(padded, dtype=torch.float32, device=device)
    for sl in slices:
        count[sl] += importance
    return WindowLayout(spatial, padded, pad, crop, roi, slices, importance, count)


def _pad(x: torch.Tensor, layout: WindowLayout, window: SlidingWindow) -> torch.Tensor:
    if not any(layout.pad):
        return x
    from monai.utils import PytorchPadMode, look_up_option

    mode = look_up_option(window.padding_mode, PytorchPadMode)
    return F.pad(x, pad=layout.pad, mode=mode, value=window.cval)


# --- the whole-volume target, split over windows ------------------------------------------


@dataclass
class _TargetPart:
    """``d score_k / d P`` for one target k, stored compactly on the padded grid."""

    channel: int | None  # the one channel it touches, else None
    index: torch.Tensor | None  # (*padded) channel per voxel, when each voxel touches one
    weight: torch.Tensor  # (*padded), or (C, *padded) when dense


def _split_target(
    prediction: torch.Tensor, target_fn: Any, layout: WindowLayout
) -> tuple[torch.Tensor, torch.Tensor, list[_TargetPart], str]:
    """Scores, classes, per-target gradient of ``target_fn`` at the stitched ``prediction``
    ``(1, C, *spatial)`` (padded to the windows' grid) and its description."""
    p = prediction.detach().float().requires_grad_(True)
    with torch.enable_grad():
        scores, classes = target_fn(p)
        if not isinstance(scores, torch.Tensor) or scores.ndim != 2 or scores.shape[0] != 1:
            raise TargetError("A sliding-window target must give (1, K) scores for one volume.")
        parts = []
        k_total = scores.shape[1]
        if not scores.requires_grad:
            raise TargetError(
                "The target's scores do not depend on the stitched prediction (no gradient "
                "reaches it), so every window's map would be empty. Give a target computed from "
                "the logits it is passed."
            )
        for k in range(k_total):
            (grad,) = torch.autograd.grad(
                scores[0, k], p, retain_graph=k < k_total - 1, allow_unused=True
            )
            grad = torch.zeros_like(p) if grad is None else grad
            parts.append(_compact(grad[0].detach(), layout))
            del grad
    description = target_fn.describe(p.ndim) + ", on the stitched sliding-window prediction"
    return scores.detach().float(), classes.detach(), parts, description


def _compact(grad: torch.Tensor, layout: WindowLayout) -> _TargetPart:
    """Store ``grad: (C, *spatial)`` as one channel, a channel index per voxel, or dense;
    padded with zeros to the windows' grid (padding is cropped from the prediction)."""
    nonzero = grad != 0
    per_voxel = nonzero.sum(dim=0)
    channels = nonzero.flatten(1).any(dim=1).nonzero().flatten().tolist()
    pad = layout.pad
    if len(channels) <= 1:
        ch = channels[0] if channels else 0
        return _TargetPart(ch, None, F.pad(grad[ch], pad) if any(pad) else grad[ch].clone())
    if int(per_voxel.max()) <= 1:
        index = grad.abs().argmax(dim=0)
        weight = grad.gather(0, index[None])[0]
        index = index.to(torch.int16 if grad.shape[0] < 2**15 else torch.int32)
        if any(pad):
            index, weight = F.pad(index, pad), F.pad(weight, pad)
        return _TargetPart(None, index, weight)
    return _TargetPart(None, None, F.pad(grad, pad) if any(pad) else grad.clone())


class _WindowTarget:
    """The window score ``sum_v M(v) beta_w(v) p_w(v)`` (see the module docstring)."""

    def __init__(self, parts: list, classes: torch.Tensor, description: str) -> None:
        self.parts = parts  # per target: (channel, index, weight) cut to the window
        self.classes = classes
        self.description = description

    def describe(self, output_ndim: int = 2) -> str:
        return self.description

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.ndim < 3:
            raise ModelError(
                "Sliding windows need a network with a dense (segmentation) output, but this "
                f"one returns {tuple(logits.shape)}. Explain the whole volume (no roi_size)."
            )
        b = logits.shape[0]
        scores = []
        for channel, index, weight in self.parts:
            if channel is not None:
                s = logits[:, channel] * weight
            elif index is not None:
                idx = index.long()[None, None].expand(b, 1, *index.shape)
                s = logits.gather(1, idx)[:, 0] * weight
            else:
                s = logits * weight
            scores.append(s.reshape(b, -1).sum(dim=1))
        return torch.stack(scores, dim=1), self.classes.expand(b, -1)


class _ClassesOnly:
    """A target that only carries the whole-volume classes (for passes without gradients)."""

    def __init__(self, classes: torch.Tensor) -> None:
        self.classes = classes

    def describe(self, output_ndim: int = 2) -> str:
        return "classes of the whole-volume target"

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = logits.shape[0]
        k = self.classes.shape[1]
        return logits.new_zeros(b, k), self.classes.to(logits.device).expand(b, -1)


def _window_parts(parts: list[_TargetPart], sl: tuple, beta: torch.Tensor, device) -> list | None:
    """The target parts cut to one window and weighted by ``beta``; ``None`` when all zero."""
    cut = []
    nonzero = False
    for part in parts:
        w = part.weight[(slice(None), *sl)] if part.weight.ndim > len(sl) else part.weight[sl]
        w = (w * beta).to(device)
        nonzero = nonzero or bool((w != 0).any())
        index = None if part.index is None else part.index[sl].to(device)
        cut.append((part.channel, index, w))
    return cut if nonzero else None


# --- running the explainer with medcam's own per-window reductions ---------------------------


def _with_method(explainer: Explainer, fn: Callable, needs_gradients: bool) -> Explainer:
    """A copy of ``explainer`` (same model, layers, output selector) that computes ``fn``
    instead of its method and fuses nothing. Uses only the engine's public call: ``fn(a, g,
    ctx)`` sees each target layer's activations and gradients, in layer order."""
    clone = copy.copy(explainer)
    clone.method = CAMMethod("sliding-window pass", fn, needs_gradients, "")
    clone.fusion = None
    return clone


def _without_fusion(explainer: Explainer) -> Explainer:
    clone = copy.copy(explainer)
    clone.fusion = None
    return clone


def _pooled(beta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``beta: (n, *roi)`` averaged onto a layer's feature grid ``size`` -> ``(n, *size)``."""
    if tuple(beta.shape[1:]) == tuple(size):
        return beta
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
    return pool[len(size)](beta[:, None], tuple(size))[:, 0]


class _Accumulator:
    """Per-layer sums filled by the engine's calls (layer order is the call order)."""

    def __init__(self, n_layers: int) -> None:
        self.n = n_layers
        self.calls = 0
        self.sums: list[Any] = [None] * n_layers
        self.feature_shapes: list[tuple[int, ...] | None] = [None] * n_layers
        self.beta: torch.Tensor | None = None  # (n, *roi) of the windows in the current call

    def layer(self) -> int:
        i = self.calls % self.n
        self.calls += 1
        return i

    def add(self, i: int, value: torch.Tensor) -> None:
        self.sums[i] = value if self.sums[i] is None else self.sums[i] + value


def _zeros_map(a: torch.Tensor, k: int) -> torch.Tensor:
    return a.new_zeros(a.shape[0], k, *a.shape[2:])


def _spatial_sum(t: torch.Tensor, first: int) -> torch.Tensor:
    return t.sum(dim=tuple(range(first, t.ndim)))


def explain_sliding_window(
    explainer: Explainer,
    x: torch.Tensor,
    roi_size: Sequence[int] | SlidingWindow,
    target: Any = "pred",
    *,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    mode: str = "gaussian",
    prediction: torch.Tensor | None = None,
) -> CAMResult:
    """Explain ``x: (B, C, *spatial)`` the way a sliding-window inferer predicts it.

    Parameters
    ----------
    explainer:
        The configured explainer (model, layers, method, fusion, output selector).
    x:
        The model input, any spatial size (windows are padded as MONAI pads them).
    roi_size:
        The window size, or a :class:`SlidingWindow` with every inferer setting (then
        ``sw_batch_size``, ``overlap`` and ``mode`` are ignored).
    target:
        Defined on the whole stitched prediction ``(B, num_classes, *spatial)``: a class index,
        ``"all"``, ``"pred"`` (the predicted foreground), a
        :class:`medcam.SegmentationTarget` (its mask on the whole input grid), or a callable
        ``logits -> (B, K)``. See the module docstring for how it is split over windows.
    prediction:
        ``(B, num_classes, *spatial)`` stitched logits already computed by the inferer (e.g. by
        the bundle's own evaluator); computed here when ``None``.

    Returns
    -------
    CAMResult
        ``heatmap: (B, K, *spatial)`` raw maps on the input grid; ``raw`` holds the stitched
        per-layer maps at input resolution (the windows' feature grids differ from the
        volume's), ``feature_shapes`` each layer's grid in one window, ``scores``/``classes``
        the whole-volume target, ``extra["sliding_window"]`` the settings and window count.
    """
    from medcam.engine.inferer import resolve_target

    window = roi_size if isinstance(roi_size, SlidingWindow) else SlidingWindow(
        tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode=mode
    )  # fmt: skip
    x = torch.as_tensor(x)
    if x.ndim < 3:
        raise MedcamError(f"The input has shape {tuple(x.shape)}; expected (B, C, *spatial).")
    with torch.inference_mode(False):  # targets and windows need autograd, as in Explainer
        x = x.clone() if x.is_inference() else x  # an inference tensor cannot be saved
        if prediction is not None:
            prediction = torch.as_tensor(prediction)
            prediction = prediction.clone() if prediction.is_inference() else prediction
        target_fn = resolve_target(target)
        results = []
        for b in range(x.shape[0]):
            pred_b = None if prediction is None else prediction[b : b + 1]
            results.append(_explain_one(explainer, x[b : b + 1], window, target_fn, pred_b))
    if len(results) == 1:
        return results[0]
    return _concat(results)


def _concat(results: list[CAMResult]) -> CAMResult:
    first = results[0]
    return replace(
        first,
        raw={k: torch.cat([r.raw[k] for r in results]) for k in first.raw},
        heatmaps={k: torch.cat([r.heatmaps[k] for r in results]) for k in first.heatmaps},
        fused=None if first.fused is None else torch.cat([r.fused for r in results]),
        classes=torch.cat([r.classes for r in results]),
        scores=torch.cat([r.scores for r in results]),
        input_shape=(len(results), *first.input_shape[1:]),
    )


def _stitched_prediction(explainer: Explainer, x: torch.Tensor, window: SlidingWindow):
    """The inferer's own stitched logits (MONAI's sliding_window_inference, no gradients)."""
    from monai.inferers import sliding_window_inference

    model = explainer.model
    dtype = model_dtype(model)

    def predictor(w: torch.Tensor) -> torch.Tensor:
        out = select_output(model(w if dtype is None else w.to(dtype)), explainer.output)
        if out.ndim != w.ndim:
            raise ModelError(
                "Sliding windows need a network with a dense (segmentation) output, but this "
                f"one returns {tuple(out.shape)} per window. Explain the whole volume instead "
                "(no roi_size / --roi-size)."
            )
        return out

    with torch.no_grad(), eval_mode(model, explainer.eval):
        out = sliding_window_inference(
            x, window.roi_size, window.sw_batch_size, predictor, overlap=window.overlap,
            mode=window.mode, sigma_scale=window.sigma_scale, padding_mode=window.padding_mode,
            cval=window.cval, device=window.device,
        )  # fmt: skip
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def _explain_one(
    explainer: Explainer,
    x: torch.Tensor,
    window: SlidingWindow,
    target_fn: Any,
    prediction: torch.Tensor | None,
) -> CAMResult:
    dev = model_device(explainer.model, x)
    x = x.to(dev)
    out_dev = torch.device(window.device) if window.device else x.device
    layout = window_layout(x.shape[2:], window, device=out_dev)
    extra = {
        "sliding_window": {
            **window.describe(),
            "windows": len(layout.slices),
            "padded_shape": list(layout.padded),
            "stitching": "gradients summed over windows, activations blended with the "
            "inferer's importance weights (see medcam.engine.sliding)",
        }
    }
    method = None if explainer.method is None else explainer.method.name  # None: "auto"
    if len(layout.slices) == 1 and (not any(layout.pad) or method not in ("xgradcam", "gradcam++")):
        # (XGrad-CAM and Grad-CAM++ sum activations over the input: with padding, the general
        # path below keeps the padding out of those sums.) One direct call: "auto" is chosen
        # there from the network's real output, a classifier's included (explain_whole's
        # padding comes this way).
        return _single_window(explainer, x, layout, window, target_fn, extra)
    method_chosen_by = explainer.chosen_by or "user"
    if method is None:  # several windows: the output is dense (see auto_method)
        method, method_chosen_by = auto_method((1, 1, *x.shape[2:]))
        method_chosen_by = explainer._why(method_chosen_by)
        explainer = copy.copy(explainer)
        explainer.method = get_method(method)
    if method not in ELEMENTWISE + GLOBAL_WEIGHTS + BLENDED:
        raise MedcamError(
            f"Method {method!r} cannot be split over sliding windows; use one of "
            f"{', '.join(ELEMENTWISE + GLOBAL_WEIGHTS)} or explain the whole volume."
        )
    if prediction is None or tuple(prediction.shape[2:]) != tuple(x.shape[2:]):
        prediction = _stitched_prediction(explainer, x, window)
    scores, classes, parts, description = _split_target(prediction.to(out_dev), target_fn, layout)
    del prediction
    k = scores.shape[1]
    xp = _pad(x, layout, window)
    names, fusion, layers_chosen_by = explainer.layer_plan(
        xp[(slice(None), slice(None), *layout.slices[0])]
    )
    if method in ELEMENTWISE:
        maps, shapes, batched = _elementwise(explainer, xp, layout, parts, classes, description,
                                             names, k)  # fmt: skip
    elif method in GLOBAL_WEIGHTS:
        maps, shapes, batched = _global(explainer, xp, layout, window, parts, classes,
                                        description, names, k)  # fmt: skip
    else:
        maps, shapes, batched = _blended(explainer, xp, layout, window, classes, names), {}, False
    heatmaps = {n: m[(slice(None), slice(None), *layout.crop)] for n, m in maps.items()}
    fused = None
    if fusion is not None and len(names) > 1:
        fused = fuse_maps([heatmaps[n] for n in names], fusion)
    return CAMResult(
        raw=dict(heatmaps),
        heatmaps=heatmaps,
        fused=fused,
        classes=classes.to(out_dev),
        scores=scores.to(out_dev),
        logits=None,
        method=method,
        layers=list(names),
        feature_shapes=shapes,
        input_shape=tuple(x.shape),
        target=description,
        normalization={"method": "none"},
        fusion=fusion if fused is not None else None,
        batched_backward=batched,
        layers_chosen_by=layers_chosen_by,
        method_chosen_by=method_chosen_by,
        extra=extra,
    )


def _single_window(explainer, x, layout, window, target_fn, extra) -> CAMResult:
    """One window covers the (padded) volume: one direct call, target on the cropped logits.

    Grad-CAM's channel weights are a mean over the volume: with padding, the gradient summed
    over the padded grid is divided by the input's own voxel count (as with several windows),
    so the map is the one of the input, not diluted by the padding.
    """
    if not any(layout.pad):
        result = explainer(x, target_fn)
        return replace(result, extra={**result.extra, **extra})
    crop = layout.crop
    result = explainer(_pad(x, layout, window), _Cropped(target_fn, crop))
    scale = 1.0
    if result.method == "gradcam":
        scale = math.prod(layout.padded) / math.prod(layout.spatial)
    heatmaps = {n: m[(slice(None), slice(None), *crop)] * scale for n, m in result.heatmaps.items()}
    raw = {n: m * scale for n, m in result.raw.items()}
    fused = None if result.fused is None else result.fused[(slice(None), slice(None), *crop)]
    return replace(result, raw=raw, heatmaps=heatmaps, fused=fused, input_shape=tuple(x.shape),
                   extra={**result.extra, **extra})  # fmt: skip


class _Cropped:
    """A target evaluated on the logits with the window padding cropped off."""

    def __init__(self, target_fn: Any, crop: tuple[slice, ...]) -> None:
        self.target_fn = target_fn
        self.crop = crop

    def describe(self, output_ndim: int = 2) -> str:
        return self.target_fn.describe(output_ndim)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.ndim > 2:
            logits = logits[(slice(None), slice(None), *self.crop)]
        return self.target_fn(logits)


def _windows_with_weight(layout, parts, device):
    """(index, slices, beta, window target parts) of every window the target reaches."""
    for i, sl in enumerate(layout.slices):
        beta = layout.beta(i)
        cut = _window_parts(parts, sl, beta, device)
        if cut is not None:
            yield i, sl, beta, cut


def _elementwise(explainer, xp, layout, parts, classes, description, names, k):
    """HiResCAM / LayerCAM: each window's map (from its share of the gradient) is added."""
    dev = xp.device
    out_dev = layout.count.device
    acc = {n: torch.zeros(1, k, *layout.padded, device=out_dev) for n in names}
    single = _without_fusion(explainer)
    shapes: dict[str, tuple[int, ...]] = {}
    batched = False
    for _, sl, _, cut in _windows_with_weight(layout, parts, dev):
        xw = xp[(slice(None), slice(None), *sl)]
        res = single(xw, _WindowTarget(cut, classes.to(dev), description))
        for n in names:
            acc[n][(slice(None), slice(None), *sl)] += res.heatmaps[n].to(out_dev)
        shapes = dict(res.feature_shapes)
        batched = res.batched_backward
        del res
    return acc, shapes, batched


def _activation_sums(explainer, xp, layout, window, names):
    """Per layer ``(C,)``: the feature map's sum over the volume, activations blended."""
    acc = _Accumulator(len(names))

    def fn(a, g, ctx):
        i = acc.layer()
        beta = _pooled(acc.beta.to(a.device), a.shape[2:])
        acc.add(i, _spatial_sum(a * beta[:, None], 2).sum(dim=0))
        return _zeros_map(a, 1)

    probe = _with_method(explainer, fn, needs_gradients=False)
    classes = torch.zeros(1, 1, dtype=torch.long)
    n = window.sw_batch_size
    for start in range(0, len(layout.slices), n):
        idx = range(start, min(start + n, len(layout.slices)))
        xw = torch.cat([xp[(slice(None), slice(None), *layout.slices[i])] for i in idx])
        # the whole-volume sum runs over the input, not the padding
        acc.beta = torch.stack([layout.beta(i) * layout.inside(i) for i in idx])
        probe(xw, _ClassesOnly(classes))
    return acc.sums


def _global(explainer, xp, layout, window, parts, classes, description, names, k):
    """Grad-CAM, XGrad-CAM, Grad-CAM++: channel weights accumulated over all windows, then the
    weighted activations blended by the inferer and rectified."""
    method = explainer.method.name
    dev = xp.device
    sum_a = None
    if method in ("xgradcam", "gradcam++"):
        sum_a = _activation_sums(explainer, xp, layout, window, names)
    acc = _Accumulator(len(names))

    def fn(a, g, ctx):
        i = acc.layer()
        acc.feature_shapes[i] = tuple(a.shape[2:])
        if method == "gradcam":
            acc.add(i, _spatial_sum(g, 3))  # (1, K, C)
        elif method == "xgradcam":
            acc.add(i, _spatial_sum(g * a.unsqueeze(1), 3))
        else:  # gradcam++ with each window's estimate of the whole-volume gradient
            beta = _pooled(acc.beta.to(a.device), a.shape[2:])[:, None, None]  # (1,1,1,*S)
            gw = g / beta
            sa = sum_a[i].to(a.device).reshape(1, 1, -1, *([1] * (a.ndim - 2)))
            g2 = gw * gw
            alpha = g2 / (2 * g2 + sa * g2 * gw + GRADCAM_PP_EPS)
            alpha = torch.where(gw != 0, alpha, torch.zeros_like(alpha))
            acc.add(i, _spatial_sum(beta * alpha * torch.relu(gw), 3))
        return _zeros_map(a, g.shape[1])

    grads = _with_method(explainer, fn, needs_gradients=True)
    batched = False
    for _, sl, beta, cut in _windows_with_weight(layout, parts, dev):
        acc.beta = beta[None]
        target = _WindowTarget(cut, classes.to(dev), description)
        res = grads(xp[(slice(None), slice(None), *sl)], target)
        batched = res.batched_backward
        del res
    shapes = {}
    weights = []
    for i, n in enumerate(names):
        if acc.sums[i] is None:  # the target reaches no window: every map is zero
            weights.append(None)
            continue
        shapes[n] = acc.feature_shapes[i]
        if method == "gradcam":
            cells_per_window = math.prod(acc.feature_shapes[i])
            voxels_per_cell = math.prod(layout.roi) / cells_per_window
            weights.append(acc.sums[i] * voxels_per_cell / math.prod(layout.spatial))
        elif method == "xgradcam":
            weights.append(
                acc.sums[i] / (sum_a[i].to(acc.sums[i].device)[None, None] + XGRADCAM_EPS)
            )
        else:
            weights.append(acc.sums[i])
    maps = _blend_weighted(explainer, xp, layout, window, names, weights, k)
    return maps, shapes, batched


def _blend_weighted(explainer, xp, layout, window, names, weights, k):
    """``ReLU(blend_w(sum_c W_c a_w,c))`` per layer, blended by MONAI's sliding window."""
    from monai.inferers import sliding_window_inference

    out_dev = layout.count.device
    active = [i for i, w in enumerate(weights) if w is not None]
    maps = {n: torch.zeros(1, k, *layout.padded, device=out_dev) for n in names}
    if not active:
        return maps
    acc = _Accumulator(len(names))

    def fn(a, g, ctx):
        i = acc.layer()
        w = weights[i]
        if w is None:
            return _zeros_map(a, k)
        w = w.to(a.device).expand(a.shape[0], -1, -1)
        return torch.einsum("bkc,bc...->bk...", w, a)

    weighted = _with_method(explainer, fn, needs_gradients=False)
    classes = torch.zeros(1, k, dtype=torch.long)

    def predictor(xw: torch.Tensor) -> dict[str, torch.Tensor]:
        return weighted(xw, _ClassesOnly(classes)).heatmaps

    # xp is already padded: MONAI then pads nothing, so its weights are exactly the layout's
    stitched = sliding_window_inference(
        xp, layout.roi, window.sw_batch_size, predictor, overlap=window.overlap, mode=window.mode,
        sigma_scale=window.sigma_scale, device=out_dev,
    )  # fmt: skip
    for n in names:
        maps[n] = torch.relu(torch.as_tensor(stitched[n]).float())
    return maps


def _blended(explainer, xp, layout, window, classes, names):
    """CAM (no gradients): per-window maps blended like the prediction."""
    from monai.inferers import sliding_window_inference

    single = _without_fusion(explainer)

    def predictor(xw: torch.Tensor) -> dict[str, torch.Tensor]:
        return single(xw, _ClassesOnly(classes)).heatmaps

    stitched = sliding_window_inference(
        xp, layout.roi, window.sw_batch_size, predictor, overlap=window.overlap, mode=window.mode,
        sigma_scale=window.sigma_scale, device=layout.count.device,
    )  # fmt: skip
    return {n: torch.as_tensor(stitched[n]).float() for n in names}
