"""CAM methods: each is one small function over (activations, gradients).

Shapes, for every method:

- ``a``: ``(B, C, *S)`` float32 activations of the target layer;
- ``g``: ``(B, K, C, *S)`` float32 gradients of each of the K target scores w.r.t. ``a``
  (``None`` for methods that need no gradients);
- returns ``(B, K, *S)`` float32 raw maps.

To add a method, write its function here and register it with :func:`register_method`.
Perturbation methods (Score-CAM, Ablation-CAM, in :mod:`medcam.engine.perturbation`) also get
``ctx.perturbation``, which runs the model on perturbed copies of the input.

Each gradient method agrees with pytorch-grad-cam's implementation of the same name, constants
included (``tests/engine/test_reference_agreement.py`` checks it against the installed library).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from medcam.errors import MedcamError

__all__ = ["METHODS", "CAMMethod", "MethodContext", "get_method", "register_method"]

# Denominator epsilons, as pytorch-grad-cam 1.5.7 has them (they differ per method):
GRADCAM_PP_EPS = 1e-6  # grad_cam_plusplus.py, alpha denominator (the paper has none)
XGRADCAM_EPS = 1e-7  # xgrad_cam.py, sum of activations


@dataclass(frozen=True)
class MethodContext:
    """What some methods need besides activations and gradients.

    Attributes
    ----------
    classes:
        ``(B, K)`` class index behind each target score (``-1`` for none).
    fc_weight:
        ``(num_classes, C)`` weight of the final linear layer (CAM only), else ``None``.
    perturbation:
        For perturbation methods, a :class:`medcam.engine.perturbation.Perturbation` that
        scores perturbed copies of the input (or of the layer's activation), else ``None``.
    """

    classes: torch.Tensor
    fc_weight: torch.Tensor | None = None
    perturbation: Any = None


MethodFn = Callable[[torch.Tensor, torch.Tensor | None, MethodContext], torch.Tensor]


@dataclass(frozen=True)
class CAMMethod:
    """A registered CAM method.

    Attributes
    ----------
    name:
        Canonical name (``"gradcam"``, ``"gradcam++"``, ...).
    fn:
        ``fn(a, g, ctx) -> (B, K, *S)`` raw map.
    needs_gradients:
        False for methods computed from activations and weights alone (CAM) or from forward
        passes (Score-CAM): no backward pass.
    reference:
        The paper the formula follows.
    perturbation:
        True for methods that run the model on perturbed inputs or activations (gradient-free).
    """

    name: str
    fn: MethodFn
    needs_gradients: bool
    reference: str
    perturbation: bool = False


METHODS: dict[str, CAMMethod] = {}


def _key(name: str) -> str:
    return (
        name.lower().replace("-", "").replace("_", "").replace("plusplus", "++").replace("pp", "++")
    )


def register_method(
    name: str, *, needs_gradients: bool = True, reference: str = "", perturbation: bool = False
) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn(a, g, ctx)`` as CAM method ``name``.

    ``perturbation=True`` (implies no gradients) gives the method ``ctx.perturbation``.
    """

    def wrap(fn: MethodFn) -> MethodFn:
        grads = needs_gradients and not perturbation
        METHODS[_key(name)] = CAMMethod(name, fn, grads, reference, perturbation)
        return fn

    return wrap


def get_method(name: str) -> CAMMethod:
    """Look up a method by name (case, ``-`` and ``_`` ignored; ``pp`` means ``++``)."""
    try:
        return METHODS[_key(name)]
    except KeyError:
        known = ", ".join(m.name for m in METHODS.values())
        raise MedcamError(f"Unknown CAM method {name!r}; choose one of: {known}.") from None


def _spatial(t: torch.Tensor, first: int) -> tuple[int, ...]:
    return tuple(range(first, t.ndim))


def _weighted_sum(weights: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_c weights[b, k, c] * a[b, c, *S] -> (B, K, *S)."""
    return torch.einsum("bkc,bc...->bk...", weights, a)


@register_method("gradcam", reference="Selvaraju et al., ICCV 2017, Eq. 1-2")
def grad_cam(a: torch.Tensor, g: torch.Tensor | None, ctx: MethodContext) -> torch.Tensor:
    """ReLU(sum_c mean_S(g_c) * a_c)."""
    assert g is not None
    return torch.relu(_weighted_sum(g.mean(dim=_spatial(g, 3)), a))


@register_method("gradcam++", reference="Chattopadhay et al., WACV 2018, Eq. 19 (exp. score)")
def grad_cam_pp(a: torch.Tensor, g: torch.Tensor | None, ctx: MethodContext) -> torch.Tensor:
    """Grad-CAM++ with alpha = g^2 / (2 g^2 + sum_S(a) g^3 + eps), weights sum_S(alpha * ReLU(g)).

    ``eps = 1e-6`` as in pytorch-grad-cam (the paper's Eq. 19 has none). It dominates the
    denominator where ``|g| < ~1e-3`` (raw logits of a small trained network), so such maps
    depend on it: use the same value as the library you compare with.
    """
    assert g is not None
    g2 = g * g
    sum_a = a.sum(dim=_spatial(a, 2)).reshape(a.shape[0], 1, a.shape[1], *([1] * (a.ndim - 2)))
    alpha = g2 / (2 * g2 + sum_a * g2 * g + GRADCAM_PP_EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * torch.relu(g)).sum(dim=_spatial(g, 3))
    return torch.relu(_weighted_sum(weights, a))


@register_method("xgradcam", reference="Fu et al., BMVC 2020, Eq. 13")
def xgrad_cam(a: torch.Tensor, g: torch.Tensor | None, ctx: MethodContext) -> torch.Tensor:
    """Weights sum_S(g * a) / sum_S(a), then ReLU of the weighted sum."""
    assert g is not None
    dims = _spatial(a, 2)
    sum_a = a.sum(dim=dims)[:, None]  # (B, 1, C)
    weights = (g * a.unsqueeze(1)).sum(dim=_spatial(g, 3)) / (sum_a + XGRADCAM_EPS)
    return torch.relu(_weighted_sum(weights, a))


@register_method("hirescam", reference="Draelos & Carin, 2020, HiResCAM")
def hires_cam(a: torch.Tensor, g: torch.Tensor | None, ctx: MethodContext) -> torch.Tensor:
    """ReLU(sum_c g_c * a_c), element-wise (no spatial averaging of the gradient)."""
    assert g is not None
    return torch.relu((g * a.unsqueeze(1)).sum(dim=2))


@register_method("layercam", reference="Jiang et al., IEEE TIP 2021, Eq. 4-5")
def layer_cam(a: torch.Tensor, g: torch.Tensor | None, ctx: MethodContext) -> torch.Tensor:
    """ReLU(sum_c ReLU(g_c) * a_c), element-wise."""
    assert g is not None
    return torch.relu((torch.relu(g) * a.unsqueeze(1)).sum(dim=2))


@register_method("cam", needs_gradients=False, reference="Zhou et al., CVPR 2016, Eq. 2")
def class_activation_map(
    a: torch.Tensor, g: torch.Tensor | None, ctx: MethodContext
) -> torch.Tensor:
    """sum_c W[class, c] * a_c with the final linear layer's weights (no bias, no ReLU).

    Valid for networks that end in global average pooling followed by one linear layer; the
    map is signed (negative where the region speaks against the class).
    """
    if ctx.fc_weight is None:
        raise MedcamError("CAM needs the final linear layer's weight; none was found.")
    if (ctx.classes < 0).any():
        raise MedcamError("CAM needs class-index targets ('pred', 'all' or ints), not callables.")
    w = ctx.fc_weight.float()[ctx.classes]  # (B, K, C)
    if w.shape[-1] != a.shape[1]:
        raise MedcamError(
            f"CAM: the final linear layer takes {w.shape[-1]} features but the target layer has "
            f"{a.shape[1]} channels. CAM needs the layer right before global pooling and the "
            "classifier; use method='gradcam' for other architectures."
        )
    return _weighted_sum(w, a)
