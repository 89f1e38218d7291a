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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medcam.engine.auto import AutoChoice, FlattenedHead, auto_choice, auto_method
from medcam.engine.inputs import ModelInputs, model_dtype
from medcam.engine.layers import (
    ActivationCapture,
    At,
    auto_layer,
    check_feature_map,
    check_hookable,
    eval_mode,
    model_device,
    resolve_layers,
    trace_layers,
)
from medcam.engine.methods import MethodContext, get_method
from medcam.engine.perturbation import Perturbation
from medcam.engine.postprocess import Fusion, Normalization, fuse_maps, normalize_maps, upsample
from medcam.engine.reshape import Layout, ReshapeSpec, model_grids, resolve_layout
from medcam.engine.result import CAMResult
from medcam.engine.targets import CallableTarget, as_target, fixed_target, select_output
from medcam.errors import InputError, LayerError, MedcamError, ModelError, TargetError

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
    if x.numel() == 0:
        raise InputError(
            f"The input has shape {tuple(x.shape)}, with an empty dimension: there is nothing "
            "to explain. Check how the volume was cropped or sliced."
        )
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


def _check_not_inference(model: nn.Module) -> None:
    """Gradient methods need autograd, which cannot use the inference tensors that a model built
    or loaded under ``torch.inference_mode()`` holds."""
    held = next((n for n, t in [*model.named_parameters(), *model.named_buffers()]
                 if t.is_inference()), None)  # fmt: skip
    if held is not None:
        raise ModelError(
            f"The model's {held} (and maybe more) was created under torch.inference_mode(): "
            "autograd cannot use such tensors, so no gradient-based map can be computed. Build "
            "or load the model outside torch.inference_mode() (torch.no_grad() is fine), or "
            "give it normal tensors: model.load_state_dict({k: v.clone() for k, v in "
            "model.state_dict().items()}, assign=True) outside inference mode."
        )


def _check_output_for_target(logits: torch.Tensor, spatial_rank: int, target_fn: Any) -> None:
    """Class and segmentation targets need a ``(B, classes)`` output or a map of the input's
    grid ``(B, C, *spatial)``; any other shape (a regressor's ``(B, 2, 3)``) needs a callable."""
    if logits.ndim <= 2 or logits.ndim == 2 + spatial_rank or isinstance(target_fn, CallableTarget):
        return
    raise TargetError(
        f"The model output {tuple(logits.shape)} is neither (B, classes) nor a map of the "
        f"input's {spatial_rank}D grid (B, C, *spatial), so a class or segmentation target has "
        "no meaning for it. Give a callable returning (B, K) scores, e.g. "
        "target=lambda y: y[:, 0, 1]; on the command line, wrap the model so that it returns "
        "(B, outputs)."
    )


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


def _backward(
    scores: torch.Tensor,
    acts: list[torch.Tensor],
    names: list[str],
    batched: bool | None,
    x: torch.Tensor,
) -> tuple[list[torch.Tensor], bool]:
    """:func:`_target_gradients`, a failure of the backward pass (an in-place op that
    overwrote a saved tensor, an op without a derivative) raised as a :class:`ModelError`."""
    try:
        return _target_gradients(scores, acts, names, batched)
    except MedcamError:
        raise
    except Exception as err:
        raise ModelError(
            f"The backward pass from the target score to layer(s) {names} failed on the input "
            f"(shape {tuple(x.shape)}, dtype {str(x.dtype).removeprefix('torch.')}): "
            f"{type(err).__name__}: {err}. If an in-place operation after the layer modified a "
            "tensor autograd needs, pick another layer; a gradient-free method "
            "(method='scorecam' or 'ablationcam') needs no backward pass."
        ) from err


def _check_scores(scores: torch.Tensor) -> None:
    """Refuse non-finite target scores (a NaN input other than the image, an overflow)."""
    bad = ~torch.isfinite(scores.detach())
    if bool(bad.any()):
        rows = sorted({int(i) for i in bad.nonzero()[:, 0]})
        raise ModelError(
            f"The target score is NaN or infinite for sample(s) {rows}; every map would be "
            "meaningless. Check the model's other inputs and forward_kwargs (only the explained "
            "image is checked for NaN/Inf) and the model's numerics (e.g. float16 overflow)."
        )


def _reshaped_gradient(name: str, g: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The gradient ``(B, K, *raw)`` read like the activation; refuse a map whose gradient lies
    entirely in the tokens the layout drops (a class token)."""
    g_cf = layout.to_channels_first(g, lead=2)
    if layout.kind != "channels_first" and not bool(g_cf.any()) and bool(g.any()):
        raise LayerError(
            f"The target score depends on layer {name!r} only through tokens outside its patch "
            "grid (the class token): every patch token has a zero gradient, so every gradient "
            "map would be zero. In a ViT classifier this is the case after the last attention "
            "block; take the input of the last block's attention instead, e.g. "
            "layers='blocks.<last>.norm1' (pytorch-grad-cam's choice), or an earlier block."
        )
    return g_cf


class Explainer:
    """Grad-CAM family explainer for 2D and 3D CNNs.

    The explainer holds configuration only; every call is independent.

    Parameters
    ----------
    model:
        Any eager ``torch.nn.Module`` (MONAI or plain torch) taking ``(B, C, H, W)`` or
        ``(B, C, D, H, W)`` (plus other inputs or keyword arguments: see ``__call__``). It is
        never modified.
    layers:
        ``"auto"`` (default: chosen from one shape-only forward pass by
        :func:`medcam.engine.auto.auto_choice`: the deepest feature layer, fused with the
        deepest layer of every finer grid back to the deepest layer whose grid is at least 1/4
        of the input per axis; recorded in ``metadata()["layers_chosen_by"]``),
        ``"last"`` (the last layer whose output is still a feature map with extent > 1, the
        earlier default), a module name such as ``"features.denseblock4"``, a module object,
        or a list of these.
    method:
        ``"auto"`` (default: Grad-CAM for classifiers, HiResCAM for classifiers whose linear layer
        reads the flattened feature map, LayerCAM for segmentation outputs, see
        :func:`medcam.engine.auto.auto_method`; recorded in ``metadata()["method_chosen_by"]``),
        ``"gradcam"``, ``"gradcam++"``, ``"hirescam"``, ``"xgradcam"``, ``"layercam"``,
        ``"cam"``, or the gradient-free ``"scorecam"`` and ``"ablationcam"`` (see
        :data:`medcam.METHODS`).
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
    at:
        ``"output"`` (default) or ``"input"``: explain the layer's output or its input
        (Captum's ``attribute_to_layer_input``; e.g. the feature map a head receives). One value
        for all layers, a list aligned with ``layers``, or a dict ``{layer: "input"}``.
    reshape:
        How to read token / channel-last layers as ``(B, C, *grid)`` maps: ``"auto"`` (default:
        channel-first maps as they are; tokens and channel-last maps on the grid the model
        declares, see :mod:`medcam.engine.reshape`), ``None`` (as they are), a callable
        ``t -> (B, C, *grid)`` (pytorch-grad-cam's ``reshape_transform``), a built-in
        (:func:`medcam.engine.tokens`, :func:`medcam.engine.channels_last`), or a dict
        ``{layer: spec}``.
    perturbations_per_eval:
        For ``"scorecam"`` / ``"ablationcam"``: perturbed copies per forward pass. Bounds
        memory (one batch of copies exists at a time); Captum's name, pytorch-grad-cam's
        ``batch_size``.
    chosen_by:
        Why the layers and method were chosen, recorded as ``layers_chosen_by`` /
        ``method_chosen_by`` instead of ``"user"`` for named ones (e.g.
        :meth:`medcam.Calibration.describe`: ``"calibrated on 8 labelled cases: ..."``) and in
        parentheses after the rule for ``"auto"`` ones (a calibration that kept the default).
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
        at: At | Sequence[At] | Mapping[Any, At] = "output",
        reshape: ReshapeSpec | Mapping[Any, ReshapeSpec] = "auto",
        perturbations_per_eval: int = 16,
        chosen_by: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"model must be a torch.nn.Module, not {type(model).__name__}.")
        check_hookable(model)
        self.model = model
        self.method = None if method == "auto" else get_method(method)
        if self.method is None or self.method.needs_gradients:
            _check_not_inference(model)
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
        self._at = self._per_layer("at", at, ("output", "input"))
        self._reshape = self._per_layer("reshape", reshape, None)
        if isinstance(perturbations_per_eval, bool) or not (
            isinstance(perturbations_per_eval, int) and perturbations_per_eval >= 1
        ):
            raise MedcamError(
                f"perturbations_per_eval must be a positive int, not {perturbations_per_eval!r}."
            )
        self.perturbations_per_eval = perturbations_per_eval
        self.chosen_by = chosen_by

    def _per_layer(self, what: str, spec: Any, allowed: tuple[str, ...] | None) -> Any:
        """A per-layer option as one value, a dict ``{name: value}`` or a list aligned with the
        layers; returns ``(default, {name: value})``."""

        def check(v: Any) -> Any:
            if allowed is not None and v not in allowed:
                raise MedcamError(f"{what}={v!r} is not one of {', '.join(map(repr, allowed))}.")
            return v

        default = "output" if what == "at" else "auto"
        if isinstance(spec, Mapping):
            keys = resolve_layers(self.model, list(spec))
            if not self._auto and set(keys) - set(self._layers):
                raise LayerError(
                    f"{what}= names layer(s) {sorted(set(keys) - set(self._layers))} that are not "
                    f"among layers={self._layers}."
                )
            return default, {k: check(v) for k, v in zip(keys, spec.values(), strict=True)}
        if isinstance(spec, (list, tuple)):
            if self._auto or len(spec) != len(self._layers):
                raise MedcamError(
                    f"A list for {what}= must have one entry per named layer "
                    f"({len(self._layers)}); give one value or a dict {{layer: value}}."
                )
            return default, {n: check(v) for n, v in zip(self._layers, spec, strict=True)}
        return check(spec), {}

    def _option(self, option: tuple[Any, dict[str, Any]], name: str) -> Any:
        default, per = option
        return per.get(name, default)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        model_dev = model_device(self.model, x)
        if self.device is not None and self.device.type != model_dev.type:
            raise ModelError(
                f"device={self.device} but the model is on {model_dev}; move the model first "
                f"(model.to('{self.device}')) or leave device=None."
            )
        return x.to(model_dev)

    def layer_names(self, x: torch.Tensor, inputs: ModelInputs | None = None) -> list[str]:
        """The target layer names for input ``x`` (resolving ``"auto"`` / ``"last"``);
        ``inputs``: the full model call for models that take more than ``x``."""
        return self.layer_plan(x, inputs)[0]

    def layer_plan(
        self, x: torch.Tensor, inputs: ModelInputs | None = None
    ) -> tuple[list[str], Fusion | None, str]:
        """``(layer names, fusion, layers_chosen_by)`` for input ``x``.

        ``layers_chosen_by`` is ``"auto: <rule>"``, ``"last: <layer>"``, or for named layers
        ``chosen_by`` (default ``"user"``).
        """
        if not self._auto:
            return list(self._layers), self.fusion, self.chosen_by or "user"
        key = tuple(x.shape[1:])
        if key not in self._auto_cache:
            infos, out = trace_layers(self.model, x, eval=self.eval, inputs=inputs)
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
            return list(plan.layers), self.fusion, self._why(f"last: {plan.rule}")
        return list(plan.layers), self.fusion or plan.fusion, self._why(plan.chosen_by)

    def _why(self, rule: str) -> str:
        """An automatic choice's reason, with ``chosen_by`` after it when given."""
        return f"{rule} ({self.chosen_by})" if self.chosen_by else rule

    def __call__(
        self,
        x: torch.Tensor | Sequence[Any],
        target: Any = "pred",
        *,
        forward_kwargs: Mapping[str, Any] | None = None,
        input_index: int = 0,
        normalize: Normalization = "none",
        percentiles: tuple[float, float] = (0.0, 99.0),
        upsample_to_input: bool = True,
    ) -> CAMResult:
        """Explain a batch.

        Parameters
        ----------
        x:
            ``(B, C, H, W)`` or ``(B, C, D, H, W)`` float input (moved to the model's device),
            or a tuple of the model's positional inputs, ``x[input_index]`` being the image
            explained and the others passed through (Captum's ``additional_forward_args``).
        target:
            ``"pred"`` (each sample's own argmax), an int, per-sample ints ``(B,)`` or
            ``(B, K)``, ``"all"``, a :class:`medcam.SegmentationTarget`, or a callable
            ``logits -> (B, K)`` scores. See :mod:`medcam.engine.targets`.
        forward_kwargs:
            Keyword arguments for ``model.forward`` (tensors are moved to the model's device).
            Perturbation methods take tensors whose first dim is ``B`` as per-sample.
        input_index:
            Which positional input is the explained image.
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
        inputs = ModelInputs.build(x, forward_kwargs, input_index)
        device = self._to_device(check_input(inputs.x)).device
        method = self.method  # None: "auto", chosen from the model output below
        extra: dict[str, Any] = inputs.describe()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            target_fn = as_target(target)  # its tensors are made outside inference mode
            dtype = model_dtype(self.model)
            if dtype is not None and inputs.x.dtype != dtype:
                extra["input_dtype"] = str(inputs.x.dtype).removeprefix("torch.")
            inputs = inputs.to(device, dtype)  # inference tensors are cloned here
            x = inputs.x
            spatial = tuple(x.shape[2:])
            names, fusion, chosen_by = self.layer_plan(x, inputs)
            at = {n: self._option(self._at, n) for n in names}
            # No graph before the first target layer; its hook turns gradients on (see
            # ActivationCapture); no_grad's exit restores the caller's mode.
            stack.enter_context(torch.no_grad())
            stack.enter_context(eval_mode(self.model, self.eval))
            capture = stack.enter_context(
                ActivationCapture(
                    self.model,
                    names,
                    grad_from_layer=method is None or method.needs_gradients,
                    at=at,
                )
            )
            # method="auto": a classifier whose linear layer reads the flattened feature map
            # gets HiResCAM; the probe watches this forward pass for one (no extra pass)
            head = None
            if method is None:
                head = stack.enter_context(FlattenedHead(self.model, names, inputs.x))
            output = inputs(self.model)
            logits = select_output(output, self.output)
            _check_output_for_target(logits, len(spatial), target_fn)
            scores, classes = target_fn(logits)
            _check_scores(scores)
            kept = capture.activations()
            modules = dict(self.model.named_modules())
            hints = model_grids(self.model, spatial)
            layouts = [
                resolve_layout(self._option(self._reshape, n), modules[n], a, spatial, hints, n)
                for n, a in zip(names, kept, strict=True)
            ]
            acts = []
            for n, a, layout in zip(names, kept, layouts, strict=True):
                a_cf = layout.to_channels_first(a)
                check_feature_map(n, a_cf, len(spatial), at[n])
                acts.append(a_cf)
            grads: list[torch.Tensor | None] = [None] * len(acts)
            batched = False
            if method is None or method.needs_gradients:  # every "auto" method needs them
                raw_grads, batched = _backward(scores, kept, names, self.batched, x)
                grads = [
                    _reshaped_gradient(n, g, layout)
                    for n, g, layout in zip(names, raw_grads, layouts, strict=True)
                ]
        method_chosen_by = self.chosen_by or "user"
        if method is None:
            # a head is only trusted when the model returns one tensor: with several outputs the
            # linear layer seen may feed another one
            single = isinstance(output, torch.Tensor)
            auto_name, method_chosen_by = auto_method(
                tuple(logits.shape), head.found if single else None, spatial_rank=len(spatial)
            )
            if head.found and not single and auto_name == "gradcam":
                method_chosen_by += (
                    f"; {head.found} reads a flattened feature map, but the model returns "
                    "several outputs and it may feed another one: if it feeds the explained "
                    "output, name method='hirescam'"
                )
            method_chosen_by = self._why(method_chosen_by)
            method = get_method(auto_name)
        fc_weight = (
            _final_linear_weight(self.model, self.fc_layer) if method.name == "cam" else None
        )
        raw: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if method.perturbation:
                stack.enter_context(eval_mode(self.model, self.eval))
                score_fn = fixed_target(target_fn, logits.detach(), classes.detach())
            forwards = 0
            for name, a, g, kept_a, layout in zip(names, acts, grads, kept, layouts, strict=True):
                perturbation = None
                if method.perturbation:
                    perturbation = Perturbation(
                        self.model, inputs, self.output, score_fn, modules[name], at[name],
                        layout, kept_a.detach(), scores.detach(), self.perturbations_per_eval,
                    )  # fmt: skip
                ctx = MethodContext(
                    classes=classes.detach(), fc_weight=fc_weight, perturbation=perturbation
                )
                a32 = a.detach().float()
                g32 = None if g is None else g.detach().float()
                raw[name] = method.fn(a32, g32, ctx).float()
                forwards += perturbation.forwards if perturbation is not None else 0
        if method.perturbation:
            extra["perturbation"] = {
                "forward_passes": forwards,
                "perturbations_per_eval": self.perturbations_per_eval,
            }
        if any(v == "input" for v in at.values()):
            extra["at"] = dict(at)
        if any(layout.kind != "channels_first" for layout in layouts):
            extra["layouts"] = {
                n: layout.record() for n, layout in zip(names, layouts, strict=True)
            }
        with torch.no_grad():
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
            extra=extra,
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
    keys = ("fc_layer", "batched", "eval", "device", "at", "reshape", "perturbations_per_eval",
            "chosen_by")  # fmt: skip
    explainer_kwargs = {k: kwargs.pop(k) for k in keys if k in kwargs}
    return Explainer(model, layers, method, output=output, fusion=fusion, **explainer_kwargs)(
        x, target, normalize=normalize, **kwargs
    )
