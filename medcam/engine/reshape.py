"""Token and channel-last layers: turning them into ``(B, C, *grid)`` feature maps.

CAM methods work on channel-first feature maps ``(B, C, *grid)``. Transformer layers emit
tokens ``(B, N, C)`` (MONAI ``ViT``/``UNETR`` blocks, ``N = prod(grid)`` patch tokens, plus a class
token when the model has one) or channel-last maps ``(B, *grid, C)`` (the blocks inside MONAI
``SwinUNETR``'s stages). A :class:`Layout` says how to read such an output; it is applied to the
layer's activation and, identically, to its gradient (the map is taken where the tokens are, the
class token is dropped), as pytorch-grad-cam's ``reshape_transform`` does.

Where the layout comes from, in order:

1. ``reshape=`` given by the user: a callable ``t (B, ...) -> (B, C, *grid)`` (pytorch-grad-cam's
   ``reshape_transform`` works as is), one of the built-ins below, or ``None`` to take the
   output as it is;
2. the grid the model tells: ``patch_size`` / ``feat_size`` attributes (MONAI ``UNETR``,
   ``SwinUNETR``, ``PatchEmbed``), the stride of a MONAI ``PatchEmbeddingBlock``'s convolution
   (``ViT``); hierarchical models (Swin) halve that grid per stage;
3. for tokens only, the token count: ``N`` (or ``N - 1`` with a class token) equal to the number
   of patches of one uniform patch size that divides the input.

A layer whose layout cannot be told is refused with a message asking for ``reshape=``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medcam.errors import LayerError

__all__ = ["Layout", "channels_last", "model_grids", "tokens"]

Kind = Literal["channels_first", "channels_last", "tokens", "callable"]

# MONAI modules whose output is channel-last whatever its shape (Swin blocks and patch merging)
_CHANNELS_LAST_TYPES = {"SwinTransformerBlock", "PatchMerging", "PatchMergingV2"}
_MAX_PREFIX_TOKENS = 8  # class, distillation and register tokens in front of the patch tokens


@dataclass(frozen=True)
class Layout:
    """How to read one layer's tensor as a ``(B, C, *grid)`` feature map.

    Attributes
    ----------
    kind:
        ``"channels_first"`` ``(B, C, *grid)``, ``"channels_last"`` ``(B, *grid, C)``,
        ``"tokens"`` ``(B, N, C)`` (or ``(B, C, N)`` with ``token_dim=2``), or ``"callable"``.
    grid:
        The feature grid; ``None`` for a callable (known only once it has run).
    prefix_tokens:
        Tokens before the patch tokens (a class token: 1); dropped from the map.
    token_dim:
        The token axis of a token tensor (1 for ``(B, N, C)``, 2 for ``(B, C, N)``).
    source:
        How the layout was determined (recorded in the result's metadata).
    fn:
        The user's callable for ``kind="callable"``.
    """

    kind: Kind
    grid: tuple[int, ...] | None
    prefix_tokens: int = 0
    token_dim: int = 1
    source: str = ""
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def to_channels_first(self, t: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """``t`` with ``lead`` leading batch dims, e.g. ``(B, N, C)`` -> ``(B, C, *grid)``.

        With ``lead=2`` (gradients ``(B, K, ...)``) the two leading dims are kept.
        """
        if self.kind == "channels_first":
            return t
        front = t.shape[:lead]
        flat = t.reshape(-1, *t.shape[lead:])
        if self.kind == "callable":
            assert self.fn is not None
            out = self.fn(flat)
            if not isinstance(out, torch.Tensor):
                raise LayerError(
                    f"reshape= returned a {type(out).__name__}; it must return a tensor "
                    "(B, C, *grid)."
                )
        elif self.kind == "channels_last":
            out = flat.movedim(-1, 1)
        else:
            assert self.grid is not None
            if self.token_dim == 2:
                flat = flat.transpose(1, 2)
            patches = flat[:, self.prefix_tokens :, :]
            out = patches.reshape(flat.shape[0], *self.grid, flat.shape[-1]).movedim(-1, 1)
        return out.reshape(*front, *out.shape[1:])

    def zero_channels(self, t: torch.Tensor, rows: torch.Tensor, channels: torch.Tensor) -> None:
        """Set channel ``channels[i]`` of sample ``rows[i]`` of the raw tensor ``t`` to zero,
        in place, over the map's grid (prefix tokens are left alone)."""
        if self.kind == "channels_first":
            t[rows, channels] = 0
        elif self.kind == "channels_last":
            t[rows, ..., channels] = 0
        elif self.kind == "tokens":
            for r, c in zip(rows.tolist(), channels.tolist(), strict=True):
                if self.token_dim == 1:
                    t[r, self.prefix_tokens :, c] = 0
                else:
                    t[r, c, self.prefix_tokens :] = 0
        else:
            raise LayerError(
                "Ablation-CAM needs to know the channel axis of the layer's raw output, which a "
                "reshape= callable does not tell. Use a built-in layout (medcam.engine.tokens, "
                "medcam.engine.channels_last) or method='scorecam'."
            )

    def describe(self) -> str:
        if self.kind == "channels_first":
            return "channels first"
        if self.kind == "callable":
            return f"reshape={getattr(self.fn, '__name__', type(self.fn).__name__)}"
        grid = "x".join(map(str, self.grid or ()))
        if self.kind == "channels_last":
            return f"channels last, grid {grid}"
        prefix = f" after {self.prefix_tokens} prefix token(s)" if self.prefix_tokens else ""
        order = "(B, N, C)" if self.token_dim == 1 else "(B, C, N)"
        return f"tokens {order}, grid {grid}{prefix}"

    def record(self) -> dict[str, object]:
        """JSON-able description for the result's metadata."""
        out: dict[str, object] = {"layout": self.kind, "source": self.source}
        if self.grid is not None:
            out["grid"] = list(self.grid)
        if self.kind == "tokens":
            out["prefix_tokens"] = self.prefix_tokens
        if self.kind == "callable":
            out["reshape"] = getattr(self.fn, "__name__", type(self.fn).__name__)
        return out


CHANNELS_FIRST = Layout("channels_first", None, source="default")

ReshapeSpec = (
    Layout | Callable[[torch.Tensor], torch.Tensor] | Literal["auto"] | None
)  # one layer's reshape=


def tokens(grid: Sequence[int], prefix_tokens: int = 0, *, channels_first: bool = False) -> Layout:
    """Built-in reshape for token layers ``(B, N, C)`` on a patch ``grid``.

    Parameters
    ----------
    grid:
        The patch grid, e.g. ``(img_size[i] // patch_size[i])``; ``N = prod(grid) +
        prefix_tokens``.
    prefix_tokens:
        Tokens in front of the patch tokens: 1 for a class token (MONAI ``ViT`` with
        ``classification=True``), 0 without (``UNETR``).
    channels_first:
        The tensor is ``(B, C, N)`` instead of ``(B, N, C)``.
    """
    return Layout(
        "tokens",
        tuple(int(g) for g in grid),
        int(prefix_tokens),
        2 if channels_first else 1,
        source="reshape=tokens(...)",
    )


def channels_last() -> Layout:
    """Built-in reshape for channel-last maps ``(B, *grid, C)`` (Swin blocks)."""
    return Layout("channels_last", None, source="reshape=channels_last()")


def _tuple(v: object, rank: int) -> tuple[int, ...] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * rank
    if isinstance(v, (tuple, list)) and len(v) == rank and all(isinstance(i, int) for i in v):
        return tuple(v)
    if isinstance(v, torch.Size) and len(v) == rank:
        return tuple(v)
    return None


def model_grids(model: nn.Module, spatial: Sequence[int]) -> list[tuple[tuple[int, ...], str]]:
    """The feature grids the model declares for an input of spatial size ``spatial``.

    Returns ``(grid, source)`` pairs, the patch grid first, then (for hierarchical models) each
    stage's grid, halved per stage (rounded up, as Swin's padding does).
    """
    rank = len(spatial)
    found: list[tuple[tuple[int, ...], str]] = []

    def add(grid: tuple[int, ...], source: str) -> None:
        if all(g >= 1 for g in grid) and grid not in [g for g, _ in found]:
            found.append((grid, source))

    hierarchical = False
    for name, m in model.named_modules():
        label = name or type(model).__name__
        kind = type(m).__name__
        if "Swin" in kind:
            hierarchical = True
        feat = _tuple(getattr(m, "feat_size", None), rank)
        if feat is not None:
            add(feat, f"{label}.feat_size")
        patch = _tuple(getattr(m, "patch_size", None), rank)
        if patch is not None and all(p > 0 for p in patch):
            add(tuple(math.ceil(s / p) for s, p in zip(spatial, patch, strict=True)),
                f"{label}.patch_size {patch}")  # fmt: skip
        if kind == "PatchEmbeddingBlock":
            conv = getattr(m, "patch_embeddings", None)
            stride = _tuple(getattr(conv, "stride", None), rank)
            if stride is not None:
                add(tuple(s // p for s, p in zip(spatial, stride, strict=True)),
                    f"{label}.patch_embeddings stride {stride}")  # fmt: skip
    if hierarchical and found:
        base, source = found[0]
        for level in range(1, 6):
            grid = tuple(math.ceil(g / 2**level) for g in base)
            add(grid, f"{source}, stage {level} (halved {level}x)")
    return found


def _token_layout(
    shape: tuple[int, ...], spatial: Sequence[int], hints: list[tuple[tuple[int, ...], str]]
) -> Layout | None:
    """``(B, N, C)`` or ``(B, C, N)`` tokens on a model-declared or inferred grid."""
    for token_dim in (1, 2):
        n = shape[token_dim]
        for grid, source in hints:
            extra = n - math.prod(grid)
            if 0 <= extra <= _MAX_PREFIX_TOKENS:
                return Layout("tokens", grid, extra, token_dim, source=source)
    rank = len(spatial)
    for token_dim in (1,):  # inferred grids: (B, N, C) only, the common order
        n = shape[token_dim]
        for extra in (0, 1):
            for p in range(1, min(spatial) + 1):
                if all(s % p == 0 for s in spatial):
                    grid = tuple(s // p for s in spatial)
                    if math.prod(grid) == n - extra and (rank > 1 or p > 1):
                        return Layout(
                            "tokens", grid, extra, token_dim,
                            source=f"token count (uniform patch {p})",
                        )  # fmt: skip
    return None


def detect_layout(
    module: nn.Module | None,
    shape: tuple[int, ...],
    spatial: Sequence[int],
    hints: list[tuple[tuple[int, ...], str]],
) -> Layout | None:
    """The layout of a tensor of ``shape`` from ``module``, or ``None`` when it is no map.

    ``spatial`` is the model input's spatial size and ``hints`` :func:`model_grids`' answer.
    """
    rank = len(spatial)
    grids = [g for g, _ in hints]
    if len(shape) == 2 + rank:
        first, last = tuple(shape[2:]), tuple(shape[1:-1])
        kind = type(module).__name__ if module is not None else ""
        if kind in _CHANNELS_LAST_TYPES or (last in grids and first not in grids):
            source = f"{kind} output" if kind in _CHANNELS_LAST_TYPES else "model grid"
            for g, s in hints:
                if g == last and kind not in _CHANNELS_LAST_TYPES:
                    source = s
            return Layout("channels_last", last, source=source)
        return Layout("channels_first", first, source="default")
    if len(shape) == 3 and rank >= 2:
        return _token_layout(shape, spatial, hints)
    return None


def resolve_layout(
    spec: ReshapeSpec,
    module: nn.Module | None,
    t: torch.Tensor,
    spatial: Sequence[int],
    hints: list[tuple[tuple[int, ...], str]],
    name: str,
) -> Layout:
    """The layout of layer ``name``'s tensor ``t`` under the user's ``reshape=`` ``spec``."""
    if spec is None:
        return CHANNELS_FIRST
    if isinstance(spec, Layout):
        if spec.kind == "channels_last" and spec.grid is None:
            return Layout("channels_last", tuple(t.shape[1:-1]), source=spec.source)
        return spec
    if callable(spec):
        return Layout("callable", None, source="reshape= callable", fn=spec)
    if spec != "auto":
        raise LayerError(
            f"reshape={spec!r} is not understood; give 'auto', None, a callable "
            "t -> (B, C, *grid), medcam.engine.tokens(grid, prefix_tokens) or "
            "medcam.engine.channels_last()."
        )
    layout = detect_layout(module, tuple(t.shape), spatial, hints)
    if layout is None and t.ndim != 3:
        return CHANNELS_FIRST  # no map at all: refused by the caller's extent check
    if layout is None:
        raise LayerError(
            f"Layer {name!r} outputs shape {tuple(t.shape)}, which is neither a feature map "
            f"(B, C, *spatial) with {len(spatial)} spatial dims nor tokens (B, N, C) on a grid "
            "the model declares or the token count gives. For a transformer, say how to read it: "
            "reshape=medcam.engine.tokens(grid, prefix_tokens=1) for patch tokens with a class "
            "token, or any callable t -> (B, C, *grid) (pytorch-grad-cam's reshape_transform "
            "works as is)."
        )
    return layout
