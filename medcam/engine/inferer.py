"""Explaining a model input the way the model is run for inference.

- With a sliding window (a bundle's ``SlidingWindowInferer``, or ``roi_size``), the heatmap is
  computed window by window for a target on the whole stitched prediction
  (:mod:`medcam.engine.sliding`).
- Without one, the whole input goes through the network in one pass; when the network cannot
  take the input's size (a UNet needs multiples of its total stride, SwinUNETR of 32), the input
  is padded to the next size it takes (symmetric, zeros, as MONAI's ``DivisiblePad``), the
  target is evaluated on the output with the padding cropped off, and the maps are cropped back.
- ``target="pred"`` on a segmentation network means the predicted foreground: each voxel's
  predicted class logit, summed over the voxels not predicted as background (class 0); for a
  two-channel network that is class 1 over its predicted region.

Also here: what input a network expects (spatial rank, channels) and the check that refuses a
mismatching input before any model runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medcam.engine.core import Explainer
from medcam.engine.inputs import model_dtype
from medcam.engine.result import CAMResult
from medcam.engine.sliding import SlidingWindow, explain_sliding_window
from medcam.engine.targets import as_target
from medcam.errors import InputError, MedcamError, ModelError

__all__ = [
    "InputSpec",
    "PredictedForeground",
    "check_model_input",
    "explain_with_inferer",
    "input_spec",
    "resolve_target",
    "size_multiple",
]


class PredictedForeground:
    """Segmentation target for ``"pred"``: the predicted segmentation itself.

    For logits ``(B, C, *spatial)`` with ``C > 2``: each voxel's predicted-class logit summed
    over the voxels whose argmax is not 0 (background); class recorded as ``-1``. With ``C == 2``:
    class 1's logits over its predicted region (recorded as class 1); with ``C == 1``: the logit
    over the voxels where it is > 0 (class 0).
    """

    def describe(self, output_ndim: int = 3) -> str:
        return "predicted foreground: each voxel's predicted-class logit summed over the voxels " \
            "not predicted as background (class 0)"  # fmt: skip

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = logits.shape[:2]
        dims = tuple(range(1, logits.ndim - 1))
        with torch.no_grad():
            if c == 1:
                region = (logits[:, 0] > 0).to(logits.dtype)
                label = logits.new_zeros(b, 1, dtype=torch.long)
            else:
                pred = logits.argmax(dim=1)
                region = (pred != 0).to(logits.dtype)
                label = torch.full((b, 1), 1 if c == 2 else -1, dtype=torch.long,
                                   device=logits.device)  # fmt: skip
        if c <= 2:
            chosen = logits[:, c - 1]
        else:
            chosen = logits.gather(1, pred[:, None])[:, 0]
        scores = (chosen * region).sum(dim=dims)
        return scores[:, None], label


class _SegmentationAware:
    """``target`` as the engine reads it, except ``"pred"`` on a segmentation output, which
    becomes :class:`PredictedForeground` (the engine refuses ``"pred"`` there)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.inner = as_target(spec)
        self.foreground = PredictedForeground()

    def _pick(self, ndim: int):
        return self.foreground if ndim > 2 else self.inner

    def describe(self, output_ndim: int = 2) -> str:
        return self._pick(output_ndim).describe(output_ndim)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pick(logits.ndim)(logits)


def resolve_target(target: Any) -> Any:
    """The target object medcam uses for a specification (``"pred"`` also on segmentation)."""
    if isinstance(target, str) and target in ("pred", "predicted"):
        return _SegmentationAware(target)
    return as_target(target)


# --- sizes a network takes -------------------------------------------------------------------


def _prod_strides(strides: Any, nd: int) -> list[int]:
    total = [1] * nd
    for s in strides:
        per_dim = [int(s)] * nd if isinstance(s, (int, float)) else [int(v) for v in s]
        total = [t * p for t, p in zip(total, per_dim, strict=True)]
    return total


def size_multiple(network: nn.Module, spatial_dims: int) -> list[int] | None:
    """What each spatial size must be a multiple of, for MONAI networks that say (else None)."""
    try:
        from monai.networks import nets
    except ImportError:  # pragma: no cover
        return None
    nd = spatial_dims
    if isinstance(network, (nets.UNet, nets.AttentionUnet)) and hasattr(network, "strides"):
        return _prod_strides(network.strides, nd)
    if isinstance(network, nets.DynUNet):
        return _prod_strides(network.strides, nd)
    if isinstance(network, nets.SwinUNETR):
        return [32] * nd
    if isinstance(network, nets.BasicUNet):
        return [16] * nd
    if isinstance(network, nets.SegResNet) and hasattr(network, "blocks_down"):
        return [2 ** (len(network.blocks_down) - 1)] * nd
    return None


_SIZE_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError)


def _padded_window(shape: Sequence[int], multiple: Sequence[int]) -> SlidingWindow:
    roi = tuple(math.ceil(s / m) * m for s, m in zip(shape, multiple, strict=True))
    return SlidingWindow(roi, overlap=0.0, mode="constant", padding_mode="constant", cval=0.0)


def _fits(explainer: Explainer, x: torch.Tensor, multiple: int) -> bool:
    from medcam.engine.layers import eval_mode
    from medcam.engine.sliding import _pad, window_layout

    window = _padded_window(x.shape[2:], [multiple] * (x.ndim - 2))
    xp = _pad(x, window_layout(x.shape[2:], window, x.device), window)
    dtype = model_dtype(explainer.model)
    xp = xp if dtype is None else xp.to(dtype)  # as the explainer casts it
    try:
        with torch.no_grad(), eval_mode(explainer.model, explainer.eval):
            explainer.model(xp)
    except MedcamError:
        raise
    except _SIZE_ERRORS:
        return False
    return True


def explain_whole(explainer: Explainer, x: torch.Tensor, target: Any) -> CAMResult:
    """The whole input in one pass, padded to a size the network takes where it needs one."""
    from medcam.engine.inputs import ForwardError

    target_fn = resolve_target(target)
    nd = x.ndim - 2
    multiple = size_multiple(explainer.model, nd)
    if multiple is not None and any(s % m for s, m in zip(x.shape[2:], multiple, strict=True)):
        return _explain_padded(explainer, x, target_fn, multiple, "the network's size rule")
    try:
        return explainer(x, target_fn)
    except ForwardError as err:  # the forward raised: maybe a size the network cannot take
        if not isinstance(err.__cause__, _SIZE_ERRORS) or isinstance(
            err.__cause__, torch.OutOfMemoryError
        ):
            raise  # out of memory: the error's hint (sliding windows) is the answer
        first_error = err.__cause__
    except MedcamError:
        raise
    except _SIZE_ERRORS as err:
        first_error = err
    rank = input_spec(explainer.model).spatial_dims
    if rank is not None and rank != nd:
        raise InputError(
            f"The input has {nd} spatial dimensions {list(x.shape[2:])} but the network's "
            f"convolutions are {rank}D ({type(first_error).__name__}: {first_error}). Give a "
            f"{rank}D input."
        ) from first_error
    for m in (2, 4, 8, 16, 32, 64):
        if _fits(explainer, x, m):
            return _explain_padded(explainer, x, target_fn, [m] * nd, "a probe of sizes")
    raise ModelError(
        f"The network failed on an input of shape {tuple(x.shape)} ({type(first_error).__name__}: "
        f"{first_error}), also when padded to multiples of 2 to 64. If it takes one fixed size, "
        "explain in sliding windows of that size (roi_size=..., --roi-size)."
    ) from first_error


def _explain_padded(explainer, x, target_fn, multiple, how: str) -> CAMResult:
    from dataclasses import replace

    window = _padded_window(x.shape[2:], multiple)
    result = explain_sliding_window(explainer, x, window, target_fn)
    extra = {
        "padded_to_size_multiple": {
            "multiple": list(multiple),
            "padded_shape": list(window.roi_size),
            "found_by": how,
            "padding": "symmetric, zeros; the target is evaluated on the cropped output",
        }
    }
    kept = {k: v for k, v in result.extra.items() if k != "sliding_window"}
    return replace(result, extra={**kept, **extra})


def explain_with_inferer(
    explainer: Explainer,
    x: torch.Tensor,
    target: Any = "pred",
    inferer: Any = None,
    *,
    prediction: torch.Tensor | None = None,
) -> CAMResult:
    """Explain ``x: (B, C, *spatial)`` the way ``inferer`` runs the network.

    Parameters
    ----------
    inferer:
        ``None`` or a MONAI ``SimpleInferer`` (whole input, padded to a size the network takes
        where needed), a MONAI ``SlidingWindowInferer`` or a :class:`SlidingWindow` (window by
        window, see :mod:`medcam.engine.sliding`).
    prediction:
        The inferer's stitched output for ``x`` when already computed (sliding windows only).
    """
    window = SlidingWindow.from_inferer(inferer)
    if window is None:
        return explain_whole(explainer, x, target)
    return explain_sliding_window(explainer, x, window, target, prediction=prediction)


# --- what input a network expects ------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What a network takes: spatial rank and channel count (``None`` where unknown), and
    where that was read."""

    spatial_dims: int | None = None
    channels: int | None = None
    source: str = ""

    def merged(self, other: InputSpec) -> InputSpec:
        """Fields of ``self``, missing ones from ``other``."""
        return InputSpec(
            self.spatial_dims if self.spatial_dims is not None else other.spatial_dims,
            self.channels if self.channels is not None else other.channels,
            self.source or other.source,
        )


def input_spec(network: nn.Module) -> InputSpec:
    """Spatial rank from the network's convolutions when they all agree (else unknown)."""
    dims = set()
    for m in network.modules():
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            dims.add(1)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            dims.add(2)
        elif isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            dims.add(3)
    if len(dims) == 1:
        return InputSpec(dims.pop(), None, "the network's convolutions")
    return InputSpec()


def check_model_input(
    shape: Sequence[int], spec: InputSpec | None, what: str = "The input"
) -> None:
    """Refuse a model input ``(C, *spatial)`` whose rank or channel count the network does not
    take, saying what to give instead.

    Raises
    ------
    InputError
    """
    if spec is None:
        return
    shape = tuple(int(s) for s in shape)
    nd = len(shape) - 1
    where = f" ({spec.source})" if spec.source else ""
    if spec.spatial_dims is not None and nd != spec.spatial_dims:
        kind = {2: "2D", 3: "3D"}
        if nd == 2 and spec.spatial_dims == 3:
            hint = ("Give a 3D volume: a DICOM series folder (all slices) or a 3D NIfTI, not a "
                    "single slice or 2D image.")  # fmt: skip
        elif nd == 3 and spec.spatial_dims == 2:
            hint = ("Give 2D images (PNG, a single DICOM image, a 2D NIfTI), or a model made for "
                    "volumes.")  # fmt: skip
        else:
            hint = "Give an input with the network's number of spatial dimensions."
        raise InputError(
            f"{what} is {kind.get(nd, f'{nd}-D')} (shape {list(shape[1:])} after preprocessing) "
            f"but the network takes {kind.get(spec.spatial_dims, f'{spec.spatial_dims}-D')} "
            f"inputs{where}. {hint}"
        )
    if spec.channels is not None and shape[0] != spec.channels:
        raise InputError(
            f"{what} has {shape[0]} channel(s) after preprocessing but the network takes "
            f"{spec.channels}{where}. Give an image with {spec.channels} channel(s) (e.g. a "
            "grey-level image for a one-channel network, not RGB), or preprocessing that makes "
            "them."
        )
