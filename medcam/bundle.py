"""MONAI bundles: load a bundle's network and preprocessing, and explain inside ``monai.bundle
run`` with an ignite handler.

Two ways in:

- ``load_bundle(dir)`` gives the eager network (``network_def`` + ``models/model.pt``) and the
  bundle's preprocessing, for :func:`medcam.explain_scan` and ``medcam explain --bundle``;
- :class:`CAMHandler`, attached to the bundle's evaluator by ``configs/medcam.json`` merged onto
  the bundle's inference config, computes heatmaps for every batch under ``torch.enable_grad()``
  (evaluators run without gradients), inverts the bundle's preprocessing and writes the chosen
  formats next to the predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medcam.errors import MedcamError, ModelError

__all__ = ["Bundle", "CAMHandler", "DictPreprocess", "load_bundle"]

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# Transforms that read files or add the channel axis: load_scan has done both already.
_LOADING = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd")


class DictPreprocess:
    """A bundle's dictionary preprocessing used on one image, forwards and backwards.

    ``__call__(image)`` runs the transforms on ``{key: image}``; ``inverse(maps)`` undoes them on
    ``{key: maps}`` (MONAI records the geometry on the MetaTensor itself). File loading and
    channel-first transforms are left out: :func:`medcam.load_scan` does both.
    """

    def __init__(self, compose: Any, key: str = "image") -> None:
        from monai.transforms import Compose

        kept = [
            t for t in getattr(compose, "transforms", [compose]) if type(t).__name__ not in _LOADING
        ]
        self.compose = Compose(kept)
        self.key = key
        self.transforms = kept

    def __call__(self, image: Any) -> Any:
        return self.compose({self.key: image})[self.key]

    def inverse(self, maps: Any) -> Any:
        return self.compose.inverse({self.key: maps})[self.key]


@dataclass
class Bundle:
    """What medcam takes from a bundle."""

    root: Path
    network: torch.nn.Module
    preprocess: DictPreprocess | None
    metadata: dict = field(default_factory=dict)

    def input_shape(self) -> tuple[int, ...] | None:
        """(C, *spatial) of the network input from metadata.json, when it says."""
        try:
            image = self.metadata["network_data_format"]["inputs"]["image"]
            shape = [int(s) for s in image["spatial_shape"]]
            return (int(image.get("num_channels", 1)), *shape)
        except (KeyError, TypeError, ValueError):
            return None


def _config_file(root: Path) -> Path:
    for name in CONFIG_NAMES:
        if (root / "configs" / name).exists():
            return root / "configs" / name
    raise MedcamError(
        f"{root} has no configs/inference.json (or .yaml); point --bundle at a MONAI bundle "
        "folder (the one holding configs/ and models/)."
    )


def _state_dict(obj: Any) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "network"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def load_bundle(root: str | Path, device: str | torch.device = "cpu", image_key: str = "image"):
    """Load a MONAI bundle's eager network (with weights, eval mode) and its preprocessing.

    Raises
    ------
    ModelError
        When the bundle ships only TorchScript (``models/model.ts``): hooks cannot be placed in
        a TorchScript module, so medcam needs ``network_def`` + ``models/model.pt``.
    """
    import json

    from monai.bundle import ConfigParser

    root = Path(root)
    parser = ConfigParser()
    parser.read_config(str(_config_file(root)))
    meta_file = root / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    parser["bundle_root"] = str(root)
    weights = root / "models" / "model.pt"
    if not weights.exists():
        if (root / "models" / "model.ts").exists():
            raise ModelError(
                f"{root} ships only a TorchScript model (models/model.ts). TorchScript modules "
                "cannot be hooked, so their activations and gradients are out of reach. medcam "
                "needs the eager network: the bundle's network_def plus the state dict "
                "models/model.pt (bundles from the MONAI model zoo provide both; export one with "
                "torch.save(network.state_dict(), 'models/model.pt'))."
            )
        raise ModelError(f"{root} has no models/model.pt with the network's weights.")
    if "network_def" not in parser.config:
        raise ModelError(f"{root}'s inference config has no 'network_def' to build the network.")
    network = parser.get_parsed_content("network_def", instantiate=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    network.load_state_dict(_state_dict(state))
    network = network.to(device).eval()
    preprocess = None
    if "preprocessing" in parser.config:
        preprocess = DictPreprocess(parser.get_parsed_content("preprocessing"), image_key)
    return Bundle(root, network, preprocess, metadata)


class CAMHandler:
    """Ignite handler computing heatmaps for each evaluator batch and writing them.

    Attach with ``"+initialize": ["$@medcam.attach(@evaluator)"]`` (see ``configs/medcam.json``)
    or append to the evaluator's handler list. It takes the network from the engine, runs under
    ``torch.enable_grad()``, inverts ``preprocessing`` per sample so the maps land on each
    input's own grid, and writes ``formats`` for each input file.

    Parameters
    ----------
    output_dir:
        Folder for the outputs (created).
    preprocessing:
        The bundle's (dictionary) preprocessing, to invert; default: the evaluator's dataset
        transform.
    layers, method, target, normalize, fusion:
        As in :func:`medcam.explain`; ``target`` may be an int, ``"pred"``, ``"all"``.
    formats:
        Output formats (see :func:`medcam.write_outputs`); DICOM formats need DICOM inputs.
    image_key:
        The batch key holding the image.
    name_from_input:
        Name outputs after the input file (sanitised) instead of ``case-<input hash>``; input
        names may carry patient identifiers, hence off by default.
    """

    def __init__(
        self,
        output_dir: str | Path,
        preprocessing: Any = None,
        layers: Any = "auto",
        method: str = "auto",
        target: Any = "pred",
        formats: Sequence[str] = ("nifti", "json"),
        image_key: str = "image",
        normalize: str = "none",
        fusion: str | None = None,
        name_from_input: bool = False,
    ) -> None:
        self.name_from_input = name_from_input
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing
        self.layers = layers
        self.method = method
        self.target = target
        self.formats = list(formats)
        self.image_key = image_key
        self.normalize = normalize
        self.fusion = fusion
        self.written: list[Path] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        from monai.data import MetaTensor, decollate_batch

        from medcam.engine.core import Explainer
        from medcam.io.output import safe_name
        from medcam.io.scan import load_scan
        from medcam.space import on_source
        from medcam.writers.outputs import write_outputs

        network = engine.network
        preprocess = self.preprocessing
        if preprocess is None:
            preprocess = getattr(engine.data_loader.dataset, "transform", None)
        if preprocess is not None and not isinstance(preprocess, DictPreprocess):
            preprocess = DictPreprocess(preprocess, self.image_key)
        batch = engine.state.batch
        # MONAI evaluators decollate the batch into a list of samples after postprocessing
        items = batch if isinstance(batch, list) else decollate_batch(batch)
        images = torch.stack([torch.as_tensor(item[self.image_key]) for item in items])
        explainer = Explainer(network, self.layers, self.method, fusion=self.fusion)
        with torch.enable_grad():  # the evaluator runs under no_grad
            cam = explainer(images, self.target)
        for i, item in enumerate(items):
            image = item[self.image_key]
            if not isinstance(image, MetaTensor):
                raise MedcamError("The evaluator batch has no MetaTensor image; cannot invert.")
            source = image.meta.get("filename_or_obj")
            if not source:
                raise MedcamError("The image has no filename_or_obj; medcam needs the input file.")
            ex = on_source(load_scan(source), cam.sample(i), image, preprocess, self.normalize)
            case = safe_name(Path(str(source)).name.split(".")[0]) if self.name_from_input else None
            written = write_outputs(ex, self.output_dir, self.formats, model=network, case=case)
            for paths in written.values():
                self.written.extend(paths)
