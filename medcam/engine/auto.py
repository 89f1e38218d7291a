"""The default target layer(s): what ``layers="auto"`` explains, and why.

The rule works on the output shapes of one cheap, no-grad shape pass (:func:`trace_layers`):

1. **Candidates** are the modules whose output is a feature map ``(B, C, *spatial)`` with more
   than one voxel, that run once per forward pass, and whose output is not shaped like the
   model output (a segmentation head and what follows it are skipped). Attention weights and
   stacked queries/keys/values inside a transformer block look like maps and are not
   (:attr:`LayerInfo.not_a_map`).
2. **Deep layer**: the last candidate in execution order (what ``layers="last"`` explains).
   Its feature grid is often tiny: 3x3x3 for a 3D DenseNet121 at 96^3, 1/32 of the input.
3. **Fine layer**: the last candidate whose grid is at least 1/4 of the input along every
   spatial axis (a 24^3 grid or finer for a 96^3 input).
4. If the deep layer is already that fine (segmentation decoders, shallow networks), it is
   explained alone. Otherwise the deepest layer of **every resolution stage** from the fine
   layer down to the deep layer is explained and the maps are **fused** by their product
   (geometric mean of the peak-scaled maps): the deep layers know *what* the class is, the
   fine ones *where*; the product keeps what all of them agree on, a compact spot.

:func:`auto_method` picks the method for ``method="auto"``: Grad-CAM for classifiers (HiResCAM
when the classifier's linear layer reads the flattened feature map, :class:`FlattenedHead`),
LayerCAM for segmentation outputs. The layer rule and the Grad-CAM / LayerCAM choice come from
``benchmarks/bench_quality.py`` (several architectures and tasks, with a held-out set); the
HiResCAM case from what HiResCAM guarantees for such heads. See ``docs/engine.md``, "Choosing a
layer".
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

import torch
from torch import nn

from medcam.engine.layers import LayerInfo
from medcam.engine.postprocess import Fusion
from medcam.errors import LayerError

__all__ = [
    "DEFAULT_FUSION",
    "DEFAULT_MIN_FRACTION",
    "AutoChoice",
    "FlattenedHead",
    "auto_choice",
    "auto_method",
    "candidates",
]

DEFAULT_MIN_FRACTION = Fraction(1, 4)
DEFAULT_FUSION: Fusion = "product"
DEFAULT_CHAIN = True

_NO_CANDIDATE = (
    "layers='auto' found no layer with a spatial feature-map output (B, C, *spatial) with "
    "extent > 1 that runs once per forward pass. medcam explains convolutional networks; check "
    "that the model has conv layers and that the input has the spatial size it expects, or name "
    "a layer explicitly."
)


@dataclass(frozen=True)
class AutoChoice:
    """What ``layers="auto"`` chose for one input shape.

    Attributes
    ----------
    layers:
        Layer names, in execution order (one or two).
    fusion:
        ``"mean"`` / ``"product"`` when several layers are fused, else ``None``.
    rule:
        Why, in words (recorded as ``layers_chosen_by = "auto: <rule>"``).
    grids:
        Feature-grid shape of each chosen layer.
    """

    layers: list[str]
    fusion: Fusion | None
    rule: str
    grids: dict[str, tuple[int, ...]]

    @property
    def chosen_by(self) -> str:
        return f"auto: {self.rule}"


def _grid(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def candidates(
    infos: Sequence[LayerInfo], model_output_shape: tuple[int, ...] | None
) -> list[LayerInfo]:
    """Possible target layers in execution order: feature maps with extent > 1, run once, not
    shaped like the model output (``model_output_shape``, from the same pass)."""
    return [i for i in infos if i.is_candidate and i.output_shape != model_output_shape]


def _finer(a: Sequence[int], b: Sequence[int]) -> bool:
    """True when grid ``a`` is finer than ``b``: at least as large on every axis, larger on one."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(
        x > y for x, y in zip(a, b, strict=True)
    )


def _stage_layer(cands: Sequence[LayerInfo], k: int) -> LayerInfo | None:
    """The deepest candidate ``k`` resolution stages finer than the deepest candidate."""
    grid, stage = tuple(cands[-1].feature_shape), 0
    for info in reversed(cands):
        if _finer(info.feature_shape, grid):
            grid, stage = tuple(info.feature_shape), stage + 1
            if stage == k:
                return info
    return None


def auto_choice(
    infos: Sequence[LayerInfo],
    input_shape: Sequence[int],
    model_output_shape: tuple[int, ...] | None,
    *,
    min_fraction: float | Fraction = DEFAULT_MIN_FRACTION,
    stages_back: int | None = None,
    chain: bool = DEFAULT_CHAIN,
    fusion: Fusion | None = DEFAULT_FUSION,
    block_outputs: bool = False,
    coarsest: float | Fraction | None = None,
) -> AutoChoice:
    """Choose the default target layer(s) from one shape pass.

    Parameters
    ----------
    infos:
        The pass's :class:`LayerInfo` list (execution order), from :func:`trace_layers` /
        :func:`medcam.list_layers`.
    input_shape:
        The model input's spatial shape ``(*S)`` (or the full ``(B, C, *S)``).
    model_output_shape:
        Shape of the model output (logits) in the same pass.
    min_fraction:
        The fine layer is the deepest whose grid is at least this fraction of the input along
        every axis.
    stages_back:
        Instead of ``min_fraction``: the fine layer is the deepest one this many resolution
        stages finer than the deepest layer (1: the last layer before the final downsampling).
    chain:
        Also fuse the deepest layer of every resolution stage between the fine and the deep
        layer (``False``: the fine and the deep layer only).
    fusion:
        How to combine the layers; ``None`` explains the fine layer alone.
    block_outputs:
        Represent each resolution stage by the outermost module ending it (a block's output,
        see :func:`_outermost`) instead of its deepest layer (the default: on DenseNets the
        deepest layer is the transition's 1x1 conv, which localised better than the dense
        block's concatenated output in ``benchmarks/bench_quality.py`` and the demo).
    coarsest:
        With ``chain``: leave out the layers whose grid is coarser than this fraction of the
        input on some axis (the fine layer always stays). ``None`` keeps every stage down to
        the deepest layer.

    Returns
    -------
    AutoChoice

    Raises
    ------
    LayerError
        If the model has no candidate layer.

    Notes
    -----
    The defaults are what ``layers="auto"`` uses; the other settings exist so that
    ``benchmarks/bench_quality.py`` can compare the alternatives with the same code.
    """
    choice = _choose(
        infos, input_shape, model_output_shape, min_fraction=min_fraction,
        stages_back=stages_back, chain=chain, fusion=fusion, block_outputs=block_outputs,
        coarsest=coarsest,
    )  # fmt: skip
    deep = next(k for k, i in enumerate(infos) if i.name == choice.layers[-1])
    tokens = [i.name for i in infos[deep + 1 :] if i.is_token_layer]
    if not tokens:
        return choice
    # pytorch-grad-cam's advice for a ViT: the input of the last attention block (its norm1)
    example = next((n for n in reversed(tokens) if n.endswith("norm1")), tokens[-1])
    note = (
        "; the token layers after it (a transformer) are not feature maps and are not "
        f"explained by default: name one to explain them (e.g. {example})"
    )
    return replace(choice, rule=choice.rule + note)


def _choose(
    infos: Sequence[LayerInfo],
    input_shape: Sequence[int],
    model_output_shape: tuple[int, ...] | None,
    *,
    min_fraction: float | Fraction,
    stages_back: int | None,
    chain: bool,
    fusion: Fusion | None,
    block_outputs: bool,
    coarsest: float | Fraction | None,
) -> AutoChoice:
    """:func:`auto_choice` without the note on token layers."""
    cands = candidates(infos, model_output_shape)
    if not cands:
        raise LayerError(_NO_CANDIDATE)
    rank = cands[-1].spatial_rank
    spatial = tuple(int(s) for s in input_shape)[-rank:]
    deep = cands[-1]

    def pick(info: LayerInfo) -> LayerInfo:
        return _outermost(cands, info) if block_outputs else info

    inp, deep_grid = _grid(spatial), _grid(deep.feature_shape)
    if stages_back is not None:
        fine = _stage_layer(cands, stages_back)
        fine = fine and pick(fine)
        what = f"{stages_back} resolution stage{'s' if stages_back > 1 else ''} finer"
        if fine is None:
            rule = (
                f"no layer is {what} than the deepest feature layer {deep.name} "
                f"({deep_grid}); explaining it alone"
            )
            return AutoChoice([deep.name], None, rule, _grids([deep]))
    else:
        frac = Fraction(min_fraction).limit_denominator(1000)
        fine = next((i for i in reversed(cands) if _at_least(i.feature_shape, spatial, frac)), None)
        what = f"whose grid is at least {frac} of the input {inp} per axis"
        if fine is not None and fine is not deep:
            fine = pick(fine)
        if fine is None:
            rule = (
                f"every feature grid is coarser than {frac} of the input {inp} on some axis; "
                f"explaining the deepest feature layer {deep.name} ({deep_grid})"
            )
            return AutoChoice([deep.name], None, rule, _grids([deep]))
        if fine is deep:
            rule = (
                f"the deepest feature layer {deep.name} ({deep_grid}) is already at least "
                f"{frac} of the input {inp} per axis; explaining it alone"
            )
            return AutoChoice([deep.name], None, rule, _grids([deep]))
    fine_text = f"{fine.name} ({_grid(fine.feature_shape)})"
    if fusion is None:
        rule = (
            f"the deepest layer {what}: {fine_text}; the deepest feature layer {deep.name} "
            f"({deep_grid}) is coarser"
        )
        return AutoChoice([fine.name], None, rule, _grids([fine]))
    if not chain:
        rule = (
            f"{fusion} fusion of the deepest feature layer {deep.name} ({deep_grid}) and the "
            f"deepest layer {what}, {fine_text}"
        )
        return AutoChoice([fine.name, deep.name], fusion, rule, _grids([fine, deep]))
    layers = _chain(cands, fine, pick)
    if coarsest is None:
        listed = ", ".join(f"{i.name} ({_grid(i.feature_shape)})" for i in layers)
        rule = (
            f"{fusion} fusion of the deepest layer of each resolution stage, from the deepest "
            f"feature layer back to the deepest layer {what}: {listed}"
        )
        return AutoChoice([i.name for i in layers], fusion, rule, _grids(layers))
    low = Fraction(coarsest).limit_denominator(1000)
    kept = [layers[0], *(i for i in layers[1:] if _at_least(i.feature_shape, spatial, low))]
    left_out = (
        f"; grids coarser than {low} of the input are left out (deepest feature layer "
        f"{deep.name}, {deep_grid})"
        if len(kept) < len(layers)
        else ""
    )
    if len(kept) == 1:
        rule = f"the deepest layer {what}: {fine_text}" + left_out
        return AutoChoice([fine.name], None, rule, _grids(kept))
    listed = ", ".join(f"{i.name} ({_grid(i.feature_shape)})" for i in kept)
    rule = (
        f"{fusion} fusion of the deepest layer of each resolution stage whose grid is between "
        f"{frac if stages_back is None else fine_text} and {low} of the input {inp} per axis: "
        f"{listed}" + left_out
    )
    return AutoChoice([i.name for i in kept], fusion, rule, _grids(kept))


def _at_least(grid: Sequence[int], spatial: Sequence[int], frac: Fraction) -> bool:
    """True when ``grid`` is at least ``frac`` of ``spatial`` along every axis."""
    return all(
        g * frac.denominator >= s * frac.numerator for g, s in zip(grid, spatial, strict=True)
    )


def _chain(cands: Sequence[LayerInfo], fine: LayerInfo, pick) -> list[LayerInfo]:
    """One layer per resolution stage from ``fine`` to the deepest candidate, in execution
    order: the deepest candidate, and for each finer grid met walking back from it the deepest
    layer of that grid (``pick``: or the block output that ends the stage)."""
    out, grid = [cands[-1]], tuple(cands[-1].feature_shape)
    for info in reversed(cands):
        if tuple(info.feature_shape) == tuple(fine.feature_shape):
            break
        if _finer(info.feature_shape, grid) and _finer(fine.feature_shape, info.feature_shape):
            out.append(pick(info))
            grid = tuple(info.feature_shape)
    return [fine, *out[::-1]]


def _outermost(cands: Sequence[LayerInfo], info: LayerInfo) -> LayerInfo:
    """The outermost module (fewest dots in its name; the deepest of those) among the
    consecutive candidates that share ``info``'s grid and end at ``info``: a block's output
    rather than a layer inside the next block (MONAI ResNet50's ``layer2``, not the
    ``layer3.0.bn1`` that still has ``layer2``'s grid before its strided conv)."""
    k = next(n for n, c in enumerate(cands) if c is info)
    j = k
    while j > 0 and tuple(cands[j - 1].feature_shape) == tuple(info.feature_shape):
        j -= 1
    run = cands[j : k + 1]
    depth = min(c.name.count(".") for c in run)
    return [c for c in run if c.name.count(".") == depth][-1]


def _grids(layers: Sequence[LayerInfo]) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.feature_shape) for i in layers}


class FlattenedHead:
    """Watches one forward pass for an ``nn.Linear`` that reads a flattened feature map.

    A classifier whose head is ``flatten + linear`` (MONAI ``Classifier`` / ``Regressor``,
    VGG-style ``AdaptiveAvgPool(k > 1) + flatten + MLP``) has no global pooling: each voxel of
    the map it flattens has its own weight. The probe puts a forward pre-hook on every
    ``nn.Linear``; a call whose ``(B, F)`` input is a view of a ``(B, C, *grid)`` tensor with
    ``F == C * prod(grid)`` and more than one grid voxel (``nn.Flatten``, ``.view``,
    ``.flatten(1)``, ``.reshape`` of a contiguous map: the same storage, not a coincidence of
    sizes) is such a head, provided that

    - one of the ``after`` modules (the explained layers) has already run: a linear layer
      before them (a spatial transformer's localiser) is no head of what is explained, and
    - what it flattens is not ``model_input`` (a shortcut from the image itself).

    A flatten that copies (a channels-last map) is not seen.

    Use as a context manager around the forward pass; ``found`` is the first such layer's name
    (in call order) or ``None``. Hooks are removed on exit; only the calling thread is watched.
    """

    def __init__(
        self,
        model: nn.Module,
        after: Sequence[str] = (),
        model_input: torch.Tensor | None = None,
    ):
        self.model = model
        self.after = list(after)
        self.model_input = model_input
        self.found: str | None = None
        self._armed = not self.after
        self._handles: list = []

    def __enter__(self) -> FlattenedHead:
        thread = threading.get_ident()
        modules = dict(self.model.named_modules())

        def arm(module: nn.Module, args: tuple, output: object) -> None:
            if threading.get_ident() == thread:
                self._armed = True

        def make_hook(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                if self.found is None and self._armed and threading.get_ident() == thread:
                    if args and _reads_flattened_map(args[0], self.model_input):
                        self.found = name

            return hook

        self._handles = [modules[n].register_forward_hook(arm) for n in self.after]
        self._handles += [
            m.register_forward_pre_hook(make_hook(n))
            for n, m in modules.items()
            if isinstance(m, nn.Linear)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _reads_flattened_map(x: object, model_input: torch.Tensor | None = None) -> bool:
    """True when ``x`` is ``(B, F)``, a view of a ``(B, C, *grid)`` map holding all of it, with
    a grid of more than one voxel, and that map is not ``model_input``."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        return False
    base = x._base  # the tensor a view was made from (None when x owns its storage)
    if base is None or base.ndim < 4 or base.shape[0] != x.shape[0]:
        return False
    if model_input is not None and (
        base.untyped_storage().data_ptr() == model_input.untyped_storage().data_ptr()
    ):
        return False
    return math.prod(base.shape[2:]) > 1 and x.shape[1] == math.prod(base.shape[1:])


def auto_method(
    model_output_shape: tuple[int, ...],
    flattened: str | None = None,
    spatial_rank: int | None = None,
) -> tuple[str, str]:
    """The method ``method="auto"`` uses for a model output shape, and why.

    Classifier outputs ``(B, classes)`` get Grad-CAM. Segmentation outputs ``(B, C, *spatial)``
    get LayerCAM: Grad-CAM averages each channel's gradient over the whole volume, which on a
    segmentation network smears the evidence of a small structure over everything the channel
    responds to (on the benchmark's UNet its pointing game was 0.00, LayerCAM's 1.00). With
    ``spatial_rank`` (of the input) given, only an output with that many spatial axes is a
    segmentation; any other shape (a MONAI ``Regressor``'s ``(B, 2, 3)``) is treated like a
    classifier's.

    A classifier whose head reads the flattened feature map (``flattened``: the linear layer's
    name, from :class:`FlattenedHead`) gets HiResCAM: there the gradient of the score is a
    different weight at every voxel, and Grad-CAM's spatial average discards where the model
    looked. HiResCAM multiplies activation and gradient voxel by voxel, which for a single
    linear layer on the flattened map is exactly each voxel's contribution to the score
    (Draelos & Carin 2020). With global average pooling the deepest layer's gradient is the
    same at every voxel, and Grad-CAM and HiResCAM agree there.
    """
    shape = tuple(int(s) for s in model_output_shape)
    if len(shape) > 2 and (spatial_rank is None or len(shape) == 2 + spatial_rank):
        return "layercam", (
            "auto: segmentation output (B, C, *spatial): LayerCAM (element-wise gradient "
            "weights; Grad-CAM's volume-averaged weights smear a small structure)"
        )
    what = (
        "classifier output (B, classes)"
        if len(shape) <= 2
        else f"output (B, {', '.join(map(str, shape[1:]))}), not a map of the input's grid,"
    )
    if flattened:
        return "hirescam", (
            f"auto: {what} whose {flattened} reads the flattened feature map (no global "
            "pooling): HiResCAM (each voxel has its own weight; Grad-CAM's spatially averaged "
            "gradient would discard where the model looked)"
        )
    return "gradcam", f"auto: {what}: Grad-CAM"
