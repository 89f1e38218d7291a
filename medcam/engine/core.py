"""The CAM engine: one forward, one batched backward to the target layer(s), maps out.

Data flow of a call::

    x (B, C, *S) --forward (hooks keep layer outputs; autograd graph only from the first
        target layer on)--> logits --target--> scores (B, K)
    scores --torch.autograd.grad(is_grads_batched)--> gradients (B, K, C, *S_l) per layer
    method(activations, gradients) --> raw (B, K, *S_l) --upsample--> (B, K, *S)
    --fusion (optional)--> --normalisation (explicit, recorded)--> CAMResult

Only the gradients w.r.t. the layer outputs are computed (never parameter gradients). The model
is not changed: modules in training mode are switched to eval for the call and back after,
hooks are removed in ``finally``, no in-place flag or ``forward`` is touched. The explainer keeps
no per-call state, so one explainer and one model can be used from several threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medcam.engine.auto import AutoChoice, auto_choice, auto_method
from medcam.engine.layers import (
    ActivationCapture,
    auto_layer,
    check_hookable,
    eval_mode,
    model_device,
    resolve_layers,
    trace_layers,
)
from medcam.engine.methods import MethodContext, get_method
from medcam.engine.postprocess import Fusion, Normalization, fuse_maps, normalize_maps, upsample
from medcam.engine.result import CAMResult
from medcam.engine.targets import as_target, select_output
from medcam.errors import InputError, LayerError, MedcamError, ModelError

__all__ = ["Explainer", "explain"]

LayerSpec = str | nn.Module | Sequence[str | nn.Module]
OutputSelector = int | str | Callable[[Any], Any] | None


def check_input(x: object) -> torch.Tensor:
    """Validate a model input ``(B, C, *spatial)`` with 1-3 spatial dims, finite floats."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"The input must be a torch.Tensor, not {type(x).__name__}.")
    if not 3 <= x.ndim <= 5:
        raise InputError(
            f"The input has shape {tuple(x.shape)}; expected (B, C, H, W) for 2D or "
            "(B, C, D, H, W) for 3D. Add batch and channel dims, e.g. x[None, None]."
        )
    if not x.is_floating_point():
        raise InputError(f"The input has dtype {x.dtype}; convert it with x.float().")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise InputError(
            f"The input contains {n_nan} NaN and {n_inf} infinite values; the heatmap would be "
            "meaningless. Clean the volume first (e.g. torch.nan_to_num, or check the scan's "
            "rescale slope/intercept and padding values)."
        )
    return x


def _final_linear_weight(model: nn.Module, fc_layer: str | nn.Module | None) -> torch.Tensor:
    if fc_layer is not None:
        name = resolve_layers(model, [fc_layer])[0]
        module = dict(model.named_modules())[name]
        if not isinstance(module, nn.Linear):
            raise LayerError(f"fc_layer {name!r} is a {type(module).__name__}, not nn.Linear.")
        return module.weight.detach()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(
            "method='cam' needs a classifier ending in global pooling + nn.Linear, and this "
            "model has no nn.Linear. Use method='gradcam', which works for any architecture."
        )
    return linears[-1].weight.detach()


def _target_gradients(
    scores: torch.Tensor,
    acts: list[torch.Tensor],
    names: list[str],
    batched: bool | None,
) -> tuple[list[torch.Tensor], bool]:
    """Gradients ``(B, K, C, *S)`` of each target score w.r.t. each activation.

    The K targets go through one vmapped backward (``is_grads_batched=True``); where an op has
    no batching rule, the same gradients are computed in a loop of K backward passes. Scores of
    different samples are summed: in eval mode samples do not interact, so each sample's
    gradient is its own.
    """
    if not scores.requires_grad:
        raise ModelError(
            "The target score does not depend differentiably on the model's layers (the output "
            "was detached, or the forward ran under torch.no_grad internally). medcam needs a "
            "differentiable path from the target layer to the output."
        )
    b, k = scores.shape

    def check(grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        for name, g in zip(names, grads, strict=True):
            if g is None:
                raise ModelError(
                    f"The target score has no differentiable path to layer {name!r} (the "
                    "output does not depend on it, or the path is detached). Pick a layer that "
                    "feeds the selected output."
                )
        return list(grads)  # type: ignore[arg-type]

    if k == 1:
        grads = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
        return [g.unsqueeze(1) for g in check(grads)], True
    if batched is not False:
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        grad_outputs = eye[:, None, :].expand(k, b, k).contiguous()
        try:
            grads = torch.autograd.grad(
                scores,
                acts,
                grad_outputs=grad_outputs,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
            return [g.movedim(0, 1) for g in check(grads)], True
        except (RuntimeError, NotImplementedError) as err:
            if batched:
                raise ModelError(
                    f"The batched backward failed ({err}); an op in this model has no batching "
                    "rule. Use batched=None (fall back automatically) or batched=False."
                ) from err
    per_target = [
        check(
            torch.autograd.grad(scores[:, j].sum(), acts, retain_graph=j < k - 1, allow_unused=True)
        )
        for j in range(k)
    ]
    return [torch.stack([p[i] for p in per_target], dim=1) for i in range(len(acts))], False


class Explainer:
    """Grad-CAM family explainer for 2D and 3D CNNs.

    The explainer holds configuration only; every call is independent.

    Parameters
    ----------
    model:
        Any eager ``torch.nn.Module`` (MONAI or plain torch) taking ``(B, C, H, W)`` or
        ``(B, C, D, H, W)``. It is never modified.
    layers:
        ``"auto"`` (default: chosen from one shape-only forward pass by
        :func:`medcam.engine.auto.auto_choice`: the deepest feature layer, fused with the
        deepest layer whose grid is at least 1/4 of the input per axis when it is coarser;
        recorded in ``metadata()["layers_chosen_by"]``), ``"last"`` (the last layer whose
        output is still a feature map with extent > 1, the earlier default), a module name
        such as ``"features.denseblock4"``, a module object, or a list of these.
    method:
        ``"auto"`` (default: Grad-CAM for classifiers, LayerCAM for segmentation outputs, see
        :func:`medcam.engine.auto.auto_method`; recorded in
        ``metadata()["method_chosen_by"]``), ``"gradcam"``, ``"gradcam++"``, ``"hirescam"``,
        ``"xgradcam"``, ``"layercam"`` or ``"cam"`` (see :data:`medcam.METHODS`).
    output:
        Which part of the model output holds the logits: ``None`` for a tensor, an index for a
        tuple, a key for a dict, or a callable.
    fusion:
        With several layers: ``None`` (separate maps), ``"mean"`` or ``"product"`` of the
        per-layer maps, each scaled by its peak (see :func:`medcam.engine.fuse_maps`). With
        ``layers="auto"``, ``None`` means the fusion the rule chose.
    fc_layer:
        For ``method="cam"``: the final ``nn.Linear`` (default: the model's last one).
    batched:
        ``None``: all targets in one batched backward, looping where an op has no batching
        rule; ``True``: batched or error; ``False``: always loop.
    eval:
        Run in eval mode (dropout off, batch-norm statistics frozen), restoring each module's
        training flag afterwards. With ``False``, a training-mode batch-norm mixes samples.
    device:
        Device to run on; ``None`` follows the model. The model is never moved: it must
        already be on ``device``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = "auto",
        method: str = "auto",
        *,
        output: OutputSelector = None,
        fusion: Fusion | None = None,
        fc_layer: str | nn.Module | None = None,
        batched: bool | None = None,
        eval: bool = True,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
        check_hookable(model)
        self.model = model
        self.method = None if method == "auto" else get_method(method)
        self.output = output
        if fusion not in (None, "mean", "product"):
            raise MedcamError(f"Unknown fusion {fusion!r}; use None, 'mean' or 'product'.")
        self.fusion = fusion
        self.fc_layer = fc_layer
        self.batched = batched
        self.eval = eval
        self.device = torch.device(device) if device is not None else None
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        submodules = dict(model.named_modules())
        modes = [v for v in layers if isinstance(v, str) and v in ("auto", "last")
                 and v not in submodules]  # fmt: skip
        if modes and len(layers) > 1:
            raise LayerError(f"'{modes[0]}' cannot be combined with named layers.")
        self._auto = modes[0] if modes else None
        self._layers = [] if self._auto else resolve_layers(model, list(layers))
        self._auto_cache: dict[tuple[int, ...], AutoChoice] = {}

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        model_dev = model_device(self.model, x)
        if self.device is not None and self.device.type != model_dev.type:
            raise ModelError(
                f"device={self.device} but the model is on {model_dev}; move the model first "
                f"(model.to('{self.device}')) or leave device=None."
            )
        return x.to(model_dev)

    def layer_names(self, x: torch.Tensor) -> list[str]:
        """The target layer names for input ``x`` (resolving ``"auto"`` / ``"last"``)."""
        return self.layer_plan(x)[0]

    def layer_plan(self, x: torch.Tensor) -> tuple[list[str], Fusion | None, str]:
        """``(layer names, fusion, layers_chosen_by)`` for input ``x``.

        ``layers_chosen_by`` is ``"auto: <rule>"``, ``"last: <layer>"`` or ``"user"``.
        """
        if not self._auto:
            return list(self._layers), self.fusion, "user"
        key = tuple(x.shape[1:])
        if key not in self._auto_cache:
            infos, out = trace_layers(self.model, x, eval=self.eval)
            logits_shape = tuple(select_output(out, self.output).shape)
            if self._auto == "auto":
                self._auto_cache[key] = auto_choice(infos, tuple(x.shape[2:]), logits_shape)
            else:
                name = auto_layer(infos, logits_shape)
                grid = next(i.feature_shape for i in infos if i.name == name)
                rule = f"the deepest feature layer {name} ({'x'.join(map(str, grid))})"
                self._auto_cache[key] = AutoChoice([name], None, rule, {name: grid})
        plan = self._auto_cache[key]
        if self._auto == "last":
            return list(plan.layers), self.fusion, f"last: {plan.rule}"
        return list(plan.layers), self.fusion or plan.fusion, plan.chosen_by

    def __call__(
        self,
        x: torch.Tensor,
        target: Any = "pred",
        *,
        normalize: Normalization = "none",
        percentiles: tuple[float, float] = (0.0, 99.0),
        upsample_to_input: bool = True,
    ) -> CAMResult:
        """Explain a batch.

        Parameters
        ----------
        x:
            ``(B, C, H, W)`` or ``(B, C, D, H, W)`` float input (moved to the model's device).
        target:
            ``"pred"`` (each sample's own argmax), an int, per-sample ints ``(B,)`` or
            ``(B, K)``, ``"all"``, a :class:`medcam.SegmentationTarget`, or a callable
            ``logits -> (B, K)`` scores. See :mod:`medcam.engine.targets`.
        normalize:
            ``"none"`` (default: raw values), ``"minmax"`` or ``"percentile"``; applied to
            ``heatmaps`` / ``fused`` only and recorded in ``result.normalization``.
        percentiles:
            ``(lo, hi)`` for ``normalize="percentile"``.
        upsample_to_input:
            Upsample maps to the input's spatial size (else ``heatmaps`` stay at feature size;
            fusion of layers of different sizes then needs upsampling).

        Returns
        -------
        CAMResult
            ``result.heatmap: (B, K, *spatial)`` float32, ``result.raw[layer]``,
            ``result.classes: (B, K)``, ``result.scores: (B, K)`` and the call's description.
        """
        x = self._to_device(check_input(x))
        spatial = tuple(x.shape[2:])
        target_fn = as_target(target)
        method = self.method  # None: "auto", chosen from the model output below
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            if x.is_inference():
                x = x.clone()
            names, fusion, chosen_by = self.layer_plan(x)
            # No graph before the first target layer; its hook turns gradients on (see
            # ActivationCapture); no_grad's exit restores the caller's mode.
            stack.enter_context(torch.no_grad())
            stack.enter_context(eval_mode(self.model, self.eval))
            capture = stack.enter_context(
                ActivationCapture(
                    self.model, names, grad_from_layer=method is None or method.needs_gradients
                )
            )
            logits = select_output(self.model(x), self.output)
            scores, classes = target_fn(logits)
            method_chosen_by = "user"
            if method is None:
                name, method_chosen_by = auto_method(tuple(logits.shape))
                method = get_method(name)
            acts = capture.activations(len(spatial))
            grads: list[torch.Tensor | None] = [None] * len(acts)
            batched = False
            if method.needs_gradients:
                grads, batched = _target_gradients(scores, acts, names, self.batched)
        fc_weight = (
            _final_linear_weight(self.model, self.fc_layer) if method.name == "cam" else None
        )
        ctx = MethodContext(classes=classes.detach(), fc_weight=fc_weight)
        raw: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, a, g in zip(names, acts, grads, strict=True):
                a32 = a.detach().float()
                g32 = None if g is None else g.detach().float()
                raw[name] = method.fn(a32, g32, ctx).float()
            resized = {n: upsample(m, spatial) if upsample_to_input else m for n, m in raw.items()}
            fused = None
            if fusion is not None and len(names) > 1:
                fused = fuse_maps(list(resized.values()), fusion)
            norm_record: dict[str, Any] = {"method": "none"}
            heatmaps = {}
            for n, m in resized.items():
                heatmaps[n], norm_record = normalize_maps(m, normalize, percentiles)
            if fused is not None:
                fused, norm_record = normalize_maps(fused, normalize, percentiles)
        return CAMResult(
            raw=raw,
            heatmaps=heatmaps,
            fused=fused,
            classes=classes.detach(),
            scores=scores.detach().float(),
            logits=logits.detach().float() if logits.ndim == 2 else None,
            method=method.name,
            layers=names,
            feature_shapes={n: tuple(m.shape[2:]) for n, m in raw.items()},
            input_shape=tuple(x.shape),
            target=target_fn.describe(logits.ndim),
            normalization=norm_record,
            fusion=fusion if fused is not None else None,
            batched_backward=batched,
            layers_chosen_by=chosen_by,
            method_chosen_by=method_chosen_by,
        )


def explain(
    model: nn.Module,
    x: torch.Tensor,
    target: Any = "pred",
    *,
    layers: LayerSpec = "auto",
    method: str = "auto",
    output: OutputSelector = None,
    fusion: Fusion | None = None,
    normalize: Normalization = "none",
    **kwargs: Any,
) -> CAMResult:
    """Explain ``model`` on ``x`` in one call; see :class:`Explainer` for every parameter.

    Example
    -------
    >>> result = medcam.explain(net, volume, layers="features.denseblock3", target="all")
    >>> result.heatmap.shape  # (B, num_classes, D, H, W)
    """
    explainer_kwargs = {
        k: kwargs.pop(k) for k in ("fc_layer", "batched", "eval", "device") if k in kwargs
    }
    return Explainer(model, layers, method, output=output, fusion=fusion, **explainer_kwargs)(
        x, target, normalize=normalize, **kwargs
    )
