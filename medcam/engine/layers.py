"""Finding, listing and hooking the target layer(s) of a model.

The engine hooks a layer with a forward hook that keeps the layer's output tensor for one call.
Nothing is attached to the model outside a call, and nothing about the model is changed.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medcam.engine.inputs import ModelInputs, model_dtype
from medcam.engine.reshape import detect_layout, model_grids
from medcam.errors import InputError, LayerError, ModelError

__all__ = ["LayerInfo", "list_layers"]


@dataclass(frozen=True)
class LayerInfo:
    """One module of a model and what it produced in a forward pass.

    Attributes
    ----------
    name:
        Dotted module name as in ``model.named_modules()``.
    type:
        The module's class name.
    output_shape:
        Shape of the module's output tensor, ``(B, C, *spatial)`` for feature maps; ``None`` when
        the output is not a tensor (a tuple or dict).
    calls:
        How often the module ran in the forward pass (a reused ``ReLU`` runs more than once and
        cannot be a target layer).
    spatial_rank:
        Number of spatial dimensions of the model input (2 for 2D, 3 for 3D).
    layout:
        How the output reads as a feature map: ``"channels_first"`` ``(B, C, *grid)``,
        ``"channels_last"`` ``(B, *grid, C)`` (Swin blocks), ``"tokens"`` ``(B, N, C)`` (ViT,
        UNETR blocks), or ``None`` when it is no map (see :mod:`medcam.engine.reshape`).
    grid:
        The feature grid of that layout (for tokens: the patch grid; the class token, if any,
        is not part of it).
    prefix_tokens:
        For tokens: how many tokens precede the patch tokens (1 for a class token).
    not_a_map:
        Why an output shaped like ``(B, C, *spatial)`` is not a feature map (attention weights
        or stacked queries/keys/values inside a transformer block), else ``None``.
    """

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    calls: int
    spatial_rank: int
    layout: str | None = None
    grid: tuple[int, ...] | None = None
    prefix_tokens: int = 0
    not_a_map: str | None = None

    @property
    def feature_shape(self) -> tuple[int, ...] | None:
        """Spatial shape of the output feature map (channel-first or channel-last), or ``None``
        when the output is not a feature map (tokens: see ``grid``)."""
        if self.not_a_map is not None:
            return None
        if self.layout in ("channels_first", "channels_last"):
            return self.grid
        if self.layout is not None:
            return None
        if self.output_shape is None or len(self.output_shape) != 2 + self.spatial_rank:
            return None
        return tuple(self.output_shape[2:])

    @property
    def is_token_layer(self) -> bool:
        """True for a token layer ``(B, N, C)`` on a known grid that can be a target (named
        explicitly: ``layers="auto"`` picks feature maps only)."""
        return (
            self.layout == "tokens"
            and self.calls == 1
            and self.grid is not None
            and math.prod(self.grid) > 1
        )

    @property
    def is_candidate(self) -> bool:
        """True when the layer can be a CAM target: one call, feature map with extent > 1."""
        fs = self.feature_shape
        return self.calls == 1 and fs is not None and math.prod(fs) > 1


class _ModelGuard:
    """Who is using one model's training flags and buffers now (see :func:`eval_mode`).

    Eval-mode calls share the model: the first one in switches the modules in training mode to
    eval, the last one out switches them back, so a call never sees another call's restore.
    Train-mode calls (``eval=False``) have the model to themselves, one at a time, and hand
    the buffers back as they found them.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.shared: dict[int, int] = {}  # thread -> eval-mode calls in progress
        self.switched: list[nn.Module] = []
        self.owner: int | None = None  # thread holding a train-mode call
        self.depth = 0


_GUARDS: weakref.WeakKeyDictionary[nn.Module, _ModelGuard] = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def _guard(model: nn.Module) -> _ModelGuard:
    with _GUARDS_LOCK:
        guard = _GUARDS.get(model)
        if guard is None:
            guard = _GUARDS[model] = _ModelGuard()
        return guard


def _training_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Copies of the buffers of modules in training mode (batch-norm running statistics and
    counters): what a training-mode forward changes."""
    with torch.no_grad():
        return [
            (m, name, b.detach().clone())
            for m in model.modules()
            if m.training
            for name, b in m.named_buffers(recurse=False)
            if b is not None
        ]


def _restore_buffers(saved: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for m, name, value in saved:
            current = m._buffers.get(name)
            if isinstance(current, torch.Tensor) and current.shape == value.shape:
                current.copy_(value)
            else:  # the forward replaced the buffer object
                m._buffers[name] = value


@contextlib.contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the block with the model's state guarded; nothing about the model changes for good.

    ``enabled=True``: every module is in eval mode for the block and gets its own training flag
    back after. Calls from several threads share the switch (the first switches, the last
    restores), so one thread's restore never puts a module back in training mode while another
    thread's call is running; a model already in eval mode is never written to.

    ``enabled=False`` (``Explainer(eval=False)``): the model runs as it is (a training-mode
    batch norm uses the batch's statistics), and the buffers that a training-mode forward
    updates (running means, variances, counters) are restored after the block. Such calls take
    the model for themselves: they wait for other calls on the model, and others wait for them.
    """
    guard = _guard(model)
    me = threading.get_ident()
    if enabled:
        with guard.cond:
            if guard.owner == me:  # inside this thread's own train-mode call
                local = [m for m in model.modules() if m.training]
                for m in local:
                    m.training = False
            else:
                local = None
                while guard.owner is not None:
                    guard.cond.wait()
                if not guard.shared:
                    guard.switched = [m for m in model.modules() if m.training]
                    for m in guard.switched:
                        m.training = False
                guard.shared[me] = guard.shared.get(me, 0) + 1
        try:
            yield
        finally:
            with guard.cond:
                if local is not None:
                    for m in local:
                        m.training = True
                else:
                    guard.shared[me] -= 1
                    if not guard.shared[me]:
                        del guard.shared[me]
                    if not guard.shared:
                        for m in guard.switched:
                            m.training = True
                        guard.switched = []
                        guard.cond.notify_all()
        return
    with guard.cond:
        if guard.owner != me:
            if guard.shared.get(me):
                raise ModelError(
                    "A call with eval=False was started inside an eval-mode call on the same "
                    "model in the same thread; finish the one before starting the other."
                )
            while guard.owner is not None or guard.shared:
                guard.cond.wait()
            guard.owner = me
        guard.depth += 1
        saved = _training_buffers(model) if guard.depth == 1 else []
    try:
        yield
    finally:
        with guard.cond:
            _restore_buffers(saved)
            guard.depth -= 1
            if not guard.depth:
                guard.owner = None
                guard.cond.notify_all()


def check_hookable(model: nn.Module) -> None:
    """Raise :class:`ModelError` for TorchScript models, which cannot be hooked."""
    if isinstance(model, torch.jit.ScriptModule) or any(
        isinstance(m, torch.jit.ScriptModule) for m in model.modules()
    ):
        raise ModelError(
            "The model (or one of its submodules) is a TorchScript module; TorchScript modules "
            "cannot be hooked, so their layer activations and gradients are out of reach. Build "
            "the eager network instead: for a MONAI bundle, instantiate its `network_def` and "
            "load `models/model.pt` (the state dict) rather than `models/model.ts`."
        )


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    """All named submodules of ``model`` except the model itself."""
    return {name: m for name, m in model.named_modules() if name}


def resolve_layers(model: nn.Module, layers: Sequence[str | nn.Module]) -> list[str]:
    """Turn layer names or module objects into checked module names.

    Raises
    ------
    LayerError
        If a name is not a submodule of ``model``; the message lists the closest names.
    """
    modules = module_names(model)
    by_id = {id(m): name for name, m in modules.items()}
    names: list[str] = []
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in by_id:
                raise LayerError(
                    f"The module {type(layer).__name__} passed as a layer is not a submodule of "
                    "the model. Pass a module from this model or its dotted name."
                )
            names.append(by_id[id(layer)])
            continue
        if not isinstance(layer, str):
            raise LayerError(f"A layer must be a module name (str) or a module, not {layer!r}.")
        if layer not in modules:
            close = difflib.get_close_matches(layer, list(modules), n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise LayerError(
                f"The model has no layer named {layer!r}.{hint} `medcam layers` (Python: "
                "medcam.list_layers(model, example_input)) shows every layer with its output "
                "shape; or use the default, --layer auto (layers='auto')."
            )
        names.append(layer)
    if len(set(names)) != len(names):
        raise LayerError(f"A layer is listed twice in {names}; list each layer once.")
    return names


def _first_tensor_shape(output: object) -> tuple[int, ...] | None:
    return tuple(output.shape) if isinstance(output, torch.Tensor) else None


def trace_layers(
    model: nn.Module, x: torch.Tensor, *, eval: bool = True, inputs: ModelInputs | None = None
) -> tuple[list[LayerInfo], object]:
    """One no-grad forward recording each submodule's output shape; returns (infos, output).

    ``inputs`` (optional) is the full model call when the model takes more than ``x``.
    """
    spatial_rank = x.ndim - 2
    modules = module_names(model)
    hints = model_grids(model, tuple(x.shape[2:]))
    records: dict[str, list] = {}
    order: list[str] = []
    thread = threading.get_ident()

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if threading.get_ident() != thread:
                return
            if name not in records:
                records[name] = [type(module).__name__, _first_tensor_shape(output), 0]
                order.append(name)
            records[name][2] += 1

        return hook

    if inputs is None:
        inputs = ModelInputs.build(x)
    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad(), eval_mode(model, eval):
            output = inputs(model)
    finally:
        for h in handles:
            h.remove()
    layouts = {
        n: None if shape is None else detect_layout(modules[n], shape, x.shape[2:], hints)
        for n, (_, shape, _) in records.items()
    }
    infos = []
    for n in order:
        kind, shape, calls = records[n]
        layout = layouts[n]
        extra: dict = {}
        why = None if shape is None else _not_a_map(n, shape, x.shape[0], records, layouts)
        if why is not None:
            layout, extra = None, {"not_a_map": why}
        if layout is not None:
            extra = {"layout": layout.kind, "grid": layout.grid,
                     "prefix_tokens": layout.prefix_tokens}  # fmt: skip
        infos.append(LayerInfo(n, kind, shape, calls, spatial_rank, **extra))
    return infos, output


def _not_a_map(
    name: str, shape: tuple[int, ...], batch: int, records: dict, layouts: dict
) -> str | None:
    """Why an output of rank 4 or more is no feature map, or ``None``: its first axis is not
    the batch (the stacked ``(3, B, heads, N, d)`` queries, keys and values of an attention
    block), or it sits inside a module whose output is ``N`` tokens and has ``N`` on one of its
    last two axes (the ``(B, heads, N, N)`` attention weights, per-head tokens)."""
    if len(shape) < 4:
        return None
    if shape[0] != batch:
        return f"first axis {shape[0]} is not the batch ({batch})"
    parent = name.rpartition(".")[0]
    while parent:
        outer = layouts.get(parent)
        if outer is not None and outer.kind == "tokens":
            n = records[parent][1][1]
            if n in shape[-2:]:
                return f"inside the token block {parent} ({n} tokens): attention, not a map"
            return None
        parent = parent.rpartition(".")[0]
    return None


def list_layers(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[object],
    *,
    eval: bool = True,
    forward_kwargs: dict[str, object] | None = None,
    input_index: int = 0,
) -> list[LayerInfo]:
    """Run one forward pass and report every submodule's output shape, in execution order.

    Only shapes are recorded, never activations, so this is as cheap in memory as a plain
    no-grad forward. Token layers (ViT, UNETR) and channel-last layers (Swin blocks) are
    reported with their feature grid (``layout``, ``grid``).

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` (not TorchScript).
    example_input:
        ``(B, C, H, W)`` or ``(B, C, D, H, W)`` tensor of the size you will explain; it is moved
        to the model's device. For a model with several inputs, a tuple of them (the explained
        one at ``input_index``).
    eval:
        Run in eval mode (restored afterwards), as :func:`medcam.explain` does by default.
    forward_kwargs, input_index:
        Keyword arguments for ``model.forward`` and the explained input's position, as in
        :class:`medcam.Explainer`.

    Returns
    -------
    list of LayerInfo
        In the order the modules finished running; ``LayerInfo.is_candidate`` marks feature-map
        target layers (those ``layers="auto"`` chooses from), ``LayerInfo.is_token_layer``
        token layers that can be named as targets, and ``LayerInfo.grid`` their grid.
    """
    check_hookable(model)
    inputs = ModelInputs.build(example_input, forward_kwargs, input_index)
    x = inputs.x
    if not isinstance(x, torch.Tensor):
        raise InputError(f"The example input must be a torch.Tensor, not {type(x).__name__}.")
    if not x.is_floating_point() or x.numel() == 0 or not 3 <= x.ndim <= 5:
        raise InputError(
            f"The example input has shape {tuple(x.shape)} and dtype {x.dtype}; give a float "
            "tensor (B, C, H, W) or (B, C, D, H, W) of the size you will explain."
        )
    inputs = inputs.to(model_device(model, x), model_dtype(model))
    return trace_layers(model, inputs.x, eval=eval, inputs=inputs)[0]


def auto_layer(infos: Sequence[LayerInfo], model_output_shape: tuple[int, ...] | None) -> str:
    """Pick the last layer (in execution order) whose output is still a spatial feature map.

    Layers whose output has the model output's shape (a segmentation head and what follows it)
    are skipped, so segmentation networks get the last feature layer before the logits.
    """
    for info in reversed(infos):
        if info.is_candidate and info.output_shape != model_output_shape:
            return info.name
    raise LayerError(
        "layers='auto' found no layer with a spatial feature-map output (B, C, *spatial) with "
        "extent > 1 that runs once per forward pass. medcam explains convolutional networks; "
        "check that the model has conv layers and that the input has the spatial size it "
        "expects, or name a layer explicitly."
    )


def model_device(model: nn.Module, fallback: torch.Tensor) -> torch.device:
    """The device of the model's first parameter or buffer, else that of ``fallback``."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback.device


At = Literal["output", "input"]


def _first_tensor(args: tuple) -> int | None:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i
    return None


class ActivationCapture:
    """Hooks that keep the output (or input) of the named layers for one call in one thread.

    Each hook hands the rest of the network a clone of the kept tensor, so that in-place ops
    after the layer (``ReLU(inplace=True)``) leave the kept activation intact, and makes it
    differentiable even when the model's parameters are frozen. Hooks fire only for the thread
    that created the capture, so concurrent calls on one shared model do not mix. Use as a
    context manager: the hooks are removed on exit, also after an exception.

    With ``at[name] == "input"`` the layer's input is kept instead of its output (Captum's
    ``attribute_to_layer_input``): a forward pre-hook takes the first positional tensor argument.

    With ``grad_from_layer=True`` the forward is meant to start under ``torch.no_grad()``: the
    first target layer to run switches gradient recording on (thread-local), so no autograd
    graph is built, and no activation saved, for the part of the network before it. The
    caller's ``no_grad`` context restores the mode on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        grad_from_layer: bool = False,
        at: dict[str, At] | None = None,
    ) -> None:
        self._modules = module_names(model)
        self._names = list(names)
        self._at = {n: (at or {}).get(n, "output") for n in self._names}
        self._grad_from_layer = grad_from_layer
        self._thread = threading.get_ident()
        self._handles: list = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(names, 0)
        self.bad_outputs: dict[str, str] = {}

    def _keep(self, name: str, t: object) -> torch.Tensor | None:
        """Record one call; return the clone to hand on, or ``None`` for a non-float tensor."""
        self.calls[name] += 1
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            self.bad_outputs[name] = type(t).__name__ if not isinstance(t, torch.Tensor) else (
                f"{t.dtype} tensor")  # fmt: skip
            return None
        if self._grad_from_layer:
            torch.set_grad_enabled(True)
        kept = t if t.requires_grad else t.detach().requires_grad_(True)
        self.outputs[name] = kept
        return kept.clone()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> torch.Tensor | None:
            if threading.get_ident() != self._thread:
                return None
            return self._keep(name, output)

        return hook

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if threading.get_ident() != self._thread:
                return None
            i = _first_tensor(args)
            if i is None:
                self.calls[name] += 1
                self.bad_outputs[name] = "call without a positional tensor input"
                return None
            passed = self._keep(name, args[i])
            if passed is None:
                return None
            return (*args[:i], passed, *args[i + 1 :])

        return hook

    def __enter__(self) -> ActivationCapture:
        for name in self._names:
            module = self._modules[name]
            if self._at[name] == "input":
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def activations(self) -> list[torch.Tensor]:
        """The kept tensors in layer order, checked to come from one call each (their shape is
        checked by the caller, after any token / channel-last reshape)."""
        acts = []
        for name in self._names:
            what = "input" if self._at[name] == "input" else "output"
            if self.calls[name] == 0:
                raise LayerError(
                    f"Layer {name!r} did not run in the forward pass, so it has no activation. "
                    "Pick a layer that the model's forward() actually uses."
                )
            if self.calls[name] > 1:
                raise LayerError(
                    f"Layer {name!r} ran {self.calls[name]} times in one forward pass (a module "
                    "reused in several places, such as a shared ReLU), so its activation is "
                    "ambiguous. Pick a module that runs once, such as the enclosing block."
                )
            if name in self.bad_outputs:
                raise LayerError(
                    f"Layer {name!r}'s {what} is a {self.bad_outputs[name]}, not a "
                    "floating-point feature-map tensor. Pick a layer whose "
                    f"{what} is a (B, C, *spatial) tensor (or tokens (B, N, C))."
                )
            acts.append(self.outputs[name])
        return acts


def check_feature_map(name: str, a: torch.Tensor, spatial_rank: int, what: str = "output") -> None:
    """Refuse a (reshaped) layer tensor that is not a ``(B, C, *spatial)`` map with > 1 voxel."""
    if a.ndim != 2 + spatial_rank or math.prod(a.shape[2:]) <= 1:
        raise LayerError(
            f"Layer {name!r}'s {what} has shape {tuple(a.shape)}, which has no spatial extent "
            f"(expected (B, C, *spatial) with {spatial_rank} spatial dims, more than one "
            "voxel: a 1-voxel map upsamples to a constant and says nothing about where). Pick "
            "an earlier layer; `medcam layers` (Python: medcam.list_layers(model, x)) shows the "
            "candidates."
        )
