"""Explaining inputs from the command line: model specs, targets, case discovery, the loop.

The CLI (``medcam explain``) and cohort runs call these; they hold no logic of their own.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medcam.errors import InputError, MedcamError, ModelError, TargetError

__all__ = [
    "CohortSteps",
    "ModelSpec",
    "cohort_processor",
    "expand_inputs",
    "explain_and_write",
    "explain_inputs",
    "explain_loaded",
    "inference_options",
    "input_kind",
    "load_model",
    "load_timepoints",
    "parse_size",
    "parse_target",
    "parse_window",
    "read_manifest",
    "write_explanation",
]

SCAN_SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".dcm")


def _import_object(spec: str, what: str) -> Any:
    if ":" not in spec:
        raise MedcamError(f"{what} {spec!r} must look like 'package.module:name'.")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        top = module_name.split(".")[0]
        here = (Path.cwd() / top).is_dir() or (Path.cwd() / f"{top}.py").is_file()
        hint = ""
        if here:
            hint = (" It is in the current folder, which the `medcam` command does not import "
                    "from: run `PYTHONPATH=. medcam ...` or `python -m medcam ...`.")  # fmt: skip
        raise MedcamError(
            f"Cannot import {module_name!r} for {what} {spec!r}: {err}.{hint}"
        ) from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise MedcamError(f"{module_name!r} has no {attr!r} (from {what} {spec!r}).") from None


@dataclass
class ModelSpec:
    """A network plus the preprocessing that makes its input, ready to explain.

    ``inferer`` is how the network is run for inference (a bundle's sliding window, else
    ``None``: the whole input); ``expect`` what input it takes
    (:class:`medcam.engine.inferer.InputSpec`), checked before the model runs.
    """

    network: torch.nn.Module
    preprocess: Any
    source: str
    input_shape: tuple[int, ...] | None = None
    inferer: Any = None
    expect: Any = None


def load_model(
    *,
    bundle: str | Path | None = None,
    model: str | None = None,
    weights: str | Path | None = None,
    preprocess: str | None = None,
    device: str = "cpu",
    trusted: str | Sequence[str | Path] | None = None,
) -> ModelSpec:
    """Build the network from a bundle, or from ``package.module:factory`` (+ state-dict file).

    ``preprocess`` (``package.module:factory``) returns MONAI array transforms for the model
    input; a bundle's own preprocessing is used when none is given. ``trusted``: the folders a
    bundle may be loaded from (default: ``MEDCAM_TRUSTED_BUNDLES``; see
    :func:`medcam.bundle.check_trusted`). Weights are read as data only and checked against the
    network (:func:`medcam.weights.load_weights`).
    """
    if (bundle is None) == (model is None):
        raise MedcamError("Give exactly one of --bundle DIR or --model package.module:factory.")
    pre = _import_object(preprocess, "--preprocess")() if preprocess else None
    if bundle is not None:
        from medcam.bundle import load_bundle

        b = load_bundle(bundle, device, trusted=trusted)
        return ModelSpec(b.network, pre or b.preprocess, f"bundle {Path(bundle).name}",
                         b.input_shape(), b.inferer, b.expect)  # fmt: skip
    factory = _import_object(model, "--model")
    network = factory()
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"--model {model} returned a {type(network).__name__}, not a nn.Module.")
    if weights is not None:
        from medcam.weights import load_weights

        load_weights(network, weights, f"--model {model}")
    return ModelSpec(network.to(device).eval(), pre, model)


def parse_size(text: str, option: str = "--input-size", example: str = "96,96,96") -> list[int]:
    """``"96,96,96"`` -> ``[96, 96, 96]``: 2 or 3 positive integers, else a clear error."""
    try:
        size = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise MedcamError(
            f"{option} {text!r} must be 2 or 3 positive integers separated by commas, e.g. "
            f"{example}."
        ) from None
    if not 2 <= len(size) <= 3 or min(size) < 1:
        raise MedcamError(
            f"{option} {text!r} must be 2 or 3 positive integers (one per spatial axis), e.g. "
            f"{example}."
        )
    return size


def parse_window(
    roi_size: str | None, sw_batch_size: int | None = None, overlap: float | None = None
) -> dict[str, Any] | None:
    """Sliding-window options from the command line (``--roi-size 96,96,96``, ...); ``None``
    where none is given. They override a bundle's own inferer settings (see
    :func:`inference_options`)."""
    size = parse_size(roi_size, "--roi-size") if roi_size else None
    if size is None and sw_batch_size is None and overlap is None:
        return None
    return {"roi_size": size, "sw_batch_size": sw_batch_size, "overlap": overlap}


def inference_options(spec: ModelSpec, window: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for :func:`medcam.explain_scan`: the inferer to follow (the model's
    own, e.g. a bundle's sliding window, with ``window``'s overrides) and the input check."""
    from dataclasses import replace

    from medcam.engine.sliding import SlidingWindow

    inferer = spec.inferer
    window = window or {}
    if window.get("roi_size"):
        base = inferer if inferer is not None else SlidingWindow(tuple(window["roi_size"]),
                                                                 mode="gaussian")  # fmt: skip
        inferer = replace(base, roi_size=tuple(window["roi_size"]))
    if inferer is None and (window.get("sw_batch_size") is not None or window.get("overlap")
                            is not None):  # fmt: skip
        raise MedcamError(
            "--sw-batch-size and --overlap need --roi-size (or a bundle with a sliding-window "
            "inferer)."
        )
    if inferer is not None:
        if window.get("sw_batch_size") is not None:
            inferer = replace(inferer, sw_batch_size=int(window["sw_batch_size"]))
        if window.get("overlap") is not None:
            inferer = replace(inferer, overlap=float(window["overlap"]))
    return {"inferer": inferer, "expect": spec.expect}


def parse_target(text: str) -> Any:
    """``pred``, ``all``, ``3``, ``1,2`` (several classes) or ``seg:1`` (segmentation class)."""
    from medcam.engine.targets import SegmentationTarget

    text = text.strip()
    if text in ("pred", "all"):
        return text
    try:
        if text.startswith("seg:"):
            return SegmentationTarget([int(v) for v in text[4:].split(",")])
        classes = [int(v) for v in text.split(",")]
    except ValueError:
        raise TargetError(
            f"Cannot read target {text!r}; use pred, all, a class index, 1,2 or seg:1."
        ) from None
    return classes[0] if len(classes) == 1 else [classes]


def _is_dicom_folder(folder: Path) -> bool:
    import pydicom

    for p in folder.iterdir():
        if p.is_file():
            try:
                pydicom.dcmread(p, stop_before_pixels=True)
                return True
            except Exception:
                continue
    return False


def input_kind(path: str | Path) -> str | None:
    """The :attr:`medcam.Scan.kind` an input path will load as, when its name tells
    (``"nifti"``, ``"image-2d"``); ``None`` for DICOM, whose kind needs the files."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".png", ".jpg", ".jpeg")):
        return "image-2d"
    return None


def name_from_path(path: str | Path) -> str:
    """A case name from an input's file or folder name: known scan suffixes dropped
    (``pat.v1.nii.gz`` -> ``pat.v1``), sanitised."""
    from medcam.io.output import safe_name

    name = Path(path).name
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return safe_name(name)


def unique_case_names(paths: Sequence[Path]) -> dict[Path, str]:
    """``name_from_path`` for every input, refusing two inputs that would share a case folder
    (the second would replace the first's outputs)."""
    names: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for p in paths:
        name = name_from_path(p)
        if name in seen:
            raise InputError(
                f"{seen[name]} and {p} would both be written to case folder {name!r}. Rename "
                "one, explain them in separate runs with different --out folders, or drop "
                "--name-from-input (hash-based names are unique per input content)."
            )
        seen[name] = p
        names[p] = name
    return names


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Cases from command-line inputs: a file, a DICOM series folder, or a folder of cases
    (its subfolders and scan files, one level down)."""
    cases: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise InputError(f"{p} does not exist.")
        if p.is_file() or _is_dicom_folder(p):
            cases.append(p)
            continue
        children = sorted(
            c for c in p.iterdir()
            if (c.is_dir() and not c.name.startswith(".")) or c.name.lower().endswith(SCAN_SUFFIXES)
        )  # fmt: skip
        if not children:
            raise InputError(f"{p} holds no DICOM files, scan files or case folders.")
        cases.extend(children)
    return cases


def explain_loaded(
    spec: ModelSpec,
    explainer: Any,
    scan: Any,
    target: Any,
    normalize: str,
    window: dict[str, Any] | None = None,
) -> Any:
    """Explain one loaded scan (:func:`medcam.explain_scan` with the model's preprocessing and
    inferer, ``window`` from :func:`inference_options`)."""
    from medcam.space import explain_scan

    return explain_scan(spec.network, scan, preprocess=spec.preprocess, target=target,
                        normalize=normalize, explainer=explainer, **(window or {}))  # fmt: skip


def write_explanation(
    spec: ModelSpec, ex: Any, out: Path | Any, case: str, formats: Sequence[str]
) -> list[Path]:
    """Write ``formats`` of explanation ``ex`` as case folder ``out/<case>/`` (one transaction),
    or into the staging :class:`~medcam.io.output.OutputDir` ``out`` that the caller commits."""
    from medcam.io.output import OutputDir
    from medcam.writers.outputs import write_case, write_outputs

    if isinstance(out, OutputDir):
        written = write_case(ex, out, formats, stem=case, model=spec.network)
    else:
        written = write_outputs(ex, out, formats, model=spec.network, case=case)
    return [p for paths in written.values() for p in paths]


def explain_and_write(
    spec: ModelSpec,
    explainer: Any,
    scan: Any,
    out: Path | Any,
    case: str,
    target: Any,
    formats: Sequence[str],
    normalize: str,
    window: dict[str, Any] | None = None,
) -> tuple[Any, list[Path]]:
    """Explain one loaded scan and write its outputs as case folder ``out/<case>/`` (one
    transaction): (explanation, paths).

    ``out`` is a folder, or the staging :class:`~medcam.io.output.OutputDir` of a case that the
    caller commits (the cohort adds its status record to the same transaction).
    ``window``: keyword arguments for :func:`medcam.explain_scan` saying how the model infers
    (``inferer``, ``expect``; see :func:`inference_options`).
    """
    from medcam.writers.registry import check_formats

    check_formats(formats, scan)  # before the model runs
    ex = explain_loaded(spec, explainer, scan, target, normalize, window)
    return ex, write_explanation(spec, ex, out, case, formats)


def explain_inputs(
    spec: ModelSpec,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    layers: Any = "auto",
    method: str = "auto",
    target: Any = "pred",
    formats: Sequence[str] = ("nifti", "png", "json"),
    normalize: str = "none",
    fusion: str | None = None,
    name_from_input: bool = False,
    window: dict[str, Any] | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    log: Callable[[str], None] = print,
    prefetch: int = 1,
    chosen_by: str | None = None,
) -> list[dict]:
    """Explain every case in ``inputs`` and write its outputs under ``out/<case>/``.

    Returns one record per case: ``{"input", "case", "outputs", "seconds"}`` (``seconds``: per
    stage, :mod:`medcam.progress`). Everything is validated (the cases exist, the output folder
    is writable, the method and formats are known) before the first case runs; each case's
    input is checked against what the network takes (spatial rank, channels) and the formats
    it can be written in before the model runs on it. ``window`` overrides the sliding-window
    settings (:func:`parse_window`); the model's own inferer (a bundle's) is followed otherwise.

    With ``prefetch`` > 0 the next case is loaded (up to ``prefetch`` cases ahead) and the
    previous one written while a case is explained (:func:`medcam.prefetch.overlapped`); the
    outputs are those of a serial run (``prefetch=0``). A failing case stops the run after the
    cases before it have been written, with its error.
    """
    from medcam.engine.core import Explainer
    from medcam.io.output import OutputDir
    from medcam.io.scan import load_scan
    from medcam.prefetch import overlapped
    from medcam.progress import Sized, StageTimes, current_reporter, reporting
    from medcam.writers.outputs import case_name
    from medcam.writers.registry import check_formats

    check_formats(formats)
    cases = expand_inputs(inputs)
    for path in cases:  # a DICOM-only format for a NIfTI/picture input: refused before any work
        check_formats(formats, kind=input_kind(path))
    names = unique_case_names(cases) if name_from_input else {}
    # layer names are checked (Explainer) before the output folder is made
    explainer = Explainer(spec.network, layers, method, fusion=fusion, chosen_by=chosen_by)
    OutputDir(out)
    options = inference_options(spec, window)

    def load(path: Path) -> tuple[Any, str]:
        scan = load_scan(path)
        check_formats(formats, scan)  # before the model runs
        return scan, names[path] if name_from_input else case_name(scan)

    def explain(path: Path, loaded: tuple[Any, str]) -> tuple[Any, str]:
        scan, case = loaded
        return explain_loaded(spec, explainer, scan, target, normalize, options), case

    def write(path: Path, explained: tuple[Any, str]) -> dict:
        ex, case = explained
        files = [str(p) for p in write_explanation(spec, ex, Path(out), case, formats)]
        warning = ex.cam.warning()
        return {"input": str(path), "case": case, "outputs": files,
                **({"warning": warning} if warning else {})}  # fmt: skip

    times = StageTimes(forward=current_reporter())
    records = []
    outcomes = overlapped(cases, load, explain, write, depth=max(0, int(prefetch)),
                          label=str)  # fmt: skip
    with reporting(times):
        try:
            for outcome in progress(Sized(outcomes, len(cases))):
                seconds = times.pop(str(outcome.item))
                if outcome.error is not None:
                    raise outcome.error
                record = dict(outcome.value, seconds=seconds)
                records.append(record)
                log(f"{outcome.item} -> {Path(out) / record['case']} ({len(record['outputs'])} "
                    f"outputs): {StageTimes.summary(seconds)}")  # fmt: skip
                if "warning" in record:
                    log(f"  WARNING: {record['warning']}")
        finally:
            outcomes.close()  # a write in flight completes; nothing after a failure starts
    return records


@contextlib.contextmanager
def manifest_errors(path: Path) -> Iterator[None]:
    """A manifest that cannot be read (missing, unreadable, not UTF-8 text, malformed CSV) as an
    :class:`InputError` naming it."""
    import csv

    try:
        yield
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise InputError(
            f"Cannot read the manifest {path} ({why}). Give a UTF-8 CSV file with a header row."
        ) from err


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Visits from a CSV with columns ``scan`` (required), ``heatmap``, ``date``, ``label``.

    Relative paths are relative to the manifest's folder. Dates are ISO ``YYYY-MM-DD`` or DICOM
    ``YYYYMMDD`` (anything else, e.g. ``2020-1-25``, is refused). Errors name the row and column.
    """
    import csv

    from medcam.longitudinal.timepoint import parse_date

    path = Path(path)
    with manifest_errors(path), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if "scan" not in columns:
            raise InputError(f"{path}: the manifest needs a 'scan' column (has {sorted(columns)}).")
        unknown = columns - {"scan", "heatmap", "date", "label"}
        if unknown:
            raise InputError(f"{path}: unknown column(s) {sorted(unknown)}; use scan, heatmap, "
                             "date, label.")  # fmt: skip
        rows = []
        for n, row in enumerate(reader, start=2):
            entry: dict[str, Any] = {}
            for key in ("scan", "heatmap"):
                if row.get(key):
                    p = Path(row[key])
                    p = p if p.is_absolute() else path.parent / p
                    if not p.exists():
                        raise InputError(f"{path}, line {n}: {key} {p} does not exist.")
                    entry[key] = p
            if "scan" not in entry:
                raise InputError(f"{path}, line {n}: empty 'scan'.")
            entry["date"] = (row.get("date") or "").strip() or None
            entry["label"] = (row.get("label") or "").strip()
            if entry["date"] is not None:  # ISO or DICOM only, checked before any model runs
                parse_date(entry["date"], f"{path.name}, line {n}")
            rows.append(entry)
    return rows


def load_timepoints(
    entries: Sequence[dict[str, Any]],
    spec: ModelSpec | None = None,
    *,
    layers: Any = "auto",
    method: str = "auto",
    target: Any = "pred",
) -> list:
    """Visits from ``{"scan", "heatmap"?, "date"?, "label"?}`` entries; heatmaps missing from an
    entry are computed with ``spec`` (the same explainer for every visit).

    Every scan is read and every date checked (given, or the DICOM StudyDate) before the model
    runs on any of them, so a bad date or a missing heatmap fails fast, naming the visit.
    """
    from medcam.engine.core import Explainer
    from medcam.io.scan import load_scan
    from medcam.longitudinal.timepoint import Timepoint, dicom_date, parse_date
    from medcam.space import explain_scan

    pending = []
    for entry in entries:
        if entry.get("heatmap"):
            continue
        if spec is None:
            raise MedcamError(
                f"No heatmap for {entry['scan']}: give one (manifest 'heatmap' column) or a model "
                "(--bundle / --model) to compute it."
            )
        scan = load_scan(entry["scan"])
        name = entry.get("label") or Path(entry["scan"]).name
        when = entry.get("date")
        when = parse_date(when, name) if when else dicom_date(scan.datasets, name)
        if when is None:
            raise InputError(f"No date for visit {name!r}: give one (YYYY-MM-DD).")
        pending.append((entry, scan, when))
    explainer = Explainer(spec.network, layers, method) if spec is not None else None
    visits = []
    for entry in entries:
        if entry.get("heatmap"):
            visit = Timepoint.from_files(
                entry["scan"],
                entry["heatmap"],
                date=entry.get("date"),
                label=entry.get("label", ""),
            )
            visits.append(visit)
    for entry, scan, when in pending:
        ex = explain_scan(spec.network, scan, preprocess=spec.preprocess, target=target,
                          explainer=explainer, **inference_options(spec))  # fmt: skip
        visits.append(Timepoint.from_explanation(ex, date=when, model=spec.network,
                                                 label=entry.get("label", "")))  # fmt: skip
    return visits


def cohort_processor(
    spec: ModelSpec,
    *,
    layers: Any = "auto",
    method: str = "auto",
    target: str = "pred",
    formats: Sequence[str] = ("nifti", "png", "json"),
    normalize: str = "none",
    fusion: str | None = None,
    window: dict[str, Any] | None = None,
    chosen_by: str | None = None,
) -> CohortSteps:
    """``process(case, folder)`` for :func:`medcam.cohort.run_cohort`: explain the case's input
    (its own ``target`` if the manifest gives one) and write ``formats`` into ``folder``; with a
    ``mask`` (NIfTI on the scan grid), the pointing game and energy inside it are added to the
    sidecar-style ``quality.json``. ``folder`` is the case's staging
    :class:`~medcam.io.output.OutputDir` (the cohort commits it with its status record).

    The processor also comes in steps (``load``, ``explain``, ``write``: a
    :class:`medcam.cohort.CaseSteps`), so the cohort overlaps consecutive cases."""
    from medcam.engine.core import Explainer

    explainer = Explainer(spec.network, layers, method, fusion=fusion, chosen_by=chosen_by)
    options = inference_options(spec, window)
    return CohortSteps(spec, explainer, options, target, list(formats), normalize)


@dataclass
class CohortSteps:
    """One cohort case in three steps (see :func:`cohort_processor`)."""

    spec: ModelSpec
    explainer: Any
    options: dict[str, Any]
    target: str
    formats: list[str]
    normalize: str

    def load(self, case: Any) -> tuple[Any, Any]:
        """The case's scan (and mask), checked against the formats; no model runs."""
        from medcam.io.scan import load_scan
        from medcam.writers.registry import check_formats

        scan = load_scan(case.input)
        check_formats(self.formats, scan)
        mask = load_scan(case.mask).image[0].numpy() > 0 if case.mask is not None else None
        return scan, mask

    def explain(self, case: Any, loaded: tuple[Any, Any]) -> tuple[Any, Any]:
        scan, mask = loaded
        case_target = parse_target(case.target or self.target)
        ex = explain_loaded(self.spec, self.explainer, scan, case_target, self.normalize,
                            self.options)  # fmt: skip
        return ex, mask

    def write(self, case: Any, explained: tuple[Any, Any], folder: Any) -> list[Path]:
        import json

        ex, mask = explained
        paths = write_explanation(self.spec, ex, folder, case.case_id, self.formats)
        if mask is not None:
            from medcam import evaluate

            heat = ex.heatmap[0].detach().cpu().numpy()
            if mask.shape != heat.shape:
                raise InputError(f"mask {case.mask} is not on the scan grid {heat.shape}.")
            quality = {
                "pointing_game": evaluate.pointing_game(heat, mask),
                "pointing_game_pm1": evaluate.pointing_game(heat, mask, tolerance=1),
                "energy_pointing_game": evaluate.energy_pointing_game(heat, mask),
                "top_iou": evaluate.top_iou(heat, mask),
            }
            text = json.dumps(quality, indent=2)
            written = folder.write_file("quality.json", lambda p: p.write_text(text))
            paths.append(folder.final_path(written))
        return paths

    def warning(self, explained: tuple[Any, Any]) -> str | None:
        """What a reader of the case's maps must know (an empty map), or ``None``."""
        return explained[0].cam.warning()

    def __call__(self, case: Any, folder: Any) -> list[Path]:
        return self.write(case, self.explain(case, self.load(case)), folder)
