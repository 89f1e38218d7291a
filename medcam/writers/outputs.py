"""Write a scan's heatmaps in the chosen formats as one case transaction.

The formats are registered writers (:mod:`medcam.writers.registry`); this module checks the
request against the scan, stages every output of the case in a hidden folder and commits it
with one rename (:meth:`medcam.io.output.OutputDir.case`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from medcam.errors import MedcamError, OutputError
from medcam.io.output import OutputDir, safe_name
from medcam.writers.registry import CaseOutput, available_formats, check_formats
from medcam.writers.sidecar import model_identity

__all__ = ["DEFAULT_FORMATS", "FORMATS", "case_name", "model_identity", "write_outputs"]

FORMATS = ("nifti", "dicom-pm", "dicom-seg", "dicom-sc", "png", "json")  # the built-in formats
DEFAULT_FORMATS = ("nifti", "png", "json")


def case_name(scan, template: str | None = None) -> str:
    """File-name stem for a case: ``template`` filled from the first DICOM header, or a hash.

    ``template`` may use DICOM keywords, e.g. ``"{SeriesInstanceUID}"``; values are
    sanitised (no path separators, no ``..``), so a tag cannot make a path leave the output
    folder. The default, ``case-<first 12 hex of the input's SHA-256>``, holds no identifier.
    """
    if template is None:
        return f"case-{scan.sha256[:12]}" if scan.sha256 else "case"
    fields: dict[str, str] = {}
    if scan.datasets:
        ds = scan.datasets[0]
        for elem in ds:
            if elem.keyword and elem.VR not in ("SQ", "OB", "OW", "OF", "OD", "UN"):
                fields[elem.keyword] = str(elem.value)
    try:
        raw = template.format_map(fields)
    except KeyError as err:
        raise MedcamError(f"Case-name template {template!r}: the scan has no {err} tag.") from err
    return safe_name(raw)


def write_case(
    explanation,
    folder: OutputDir,
    formats: Sequence[str],
    *,
    stem: str,
    model: torch.nn.Module | None = None,
    **options,
) -> dict[str, list[Path]]:
    """Write ``formats`` of one case into ``folder`` (a case's staging folder, see
    :meth:`OutputDir.case`); returns format -> final paths."""
    chosen = check_formats(formats, explanation.scan)
    out = CaseOutput(explanation, folder, stem, list(formats), model, dict(options))
    out.written = {f: [] for f in formats}
    for fmt in chosen:
        try:
            paths = fmt.write(out)
        except OutputError:
            raise
        except OSError as err:  # a full disk, a quota, a vanished folder
            raise OutputError(
                f"Writing the {fmt.name} output of case {stem!r} failed: {err.strerror or err}. "
                "Nothing of this case was written (a previous result of the case is kept); free "
                "space or choose another output folder, then run it again."
            ) from err
        out.written[fmt.name] = [folder.final_path(p) for p in paths]
    return out.written


def write_outputs(
    explanation,
    out_dir: str | Path,
    formats: Sequence[str] = DEFAULT_FORMATS,
    *,
    model: torch.nn.Module | None = None,
    case: str | None = None,
    seg_threshold: float = 0.5,
    fractional_seg: bool = False,
    alpha: float = 0.4,
    series_number_base: int = 9000,
    uid_seed: str | None = None,
) -> dict[str, list[Path]]:
    """Write ``explanation`` (a :class:`medcam.ScanExplanation`) as case folder
    ``out_dir/<case>/``.

    Parameters
    ----------
    formats:
        Registered formats (:func:`medcam.writers.registry.available_formats`): ``"nifti"``,
        ``"dicom-pm"``, ``"dicom-seg"``, ``"dicom-sc"``, ``"png"``, ``"json"``. They are checked
        against the scan before anything is written (DICOM formats need a DICOM source).
    model:
        Recorded in the sidecar (class, parameter count, weights hash).
    case:
        Case folder and file-name stem, e.g. a cohort case id (sanitised); default
        ``case-<input hash>``.
    seg_threshold:
        DICOM SEG (binary): voxels at or above this fraction of each map's maximum.
    fractional_seg:
        Write the SEG as FRACTIONAL (``map / max``) instead of BINARY.
    alpha:
        Heatmap opacity in the PNG figures and Secondary Captures.
    series_number_base:
        DICOM SeriesNumber of the first derived series (map ``k``, format ``i``: base + 10k + i).
    uid_seed:
        Derive the DICOM outputs' Series/SOP Instance UIDs from this text instead of making new
        ones (the same seed gives the same UIDs: a PACS keeps one copy when a result is sent
        again). :func:`medcam.pipeline.result_seed` makes one from the source instances, the
        model weights and the settings.

    Returns
    -------
    dict
        Format -> written paths, all inside ``out_dir/<case>/``.

    Notes
    -----
    The case is a transaction: its outputs are staged in a hidden folder and appear together
    with one rename, replacing a previous run's folder of the same case as a whole; on any
    error nothing of the case is written and a previous result stays. The input is never
    modified: the folder is checked up front, and a path equal to an input file or a folder
    holding one is refused.
    """
    check_formats(formats, explanation.scan)
    root = OutputDir(out_dir, explanation.scan.input_files)
    stem = safe_name(case) if case is not None else case_name(explanation.scan)
    options = {"seg_threshold": seg_threshold, "fractional_seg": fractional_seg,
               "alpha": alpha, "series_number_base": series_number_base,
               "uid_seed": uid_seed}  # fmt: skip
    with root.case(stem) as stage:
        return write_case(explanation, stage, formats, stem=stem, model=model, **options)


def formats_help() -> str:
    """``name: description`` of every registered format, for ``--help``."""
    from medcam.writers.registry import get_format

    return "; ".join(f"{n} ({get_format(n).description})" for n in available_formats())
