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

from medcam.errors import InputError

__all__ = ["ModelInputs"]


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.to(device)
        return v.clone() if v.is_inference() else v
    return v


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

    def to(self, device: torch.device) -> ModelInputs:
        """Tensors moved to ``device`` (inference tensors cloned, so autograd can use them)."""
        return replace(
            self,
            args=tuple(_to(a, device) for a in self.args),
            kwargs={k: _to(v, device) for k, v in self.kwargs.items()},
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
        return model(*self.args, **self.kwargs)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the result's metadata."""
        out: dict[str, Any] = {}
        if len(self.args) > 1:
            out["inputs"] = len(self.args)
            out["input_index"] = self.index
        if self.kwargs:
            out["forward_kwargs"] = sorted(self.kwargs)
        return out
