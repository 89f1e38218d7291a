"""What to explain: turning the model output into one scalar score per sample and target.

A target maps the selected model output (logits) to ``scores: (B, K)`` and
``classes: (B, K)`` (the class index behind each score, ``-1`` when there is none). The engine
computes one heatmap per score, all K in one batched backward pass.

Accepted target specifications (see :func:`as_target`):

- ``"pred"``: each sample's own predicted class (argmax of its logits);
- ``int``: that class for every sample;
- a sequence of B ints, or a ``(B, K)`` nested sequence / tensor: per-sample classes;
- ``"all"``: every class;
- :class:`SegmentationTarget`: a class's logits summed over a mask or the predicted region;
- a callable ``f(logits) -> (B,) or (B, K)`` tensor of scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from medcam.errors import MedcamError, TargetError

__all__ = [
    "AllClasses",
    "CallableTarget",
    "ClassTarget",
    "PredictedClass",
    "SegmentationTarget",
    "Target",
    "as_target",
    "fixed_target",
    "select_output",
]


@runtime_checkable
class Target(Protocol):
    """Anything that turns logits into ``(scores (B, K), classes (B, K))``."""

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self, output_ndim: int = 2) -> str:
        """Human-readable description; ``output_ndim`` is the rank of the logits it was used on."""
        ...


_REGION_NOTE = ", logits summed over each class's predicted region"


def _usable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy of it when it was made under ``torch.inference_mode()`` (an
    inference tensor cannot take part in the backward pass)."""
    return t.clone() if t.is_inference() else t


def _check_classes(classes: torch.Tensor, num_classes: int) -> None:
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.numel():
        raise TargetError(
            f"Target class {int(bad[0])} is out of range: the model output has {num_classes} "
            f"classes (valid indices 0..{num_classes - 1})."
        )


def _predicted_region(logits: torch.Tensor, cls: int) -> torch.Tensor:
    """Mask of voxels predicted as ``cls``: argmax over channels, or logit > 0 for one channel."""
    with torch.no_grad():
        if logits.shape[1] == 1:
            return (logits[:, 0] > 0).to(logits.dtype)
        return (logits.argmax(dim=1) == cls).to(logits.dtype)


class ClassTarget:
    """Explicit class indices: one int for all samples, or per-sample ``(B,)``/``(B, K)``.

    On a segmentation output ``(B, C, *spatial)`` each class becomes a
    :class:`SegmentationTarget` over that class's predicted region.
    """

    def __init__(self, classes: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor):
        t = torch.as_tensor(classes)
        if t.is_floating_point() or t.is_complex() or t.ndim > 2:
            raise TargetError(
                f"Class targets must be an int, a sequence of B ints or a (B, K) array of ints; "
                f"got {classes!r}."
            )
        self.classes = t.long()

    def describe(self, output_ndim: int = 2) -> str:
        return f"class {self.classes.tolist()}" + _REGION_NOTE * (output_ndim > 2)

    def _per_sample(self, batch: int) -> torch.Tensor:
        c = self.classes
        if c.ndim == 0:
            return c.expand(batch, 1)
        if c.ndim == 1:
            c = c[:, None]
        if c.shape[0] != batch:
            raise TargetError(
                f"{c.shape[0]} per-sample targets given for a batch of {batch}; give one target "
                "per sample, or a single int for all samples."
            )
        return c

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classes = _usable(self._per_sample(logits.shape[0]).to(logits.device))
        _check_classes(classes, logits.shape[1])
        if logits.ndim > 2:
            return _segmentation_scores(logits, classes, None, "sum")
        return logits.gather(1, classes), classes


class PredictedClass:
    """Each sample's own predicted class (argmax of its logits); classification outputs only."""

    def describe(self, output_ndim: int = 2) -> str:
        return "predicted class"

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.ndim > 2:
            raise TargetError(
                "target='pred' needs a classification output (B, num_classes), but the model "
                f"returned {tuple(logits.shape)} (a segmentation map?). Give a class index or "
                "medcam.SegmentationTarget(class_index, mask=...)."
            )
        classes = logits.detach().argmax(dim=1, keepdim=True)
        return logits.gather(1, classes), classes


class AllClasses:
    """Every class of the output, ``K = num_classes`` maps per sample."""

    def describe(self, output_ndim: int = 2) -> str:
        return "all classes" + _REGION_NOTE * (output_ndim > 2)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = logits.shape[:2]
        classes = torch.arange(c, device=logits.device).expand(b, c)
        if logits.ndim > 2:
            return _segmentation_scores(logits, classes, None, "sum")
        return logits, classes


class SegmentationTarget:
    """A class's logits reduced over a region, for segmentation networks.

    Parameters
    ----------
    class_index:
        One class index or a sequence of K indices (one heatmap each).
    mask:
        ``(*spatial)``, ``(B, *spatial)`` or ``(B, K, *spatial)`` bool/float weights on the
        model output grid. ``None`` uses each class's predicted region (argmax over channels;
        ``logit > 0`` for single-channel outputs). An empty region gives a zero map.
    reduction:
        ``"sum"`` (default) or ``"mean"`` of the logits over the region.
    """

    def __init__(
        self,
        class_index: int | Sequence[int],
        mask: torch.Tensor | None = None,
        reduction: Literal["sum", "mean"] = "sum",
    ) -> None:
        if reduction not in ("sum", "mean"):
            raise TargetError(f"reduction must be 'sum' or 'mean', not {reduction!r}.")
        self.classes = torch.as_tensor(class_index).long().reshape(-1)
        self.mask = mask
        self.reduction = reduction

    def describe(self, output_ndim: int = 3) -> str:
        region = "mask" if self.mask is not None else "predicted region"
        return f"segmentation class {self.classes.tolist()} {self.reduction} over {region}"

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if logits.ndim <= 2:
            raise TargetError(
                "SegmentationTarget needs a segmentation output (B, C, *spatial), but the model "
                f"returned {tuple(logits.shape)}; use a class index for classifiers."
            )
        classes = _usable(self.classes.to(logits.device)).expand(logits.shape[0], -1)
        _check_classes(classes, logits.shape[1])
        return _segmentation_scores(logits, classes, self.mask, self.reduction)


def _region_weights(
    logits: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``(B, K, *spatial)`` weights of each target's region: the mask, or the predicted region."""
    b, k = classes.shape
    spatial = tuple(logits.shape[2:])
    if mask is None:
        return torch.stack(
            [
                torch.stack([_predicted_region(logits[i : i + 1], int(c))[0] for c in row])
                for i, row in enumerate(classes)
            ]
        )
    m = _usable(torch.as_tensor(mask, device=logits.device).to(logits.dtype))
    if tuple(m.shape[-len(spatial) :]) != spatial:
        raise TargetError(
            f"Mask shape {tuple(m.shape)} does not match the model output's spatial shape "
            f"{spatial}; give the mask on the output grid."
        )
    while m.ndim < 2 + len(spatial):
        m = m.unsqueeze(0 if m.ndim == len(spatial) else 1)
    return m.expand(b, k, *spatial)


def _region_scores(
    logits: torch.Tensor, classes: torch.Tensor, weights: torch.Tensor, reduction: str
) -> torch.Tensor:
    b, k = classes.shape
    spatial = tuple(logits.shape[2:])
    sel = logits.gather(1, classes.view(b, k, *([1] * len(spatial))).expand(b, k, *spatial))
    dims = tuple(range(2, 2 + len(spatial)))
    scores = (sel * weights).sum(dim=dims)
    if reduction == "mean":
        scores = scores / weights.sum(dim=dims).clamp_min(1)
    return scores


def _segmentation_scores(
    logits: torch.Tensor, classes: torch.Tensor, mask: torch.Tensor | None, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = _region_weights(logits, classes, mask)
    return _region_scores(logits, classes, weights, reduction), classes


class CallableTarget:
    """Wrap ``f(logits) -> (B,) or (B, K)`` scores; the class index is recorded as ``-1``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def describe(self, output_ndim: int = 2) -> str:
        return f"callable {getattr(self.fn, '__name__', type(self.fn).__name__)}"

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            scores = self.fn(logits)
        except MedcamError:
            raise
        except Exception as err:
            raise TargetError(
                f"The target callable {self.describe()} failed on the model output of shape "
                f"{tuple(logits.shape)}: {type(err).__name__}: {err}"
            ) from err
        if not isinstance(scores, torch.Tensor):
            raise TargetError("A callable target must return a tensor of shape (B,) or (B, K).")
        if scores.ndim == 1:
            scores = scores[:, None]
        if scores.ndim != 2 or scores.shape[0] != logits.shape[0]:
            raise TargetError(
                f"A callable target returned shape {tuple(scores.shape)}; expected (B,) or "
                f"(B, K) with B = {logits.shape[0]}."
            )
        return scores, torch.full(scores.shape, -1, dtype=torch.long, device=scores.device)


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fixed_target(target: Target, logits: torch.Tensor, classes: torch.Tensor) -> ScoreFn:
    """The target frozen on the unperturbed call, for perturbation methods (Score-CAM).

    Returns ``score(out, rows) -> (M, K)``: the scores of the K targets of sample ``rows[i]`` on
    the model output ``out[i]`` of a perturbed copy of that sample. Class indices (``"pred"``
    included) and segmentation regions (a mask, or the region predicted on the unperturbed
    input) are those of the original call, as pytorch-grad-cam's targets hold them fixed; a
    callable (or a custom :class:`Target`) is applied to the perturbed outputs as it is.
    """
    classes = classes.detach()
    builtin = (ClassTarget, PredictedClass, AllClasses, SegmentationTarget)
    if not isinstance(target, builtin) or bool((classes < 0).any()):

        def score_callable(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return target(out)[0]

        return score_callable
    if logits.ndim <= 2:

        def score_class(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return out.gather(1, classes[rows])

        return score_class
    mask = target.mask if isinstance(target, SegmentationTarget) else None
    reduction = target.reduction if isinstance(target, SegmentationTarget) else "sum"
    with torch.no_grad():
        weights = _region_weights(logits.detach(), classes, mask)

    def score_region(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return _region_scores(out, classes[rows], weights[rows], reduction)

    return score_region


def as_target(spec: Any) -> Target:
    """Turn a target specification (see module docstring) into a :class:`Target`."""
    if isinstance(spec, str):
        if spec in ("pred", "predicted"):
            return PredictedClass()
        if spec == "all":
            return AllClasses()
        if spec.lstrip("-").isdigit():
            return ClassTarget(int(spec))
        raise TargetError(f"Unknown target {spec!r}; use 'pred', 'all', a class index or a list.")
    if isinstance(spec, (ClassTarget, PredictedClass, AllClasses, SegmentationTarget)):
        return spec
    if isinstance(spec, (int, Sequence, torch.Tensor)) and not isinstance(spec, bool):
        return ClassTarget(spec)  # type: ignore[arg-type]
    if isinstance(spec, Target) or callable(spec):
        return spec if isinstance(spec, Target) else CallableTarget(spec)
    raise TargetError(f"Cannot use {spec!r} as a target.")


_CLI_OUTPUT = (
    " On the command line (there is no --output option), give --model a factory whose model "
    "returns the logits alone (e.g. a wrapper module whose forward returns output[0])."
)


def select_output(output: Any, selector: int | str | Callable[[Any], Any] | None) -> torch.Tensor:
    """Pick the logits tensor from a model output (tensor, tuple/list or dict)."""
    if callable(selector):
        try:
            out = selector(output)
        except MedcamError:
            raise
        except Exception as err:
            raise TargetError(
                f"The output selector {getattr(selector, '__name__', selector)!r} failed on the "
                f"model output (a {type(output).__name__}): {type(err).__name__}: {err}"
            ) from err
    elif selector is None:
        out = output
    elif isinstance(output, dict):
        if selector not in output:
            raise TargetError(
                f"output={selector!r} is not a key of the model's output dict; keys: "
                f"{list(output)}."
            )
        out = output[selector]
    elif isinstance(output, (tuple, list)) and isinstance(selector, int):
        if not -len(output) <= selector < len(output):
            raise TargetError(f"output={selector} is out of range for a {len(output)}-tuple.")
        out = output[selector]
    else:
        raise TargetError(
            f"output={selector!r} cannot select from a {type(output).__name__}; use an int for "
            "a tuple, a key for a dict, or a callable."
        )
    if isinstance(out, torch.Tensor):
        if out.ndim < 2:
            raise TargetError(
                f"The model output has shape {tuple(out.shape)}; expected (B, num_classes) or "
                "(B, C, *spatial). Select the logits with output=..."
            )
        return out
    if isinstance(out, dict):
        raise TargetError(
            f"The model returned a dict with keys {list(out)}; say which entry holds the "
            "logits with output='key'." + _CLI_OUTPUT
        )
    if isinstance(out, (tuple, list)):
        raise TargetError(
            f"The model returned a {type(out).__name__} of {len(out)} items; say which one "
            "holds the logits with output=index (or a callable)." + _CLI_OUTPUT
        )
    raise TargetError(f"The selected model output is a {type(out).__name__}, not a tensor.")
