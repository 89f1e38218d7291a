"""MONAI bundles: load a bundle's network, preprocessing and inferer, and explain inside
``monai.bundle run`` with an ignite handler.

Two ways in:

- ``load_bundle(dir)`` gives the eager network (``network_def`` + ``models/model.pt``, the
  bundle's ``scripts/`` importable), its preprocessing without file loading, its inferer (a
  sliding window is followed by the heatmap) and what input the network takes, for
  :func:`medcam.explain_scan` and ``medcam explain --bundle``;
- :class:`CAMHandler`, attached to the bundle's evaluator by ``configs/medcam.json`` merged onto
  the bundle's inference config, explains every batch after the evaluator's forward pass, the
  way its inferer ran (for a target on the bundle's own stitched prediction), inverts the
  bundle's preprocessing and writes the chosen formats next to the bundle's outputs; the bundle
  runs as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medcam.errors import MedcamError, ModelError, TrustError

__all__ = [
    "TRUST_ENV",
    "Bundle",
    "CAMHandler",
    "DictPreprocess",
    "bundle_imports",
    "check_trusted",
    "load_bundle",
]

# Folders (separated like PATH: ':' on Linux/macOS, ';' on Windows) bundles may be loaded from.
TRUST_ENV = "MEDCAM_TRUSTED_BUNDLES"
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
    """What medcam takes from a bundle.

    Attributes
    ----------
    root:
        The bundle folder.
    network:
        The eager network with the bundle's weights, in eval mode.
    preprocess:
        The bundle's ``preprocessing`` without file loading (see :class:`DictPreprocess`).
    metadata:
        ``configs/metadata.json``.
    inferer:
        The bundle's inferer as medcam follows it: a
        :class:`~medcam.engine.sliding.SlidingWindow` for a ``SlidingWindowInferer``, ``None``
        for a ``SimpleInferer`` or no inferer.
    expect:
        What the network takes (spatial rank, channels), from ``network_def`` and metadata.
    """

    root: Path
    network: torch.nn.Module
    preprocess: DictPreprocess | None
    metadata: dict = field(default_factory=dict)
    inferer: Any = None
    expect: Any = None

    def input_shape(self) -> tuple[int, ...] | None:
        """(C, *spatial) of the network input from metadata.json (else the window size)."""
        try:
            image = self.metadata["network_data_format"]["inputs"]["image"]
            shape = [int(s) for s in image["spatial_shape"]]
            return (int(image.get("num_channels", 1)), *shape)
        except (KeyError, TypeError, ValueError):
            pass
        if self.inferer is not None and all(r > 0 for r in self.inferer.roi_size):
            channels = self.expect.channels if self.expect and self.expect.channels else 1
            return (channels, *self.inferer.roi_size)
        return None


def _trusted_folders(trusted: str | Sequence[str | Path] | None) -> list[Path]:
    if trusted is None:
        trusted = os.environ.get(TRUST_ENV, "")
    if isinstance(trusted, (str, Path)):
        trusted = [p for p in str(trusted).split(os.pathsep)]
    return [Path(p).expanduser().resolve() for p in trusted if str(p).strip()]


def check_trusted(root: str | Path, trusted: str | Sequence[str | Path] | None = None) -> None:
    """Refuse a bundle outside the trusted folders, before anything of it is read.

    A bundle is code: its config's ``$`` expressions are Python that MONAI evaluates, and its
    ``scripts/`` package is imported. ``trusted`` (default: the ``MEDCAM_TRUSTED_BUNDLES``
    environment variable, folders separated by ``os.pathsep``) lists the folders bundles may
    be loaded from; unset or empty, any bundle is loaded (as in MONAI). Symbolic links are
    resolved first, so a link inside a trusted folder to a bundle outside it is refused.

    Raises
    ------
    TrustError
        The bundle folder is not inside one of the trusted folders.
    """
    folders = _trusted_folders(trusted)
    if not folders:
        return
    real = Path(root).expanduser().resolve()
    if any(real == f or f in real.parents for f in folders):
        return
    source = "--trusted-bundles / " + TRUST_ENV if trusted is None else "the trusted folders"
    raise TrustError(
        f"Refused to load the bundle {root}"
        + (f" (resolves to {real})" if str(real) != str(Path(root)) else "")
        + f": it is outside the folders bundles may be loaded from ({source}: "
        + f"{os.pathsep.join(map(str, folders))}). A bundle's config runs Python code, so "
        "medcam does not run it. Review the bundle, then copy it into a trusted folder or add "
        f"its folder to {TRUST_ENV}."
    )


def _config_file(root: Path) -> Path:
    for name in CONFIG_NAMES:
        if (root / "configs" / name).exists():
            return root / "configs" / name
    raise MedcamError(
        f"{root} has no configs/inference.json (or .yaml); point --bundle at a MONAI bundle "
        "folder (the one holding configs/ and models/)."
    )


@contextlib.contextmanager
def bundle_imports(root: Path) -> Iterator[None]:
    """Import the bundle's own code as MONAI's runner does: the bundle root on ``sys.path``
    (so ``$scripts.net.Net`` in a config resolves), and no ``scripts`` package of another
    bundle left in ``sys.modules`` to shadow this one's."""
    root_str = str(Path(root).resolve())
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if not str(Path(module_file).resolve()).startswith(root_str + os.sep):
            del sys.modules[name]
    added = root_str not in sys.path
    if added:
        sys.path.insert(1, root_str)
    try:
        yield
    finally:
        if added and root_str in sys.path:
            sys.path.remove(root_str)


def _parsed(parser: Any, key: str) -> Any:
    try:
        return parser.get_parsed_content(key) if key in parser else None
    except Exception:
        return None


def _input_spec(parser: Any, metadata: dict) -> Any:
    from medcam.engine.inferer import InputSpec

    dims = _parsed(parser, "network_def#spatial_dims")
    channels = _parsed(parser, "network_def#in_channels")
    spec = InputSpec(
        int(dims) if isinstance(dims, int) else None,
        int(channels) if isinstance(channels, int) else None,
        "the bundle's network_def",
    )
    try:
        image = metadata["network_data_format"]["inputs"]["image"]
        meta = InputSpec(
            len(image["spatial_shape"]) if image.get("spatial_shape") else None,
            int(image["num_channels"]) if "num_channels" in image else None,
            "the bundle's metadata.json",
        )
    except (KeyError, TypeError, ValueError):
        meta = InputSpec()
    spec = spec.merged(meta)
    return spec if (spec.spatial_dims, spec.channels) != (None, None) else None


def _build_network(parser: Any, root: Path) -> torch.nn.Module:
    try:
        return parser.get_parsed_content("network_def", instantiate=True)
    except Exception as err:
        text = str(err)
        hint = ""
        if "unexpected keyword argument" in text:
            hint = (
                " The bundle was written for another MONAI version: a keyword it passes no "
                "longer exists (e.g. SwinUNETR's img_size, removed in MONAI 1.5); delete it "
                "from network_def in configs/inference.json."
            )
        elif isinstance(err, (ImportError, ModuleNotFoundError)) or "scripts" in text:
            hint = (" The network's code could not be imported: check the bundle's scripts/ "
                    "package and the packages its metadata.json lists.")  # fmt: skip
        raise ModelError(
            f"Cannot build the network of bundle {root} from its network_def: "
            f"{type(err).__name__}: {text.splitlines()[0] if text else ''}.{hint}"
        ) from err


def _preprocessing(parser: Any, root: Path) -> Any:
    """The bundle's ``preprocessing`` without building its file-loading transforms (medcam
    reads the scan itself: a ``LoadImaged(reader="ITKReader")`` must not need ``itk``)."""
    from monai.transforms import Compose

    config = parser.get("preprocessing")
    try:
        items = config.get("transforms") if isinstance(config, dict) else None
        if isinstance(items, list) and str(config.get("_target_", "")).endswith("Compose"):
            kept = [
                i for i, t in enumerate(items)
                if not (isinstance(t, dict) and str(t.get("_target_", "")).split(".")[-1]
                        in _LOADING)
            ]  # fmt: skip
            return Compose([parser.get_parsed_content(f"preprocessing#transforms#{i}")
                            for i in kept])  # fmt: skip
        return parser.get_parsed_content("preprocessing")
    except Exception as err:
        raise MedcamError(
            f"Cannot build the preprocessing of bundle {root}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. Give --preprocess "
            "package.module:factory to use your own."
        ) from err


def load_bundle(
    root: str | Path,
    device: str | torch.device = "cpu",
    image_key: str = "image",
    trusted: str | Sequence[str | Path] | None = None,
):
    """Load a MONAI bundle's eager network (with weights, eval mode), its preprocessing, its
    inferer and what input its network takes.

    The bundle's ``scripts/`` package is importable while the network is built, as under
    ``python -m monai.bundle run``. Loading a bundle runs its code (the ``$`` expressions of its
    config, its ``scripts/``): load only bundles you trust. ``trusted`` (default: the
    ``MEDCAM_TRUSTED_BUNDLES`` environment variable) restricts the folders bundles are loaded
    from (see :func:`check_trusted`). The weights are read as data only (see
    :func:`medcam.weights.load_weights`).

    Raises
    ------
    TrustError
        The bundle is outside the trusted folders (checked before anything of it is read).
    ModelError
        When the bundle ships only TorchScript (``models/model.ts``): hooks cannot be placed in
        a TorchScript module, so medcam needs ``network_def`` + ``models/model.pt``; when the
        network cannot be built, or its weights are refused, unreadable or do not fit it.
    """
    import json

    from monai.bundle import ConfigParser

    from medcam.engine.sliding import SlidingWindow
    from medcam.weights import load_weights

    check_trusted(root, trusted)
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
    with bundle_imports(root):
        network = _build_network(parser, root)
        load_weights(network, weights, f"the network_def of bundle {root}")
        network = network.to(device).eval()
        preprocess = None
        if "preprocessing" in parser.config:
            preprocess = DictPreprocess(_preprocessing(parser, root), image_key)
        inferer = None
        if "inferer" in parser.config:
            try:
                inferer = SlidingWindow.from_inferer(parser.get_parsed_content("inferer"))
            except MedcamError:
                inferer = None  # an inferer medcam cannot follow: the whole volume, padded
    return Bundle(root, network, preprocess, metadata, inferer, _input_spec(parser, metadata))


def _bundle_output_dir() -> str | None:
    """The running bundle's ``output_dir`` (command-line overrides applied), when it has one.

    ``configs/medcam.json`` cannot name ``@output_dir``: MONAI refuses a reference to a key a
    bundle lacks (``classification_template`` has none). ``attach`` runs inside the bundle's
    ``initialize``, evaluated by its ``ConfigParser``, which is found on the call stack.
    """
    from monai.bundle import ConfigParser

    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        parser = owner if isinstance(owner, ConfigParser) else getattr(owner, "parser", None)
        if isinstance(parser, ConfigParser):
            if "output_dir" not in parser:
                return None
            try:
                value = parser.get_parsed_content("output_dir")
            except Exception:
                return None
            return str(value) if isinstance(value, (str, Path)) else None
        frame = frame.f_back
    return None


def _image_saver_folder(engine: Any) -> str | None:
    """The output folder of the first ``SaveImage(d)`` in the engine's postprocessing.

    MONAI workflows register their postprocessing as an ignite handler closing over the
    transform chain (``Workflow._register_postprocessing``); the chain is found there.
    """
    from monai.transforms import Compose, SaveImage, SaveImaged

    def transforms(obj: Any, depth: int = 0):
        if depth > 4:
            return
        if isinstance(obj, (SaveImage, SaveImaged)):
            yield obj
        elif isinstance(obj, Compose):
            for t in obj.transforms:
                yield from transforms(t, depth + 1)

    for handlers in getattr(engine, "_event_handlers", {}).values():
        for func, _, _ in handlers:
            for cell in getattr(func, "__closure__", None) or ():
                try:
                    content = cell.cell_contents
                except ValueError:
                    continue
                for saver in transforms(content):
                    inner = saver.saver if isinstance(saver, SaveImaged) else saver
                    layout = getattr(inner, "folder_layout", None)
                    folder = getattr(layout, "output_dir", None)
                    if folder:
                        return str(folder)
    return None


def _check_checkpoints(engine: Any) -> None:
    """Check the weights each ``CheckpointLoader`` of the engine will load, before the run.

    MONAI's loader reads them with ``weights_only=True`` too, but only when the run starts, and
    a mismatch surfaces as a raw ``load_state_dict`` error; here a refused pickle, an
    unreadable file or weights that do not fit are a :class:`ModelError` naming the file and
    the keys, before any case. Loaders set to ``strict=False`` or ``strict_shape=False`` are
    left to MONAI (they load what fits on purpose).
    """
    from collections.abc import Mapping

    from monai.handlers import CheckpointLoader

    from medcam.weights import as_state_dict, check_fits, read_checkpoint

    for handlers in getattr(engine, "_event_handlers", {}).values():
        for func, _, _ in handlers:
            if not isinstance(func, CheckpointLoader) or len(func.load_dict) != 1:
                continue
            if not (getattr(func, "strict", True) and getattr(func, "strict_shape", True)):
                continue
            ((key, network),) = func.load_dict.items()
            if not isinstance(network, torch.nn.Module):
                continue
            path = func.load_path
            checkpoint = read_checkpoint(path)
            # as CheckpointLoader: a file without the load_dict key is that one object
            if isinstance(checkpoint, Mapping) and key in checkpoint:
                checkpoint = checkpoint[key]
            state = as_state_dict(checkpoint, path, unwrap=False)
            if isinstance(
                network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
            ):
                network = network.module
            check_fits(network, state, path,
                       f"the bundle's network ({type(network).__name__})")  # fmt: skip


class CAMHandler:
    """Ignite handler computing heatmaps for each evaluator batch and writing them.

    Attach with ``"+initialize": ["$@medcam.attach(@evaluator)"]`` (see ``configs/medcam.json``)
    or append to the evaluator's handler list. After the evaluator's forward pass it takes the
    network, the preprocessed batch and the bundle's own prediction from the engine, explains
    each sample the way the evaluator's inferer ran it (window by window for a
    ``SlidingWindowInferer``, for a target on the bundle's stitched prediction; see
    :mod:`medcam.engine.sliding`), inverts ``preprocessing`` so the maps land on each input's
    own grid, and writes ``formats`` for each input file. The bundle's own outputs are not
    touched: its postprocessing runs after the handler, as before.

    Parameters
    ----------
    output_dir:
        Folder for the outputs (created). ``None`` (``configs/medcam.json``): beside the
        bundle's own outputs, ``<output_dir>/medcam`` with the bundle's ``output_dir``; for a
        bundle without that key, ``<folder of its SaveImage(d)>/medcam``, else
        ``<bundle_root>/eval/medcam`` (MONAI's default output folder).
    bundle_root:
        The bundle folder, for that last default.
    preprocessing:
        The bundle's (dictionary) preprocessing, to invert; default: the evaluator's dataset
        transform.
    layers, method, target, normalize, fusion:
        As in :func:`medcam.explain`; ``target`` may be an int, ``"pred"`` (for segmentation
        networks: the predicted foreground), ``"all"``, ``"seg:1"``.
    calibration:
        A file saved by ``medcam layers --calibrate ... --save``: its layers, method and fusion
        replace ``layers`` / ``method`` / ``fusion`` (which must then be left at their
        defaults), and its reason is recorded as ``layers_chosen_by``; one made for other
        weights is refused. Relative paths are taken from ``bundle_root``.
    formats:
        Output formats (see :func:`medcam.write_outputs`); DICOM formats need DICOM inputs.
    image_key:
        The batch key holding the image.
    name_from_input:
        Name outputs after the input file (sanitised) instead of ``case-<input hash>``; input
        names may carry patient identifiers, hence off by default.
    forward_kwargs, extra_keys:
        For networks that take more than the image: keyword arguments for ``network.forward``
        (passed as they are), and batch keys whose per-sample values are stacked and passed as
        further positional inputs after the image (see :class:`medcam.Explainer`).
    inferer:
        ``"bundle"`` (default): follow the evaluator's inferer; ``None``: the whole volume in one
        pass; or a MONAI inferer / :class:`~medcam.engine.sliding.SlidingWindow`.
    roi_size, sw_batch_size, overlap:
        Override those settings of the sliding window.
    on_error:
        ``"raise"`` (default) stops the bundle run on a case medcam cannot explain; ``"log"``
        logs the error and lets the bundle go on (the failed cases are in ``self.failed``).
    trusted:
        Folders bundles may run from (default: ``MEDCAM_TRUSTED_BUNDLES``); a ``bundle_root``
        outside them is refused when the handler is built, before the evaluator and its
        network are (see :func:`check_trusted` and docs/bundles.md for what MONAI has run by
        then).
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        preprocessing: Any = None,
        layers: Any = "auto",
        method: str = "auto",
        target: Any = "pred",
        formats: Sequence[str] = ("nifti", "json"),
        image_key: str = "image",
        normalize: str = "none",
        fusion: str | None = None,
        name_from_input: bool = False,
        forward_kwargs: dict[str, Any] | None = None,
        extra_keys: Sequence[str] = (),
        inferer: Any = "bundle",
        roi_size: Sequence[int] | None = None,
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        on_error: str = "raise",
        bundle_root: str | Path | None = None,
        trusted: str | Sequence[str | Path] | None = None,
        calibration: str | Path | None = None,
    ) -> None:
        from medcam.runner import parse_target
        from medcam.writers.registry import check_formats

        if bundle_root is not None:
            check_trusted(bundle_root, trusted)

        check_formats(formats)
        if on_error not in ("raise", "log"):
            raise MedcamError(f"on_error must be 'raise' or 'log', not {on_error!r}.")
        self.name_from_input = name_from_input
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.bundle_root = bundle_root
        self.preprocessing = preprocessing
        self.layers = layers
        self.method = method
        self.target = parse_target(target) if isinstance(target, str) else target
        self.formats = list(formats)
        self.image_key = image_key
        self.normalize = normalize
        self.fusion = fusion
        self.chosen_by: str | None = None
        self.calibration: Path | None = None
        if calibration is not None:
            from medcam.calibrate import load_calibration

            if layers != "auto" or method != "auto" or fusion is not None:
                raise MedcamError("Give calibration or layers / method / fusion, not both: the "
                                  "calibration names the layers, method and fusion.")  # fmt: skip
            path = Path(calibration)
            if not path.is_absolute() and bundle_root is not None:
                path = Path(bundle_root) / path
            c = load_calibration(path)
            self.layers, self.method, self.fusion = c["layers"], c["method"], c["fusion"]
            self.chosen_by, self.calibration = c["chosen_by"], path
        self.forward_kwargs = forward_kwargs
        self.extra_keys = list(extra_keys)
        self.inferer = inferer
        self.window_overrides = {"roi_size": roi_size, "sw_batch_size": sw_batch_size,
                                 "overlap": overlap}  # fmt: skip
        self.on_error = on_error
        self.written: list[Path] = []
        self.failed: list[dict[str, str]] = []
        self._explainer: Any = None

    def add_bundle_to_path(self) -> None:
        """Put the bundle root on ``sys.path`` now, as MONAI's runner does only when the run
        starts: ``configs/medcam.json`` builds the evaluator (and so the network) during
        ``initialize``, and a network defined in the bundle's ``scripts/`` must import then.
        (Named without "import": MONAI parses any ``$`` expression containing that word as
        Python source, and ``@medcam...`` is not.)"""
        if self.bundle_root is None:
            return
        root = str(Path(self.bundle_root).resolve())
        if Path(root).is_dir() and root not in sys.path:
            sys.path.insert(1, root)

    def attach(self, engine: Any) -> None:
        """Run after the engine's forward pass (MONAI's ``FORWARD_COMPLETED``, before its
        postprocessing), else after each iteration for plain ignite engines."""
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        _check_checkpoints(engine)
        if self.output_dir is None:
            found = _bundle_output_dir() or _image_saver_folder(engine)
            root = Path(self.bundle_root or ".")
            self.output_dir = (Path(found) if found else root / "eval") / "medcam"
        try:
            engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)
        except (ValueError, KeyError, AttributeError):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _window(self, engine: Any) -> Any:
        from dataclasses import replace

        from medcam.engine.sliding import SlidingWindow

        inferer = getattr(engine, "inferer", None) if self.inferer == "bundle" else self.inferer
        try:
            window = SlidingWindow.from_inferer(inferer)
        except MedcamError:
            window = None  # not followed window by window: the whole volume, padded
        o = self.window_overrides
        if o["roi_size"] is not None:
            base = window or SlidingWindow(tuple(o["roi_size"]), mode="gaussian")
            window = replace(base, roi_size=tuple(int(r) for r in o["roi_size"]))
        if window is not None:
            if o["sw_batch_size"] is not None:
                window = replace(window, sw_batch_size=int(o["sw_batch_size"]))
            if o["overlap"] is not None:
                window = replace(window, overlap=float(o["overlap"]))
        return window

    def _samples(self, engine: Any):
        """(image MetaTensor, stitched prediction or None, [extra inputs]) per sample of the
        current batch; the extra inputs are the values of ``extra_keys``."""
        from monai.data import decollate_batch
        from monai.utils import CommonKeys

        batch, output = engine.state.batch, getattr(engine.state, "output", None)
        extras: list[list[Any]] = []
        if isinstance(output, dict) and isinstance(output.get(CommonKeys.IMAGE), torch.Tensor):
            images = decollate_batch(output[CommonKeys.IMAGE], detach=True)
            pred = output.get(CommonKeys.PRED)
            source = output if all(k in output for k in self.extra_keys) else batch
            extras = [decollate_batch(source[k], detach=True) for k in self.extra_keys]
        elif isinstance(batch, dict):
            images = decollate_batch(batch[self.image_key], detach=True)
            pred = output.get(CommonKeys.PRED) if isinstance(output, dict) else None
            extras = [decollate_batch(batch[k], detach=True) for k in self.extra_keys]
        else:  # already decollated (a plain ignite engine, after postprocessing)
            items = batch if isinstance(batch, list) else decollate_batch(batch)
            images, pred = [item[self.image_key] for item in items], None
            extras = [[item[k] for item in items] for k in self.extra_keys]
        preds: list[Any] = [None] * len(images)
        if isinstance(pred, torch.Tensor) and pred.ndim >= 3 and pred.shape[0] == len(images):
            preds = [p[None] for p in torch.as_tensor(pred).detach()]
        per_sample = [[values[i] for values in extras] for i in range(len(images))]
        return list(zip(images, preds, per_sample, strict=True))

    def _explain_with_inputs(self, x: torch.Tensor, extra: list[Any], window: Any):
        """One whole-input pass with the network's other inputs (``extra_keys``) and
        ``forward_kwargs``; these cannot be split into sliding windows."""
        from medcam.engine.inferer import resolve_target

        if window is not None:
            raise MedcamError(
                "extra_keys / forward_kwargs need the whole volume in one forward pass, but this "
                "bundle infers in sliding windows; set the handler's inferer to None (e.g. "
                "--medcam#inferer null) to explain the whole volume."
            )
        inputs = [torch.as_tensor(e)[None] if isinstance(e, torch.Tensor) else e for e in extra]
        return self._explainer(
            (x, *inputs), resolve_target(self.target), forward_kwargs=self.forward_kwargs
        )

    def __call__(self, engine: Any) -> None:
        import logging

        from monai.data import MetaTensor

        from medcam.engine.core import Explainer
        from medcam.engine.inferer import explain_with_inferer
        from medcam.io.scan import load_scan
        from medcam.runner import name_from_path
        from medcam.space import on_source
        from medcam.writers.outputs import write_outputs
        from medcam.writers.registry import check_formats

        network = engine.network
        preprocess = self.preprocessing
        if preprocess is None:
            preprocess = getattr(engine.data_loader.dataset, "transform", None)
        if preprocess is not None and not isinstance(preprocess, DictPreprocess):
            preprocess = DictPreprocess(preprocess, self.image_key)
        if self._explainer is None or self._explainer.model is not network:
            if self.calibration is not None:  # made for these weights?
                from medcam.calibrate import load_calibration

                load_calibration(self.calibration, network)
            self._explainer = Explainer(network, self.layers, self.method, fusion=self.fusion,
                                        chosen_by=self.chosen_by)  # fmt: skip
        window = self._window(engine)
        for image, pred, extra in self._samples(engine):
            source = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
            try:
                if not isinstance(image, MetaTensor):
                    raise MedcamError("The evaluator batch has no MetaTensor image; cannot invert.")
                if not source:
                    raise MedcamError(
                        "The image has no filename_or_obj; medcam needs the input file."
                    )
                scan = load_scan(source)
                check_formats(self.formats, scan)  # before the model runs for this case
                x = image.as_tensor()[None].float()
                with torch.enable_grad():  # the evaluator runs under no_grad
                    if extra or self.forward_kwargs:
                        cam = self._explain_with_inputs(x, extra, window)
                    else:
                        cam = explain_with_inferer(
                            self._explainer, x, self.target, window, prediction=pred
                        )
                ex = on_source(scan, cam, image, preprocess, self.normalize)
                case = name_from_path(source) if self.name_from_input else None
                written = write_outputs(ex, self.output_dir, self.formats, model=network, case=case)
            except Exception as caught:
                err = caught
                if not isinstance(caught, MedcamError):
                    err = MedcamError(
                        f"Unexpected {type(caught).__name__} while explaining {source}: "
                        f"{caught}. This is a bug or a case medcam does not handle yet; the "
                        "original traceback is this error's cause: please report it."
                    )
                    err.__cause__ = caught
                if self.on_error == "raise":
                    if err is caught:
                        raise
                    raise err from caught
                logging.getLogger("medcam").error("medcam: no heatmap for %s: %s", source, err)
                self.failed.append({"input": str(source), "error": str(err)})
                continue
            for paths in written.values():
                self.written.extend(paths)
