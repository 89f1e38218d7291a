"""What the model is called with: the explained image, other inputs and keyword arguments.

Models that take more than the image (an image plus a clinical vector, an image plus a mask
channel as a second tensor, keyword options) are called as
``model(*inputs, **forward_kwargs)``. One positional input, ``inputs[input_index]``, is the
image being explained: it is checked (float, 1-3 spatial dims, finite), its spatial size is the
size the maps are upsampled to, and perturbation methods (Score-CAM) perturb it. Every other
input is passed through unchanged (tensors are moved to the model's device).

This is Captum's ``additional_forward_args`` (extra positional inputs after the explained one:
``x=(image, *additional_forward_args)``) plus keyword arguments, which Captum does not take.

Perturbation methods run the model on many perturbed copies of one sample at once; there, a
tensor input or keyword argument whose first dimension is the batch size ``B`` is taken as
per-sample and its rows are picked to match, anything else is passed as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from medcam.errors import InputError, MedcamError, ModelError

__all__ = ["ModelInputs", "model_dtype"]


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the model's first floating parameter (else buffer), or ``None``."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _hint(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return (
            "The device ran out of memory: explain a smaller input or fewer samples at a time, "
            "use sliding windows (roi_size= / --roi-size), or run on the CPU."
        )
    if "Expected more than 1 value per channel when training" in text:
        return (
            "A batch-norm layer in training mode cannot normalise a batch of one: use eval=True "
            "(the default), or explain a batch of more than one sample."
        )
    return (
        "Check that the input has the channels, spatial size and dtype the model expects "
        "(`medcam layers`, or medcam.list_layers(model, x) in Python, runs one forward pass and "
        "shows every layer's output), "
        "and that the model runs on it outside medcam."
    )


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.to(device)
        return v.clone() if v.is_inference() else v
    return v


class ForwardError(ModelError):
    """The model's forward raised on the input; the original exception is ``__cause__``
    (:func:`medcam.engine.inferer.explain_whole` tells a size the network cannot take by it)."""


@dataclass(frozen=True)
class ModelInputs:
    """The arguments of one model call.

    Attributes
    ----------
    args:
        Positional inputs; ``args[index]`` is the explained image ``(B, C, *spatial)``.
    kwargs:
        Keyword arguments of ``model.forward``.
    index:
        Which positional input is explained.
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    index: int = 0

    @classmethod
    def build(
        cls,
        x: torch.Tensor | Sequence[Any],
        forward_kwargs: Mapping[str, Any] | None = None,
        input_index: int = 0,
    ) -> ModelInputs:
        """From ``x`` (a tensor, or a tuple/list of positional inputs) and keyword arguments."""
        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        if not args:
            raise InputError("No model input was given.")
        if not isinstance(input_index, int) or not -len(args) <= input_index < len(args):
            raise InputError(
                f"input_index={input_index!r} does not pick one of the {len(args)} positional "
                "inputs; give the position of the image to explain."
            )
        if forward_kwargs is not None and not isinstance(forward_kwargs, Mapping):
            raise InputError(
                f"forward_kwargs must be a dict of keyword arguments for model.forward, not "
                f"{type(forward_kwargs).__name__}."
            )
        return cls(args, dict(forward_kwargs or {}), input_index % len(args))

    @property
    def x(self) -> torch.Tensor:
        """The explained image."""
        return self.args[self.index]

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    def with_x(self, x: torch.Tensor) -> ModelInputs:
        args = list(self.args)
        args[self.index] = x
        return replace(self, args=tuple(args))

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> ModelInputs:
        """Tensors moved to ``device`` (inference tensors cloned, so autograd can use them); the
        explained image also cast to the floating ``dtype`` (the model's) when given."""
        args = [_to(a, device) for a in self.args]
        if dtype is not None and args[self.index].dtype != dtype:
            args[self.index] = args[self.index].to(dtype)
        return replace(
            self, args=tuple(args), kwargs={k: _to(v, device) for k, v in self.kwargs.items()}
        )

    def rows(self, x: torch.Tensor, rows: torch.Tensor) -> ModelInputs:
        """The call for perturbed images ``x: (M, C, *spatial)`` of samples ``rows: (M,)``: other
        per-sample tensors (first dim = B) are indexed with ``rows``, the rest passed as is."""
        b = self.batch

        def pick(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b:
                return v.index_select(0, rows.to(v.device))
            return v

        args = [pick(a) for a in self.args]
        args[self.index] = x
        return replace(self, args=tuple(args), kwargs={k: pick(v) for k, v in self.kwargs.items()})

    def __call__(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``; a failure inside the model becomes a
        :class:`~medcam.errors.ModelError` naming the input (the original is its cause)."""
        try:
            return model(*self.args, **self.kwargs)
        except MedcamError:
            raise
        except Exception as err:
            x = self.x
            what = (
                f"shape {tuple(x.shape)}, dtype {str(x.dtype).removeprefix('torch.')}, "
                f"device {x.device}"
                if isinstance(x, torch.Tensor)
                else type(x).__name__
            )
            others = f" (and {len(self.args) - 1} other input(s))" if len(self.args) > 1 else ""
            raise ForwardError(
                f"The model's forward failed on the input ({what}){others}: "
                f"{type(err).__name__}: {err}. {_hint(err)}"
            ) from err

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the result's metadata."""
        out: dict[str, Any] = {}
        if len(self.args) > 1:
            out["inputs"] = len(self.args)
            out["input_index"] = self.index
        if self.kwargs:
            out["forward_kwargs"] = sorted(self.kwargs)
        return out
