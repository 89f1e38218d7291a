"""Explaining inputs from the command line: model specs, targets, case discovery, the loop.

The CLI (``medcam explain``) and cohort runs call these; they hold no logic of their own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medcam.errors import InputError, MedcamError, ModelError, TargetError

__all__ = [
    "ModelSpec",
    "cohort_processor",
    "expand_inputs",
    "explain_inputs",
    "load_model",
    "load_timepoints",
    "parse_target",
    "parse_window",
    "read_manifest",
]

SCAN_SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".dcm")


def _import_object(spec: str, what: str) -> Any:
    if ":" not in spec:
        raise MedcamError(f"{what} {spec!r} must look like 'package.module:name'.")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise MedcamError(f"Cannot import {module_name!r} for {what} {spec!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise MedcamError(f"{module_name!r} has no {attr!r} (from {what} {spec!r}).") from None


@dataclass
class ModelSpec:
    """A network plus the preprocessing that makes its input, ready to explain."""

    network: torch.nn.Module
    preprocess: Any
    source: str
    input_shape: tuple[int, ...] | None = None


def load_model(
    *,
    bundle: str | Path | None = None,
    model: str | None = None,
    weights: str | Path | None = None,
    preprocess: str | None = None,
    device: str = "cpu",
) -> ModelSpec:
    """Build the network from a bundle, or from ``package.module:factory`` (+ state-dict file).

    ``preprocess`` (``package.module:factory``) returns MONAI array transforms for the model
    input; a bundle's own preprocessing is used when none is given.
    """
    if (bundle is None) == (model is None):
        raise MedcamError("Give exactly one of --bundle DIR or --model package.module:factory.")
    pre = _import_object(preprocess, "--preprocess")() if preprocess else None
    if bundle is not None:
        from medcam.bundle import load_bundle

        b = load_bundle(bundle, device)
        return ModelSpec(
            b.network, pre or b.preprocess, f"bundle {Path(bundle).name}", b.input_shape()
        )
    factory = _import_object(model, "--model")
    network = factory()
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"--model {model} returned a {type(network).__name__}, not a nn.Module.")
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            network.load_state_dict(state)
        except RuntimeError as err:
            raise ModelError(f"The weights in {weights} do not fit {model}: {err}") from err
    return ModelSpec(network.to(device).eval(), pre, model)


def parse_window(roi_size: str | None, sw_batch_size: int = 1, overlap: float = 0.25):
    """Sliding-window options from ``--roi-size 96,96,96`` (``None`` without it)."""
    if not roi_size:
        return None
    try:
        size = [int(v) for v in roi_size.split(",")]
    except ValueError:
        raise MedcamError(f"--roi-size {roi_size!r} must look like 96,96,96.") from None
    return {"roi_size": size, "sw_batch_size": sw_batch_size, "overlap": overlap}


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


def explain_and_write(
    spec: ModelSpec,
    explainer: Any,
    scan: Any,
    folder: Path,
    case: str,
    target: Any,
    formats: Sequence[str],
    normalize: str,
    window: dict[str, Any] | None = None,
) -> tuple[Any, list[Path]]:
    """Explain one loaded scan and write its outputs into ``folder``: (explanation, paths).

    ``window``: sliding-window options for :func:`medcam.explain_scan` (``roi_size``, ...).
    """
    from medcam.space import explain_scan
    from medcam.writers.outputs import write_outputs

    ex = explain_scan(spec.network, scan, preprocess=spec.preprocess, target=target,
                      normalize=normalize, explainer=explainer, **(window or {}))  # fmt: skip
    written = write_outputs(ex, folder, formats, model=spec.network, case=case)
    return ex, [p for paths in written.values() for p in paths]


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
) -> list[dict]:
    """Explain every case in ``inputs`` and write its outputs under ``out/<case>/``.

    Returns one record per case: ``{"input", "case", "outputs"}``. Everything is validated (the
    cases exist, the output folder is writable, the method and formats are known) before the
    first case runs.
    """
    from medcam.engine.core import Explainer
    from medcam.io.output import OutputDir, safe_name
    from medcam.io.scan import load_scan
    from medcam.writers.outputs import FORMATS, case_name

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise MedcamError(f"Unknown format(s) {unknown}; choose from {', '.join(FORMATS)}.")
    cases = expand_inputs(inputs)
    OutputDir(out)
    explainer = Explainer(spec.network, layers, method, fusion=fusion)
    records = []
    for path in progress(cases):
        scan = load_scan(path)
        case = safe_name(path.name.split(".")[0]) if name_from_input else case_name(scan)
        _, paths = explain_and_write(spec, explainer, scan, Path(out) / case, case, target,
                                     formats, normalize, window)  # fmt: skip
        files = [str(p) for p in paths]
        records.append({"input": str(path), "case": case, "outputs": files})
        log(f"{path} -> {Path(out) / case} ({len(files)} outputs)")
    return records


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Visits from a CSV with columns ``scan`` (required), ``heatmap``, ``date``, ``label``.

    Relative paths are relative to the manifest's folder. Errors name the row and column.
    """
    import csv

    path = Path(path)
    with open(path, newline="") as f:
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
            entry["date"] = row.get("date") or None
            entry["label"] = row.get("label") or ""
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
    entry are computed with ``spec`` (the same explainer for every visit)."""
    from medcam.engine.core import Explainer
    from medcam.longitudinal.timepoint import Timepoint
    from medcam.space import explain_scan

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
            continue
        if spec is None:
            raise MedcamError(
                f"No heatmap for {entry['scan']}: give one (manifest 'heatmap' column) or a model "
                "(--bundle / --model) to compute it."
            )
        ex = explain_scan(spec.network, entry["scan"], preprocess=spec.preprocess, target=target,
                          explainer=explainer)  # fmt: skip
        visits.append(Timepoint.from_explanation(ex, date=entry.get("date"), model=spec.network,
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
) -> Callable[[Any, Path], list[Path]]:
    """``process(case, folder)`` for :func:`medcam.cohort.run_cohort`: explain the case's input
    (its own ``target`` if the manifest gives one) and write ``formats`` into ``folder``; with a
    ``mask`` (NIfTI on the scan grid), the pointing game and energy inside it are added to the
    sidecar-style ``quality.json``."""
    import json

    from medcam.engine.core import Explainer
    from medcam.io.output import OutputDir
    from medcam.io.scan import load_scan

    explainer = Explainer(spec.network, layers, method, fusion=fusion)

    def process(case: Any, folder: Path) -> list[Path]:
        scan = load_scan(case.input)
        case_target = parse_target(case.target or target)
        ex, paths = explain_and_write(spec, explainer, scan, folder, case.case_id, case_target,
                                      formats, normalize, window)  # fmt: skip
        if case.mask is not None:
            from medcam import evaluate

            mask = load_scan(case.mask).image[0].numpy() > 0
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
            paths.append(OutputDir(folder).write_file("quality.json", lambda p: p.write_text(text)))
        return paths

    return process
