"""The CAM engine: target layers, targets, methods, post-processing and the explainer."""

from medcam.engine.core import Explainer, explain
from medcam.engine.inputs import ModelInputs
from medcam.engine.layers import LayerInfo, list_layers
from medcam.engine.methods import METHODS, CAMMethod, MethodContext, get_method, register_method
from medcam.engine.perturbation import Perturbation
from medcam.engine.postprocess import fuse_maps, normalize_maps, upsample
from medcam.engine.reshape import Layout, channels_last, model_grids, tokens
from medcam.engine.result import CAMResult
from medcam.engine.sliding import explain_sliding_window
from medcam.engine.targets import (
    AllClasses,
    CallableTarget,
    ClassTarget,
    PredictedClass,
    SegmentationTarget,
    Target,
    as_target,
    select_output,
)

__all__ = [
    "METHODS",
    "AllClasses",
    "CAMMethod",
    "CAMResult",
    "CallableTarget",
    "ClassTarget",
    "Explainer",
    "LayerInfo",
    "Layout",
    "MethodContext",
    "ModelInputs",
    "Perturbation",
    "PredictedClass",
    "SegmentationTarget",
    "Target",
    "as_target",
    "channels_last",
    "explain",
    "explain_sliding_window",
    "fuse_maps",
    "get_method",
    "list_layers",
    "model_grids",
    "normalize_maps",
    "register_method",
    "select_output",
    "tokens",
    "upsample",
]
