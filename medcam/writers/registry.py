"""Output formats as registered writers, the way CAM methods register.

Each format is one function in its own module, registered with :func:`register_format`; it gets
a :class:`CaseOutput` (the explanation, the case's staging folder, the options) and returns the
paths it wrote. :func:`medcam.write_outputs` checks the requested formats against the scan
before anything runs, then calls the writers in their registered order inside one case
transaction (:meth:`medcam.io.output.OutputDir.case`).

Adding a format::

    from medcam.writers.registry import register_format

    @register_format("npy", description="the raw maps as a NumPy file")
    def write_npy(out):
        path = out.folder.write_file(f"{out.stem}.npy", lambda p: np.save(p, out.heat))
        return [path]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcam.errors import MedcamError

__all__ = [
    "CaseOutput",
    "OutputFormat",
    "available_formats",
    "check_formats",
    "get_format",
    "register_format",
]

# What a format needs from the source scan.
NEEDS = ("any", "dicom", "dicom-series")


@dataclass(frozen=True)
class OutputFormat:
    """One registered output format.

    Attributes
    ----------
    name:
        What users write in ``formats=[...]`` / ``--format``.
    write:
        ``write(out: CaseOutput) -> list[Path]``: writes every map of the case.
    needs:
        ``"any"`` source, any ``"dicom"`` source (the output joins the source's study), or a
        ``"dicom-series"`` with a frame of reference (the output lies on the source's grid).
    order:
        Writers run in ascending order (the JSON sidecar, which lists the others, runs last).
    description:
        One line for ``--help`` and error messages.
    """

    name: str
    write: Callable[[CaseOutput], list[Path]]
    needs: str = "any"
    order: int = 50
    description: str = ""


_FORMATS: dict[str, OutputFormat] = {}


def register_format(
    name: str, *, needs: str = "any", order: int = 50, description: str = ""
) -> Callable[[Callable[[CaseOutput], list[Path]]], Callable[[CaseOutput], list[Path]]]:
    """Decorator registering ``fn(out: CaseOutput) -> list[Path]`` as output format ``name``."""
    if needs not in NEEDS:
        raise ValueError(f"needs must be one of {NEEDS}, not {needs!r}")

    def decorator(fn: Callable[[CaseOutput], list[Path]]) -> Callable[[CaseOutput], list[Path]]:
        _FORMATS[name] = OutputFormat(name, fn, needs, order, description)
        return fn

    return decorator


def _load_builtins() -> None:
    # importing the modules registers the built-in formats
    from medcam.writers import dicom_pm, dicom_sc, dicom_seg, figures, nifti, sidecar  # noqa: F401


def available_formats() -> tuple[str, ...]:
    """Names of every registered format, in writing order."""
    _load_builtins()
    return tuple(f.name for f in sorted(_FORMATS.values(), key=lambda f: (f.order, f.name)))


def get_format(name: str) -> OutputFormat:
    """The registered format ``name``; the error lists the known ones."""
    _load_builtins()
    if name not in _FORMATS:
        raise MedcamError(
            f"Unknown output format {name!r}; choose from {', '.join(available_formats())}."
        )
    return _FORMATS[name]


def _source_kind(scan: Any) -> tuple[str, bool]:
    return scan.kind, bool(scan.has_frame_of_reference)


def check_formats(
    formats: Sequence[str],
    scan: Any = None,
    *,
    kind: str | None = None,
    has_frame_of_reference: bool | None = None,
) -> list[OutputFormat]:
    """Check ``formats`` before any work: known names, and (given the ``scan``, or just its
    ``kind``) that the source can carry each of them.

    ``kind`` is a :attr:`medcam.Scan.kind` (``"nifti"``, ``"dicom-series"``, ``"dicom-2d"``,
    ``"image-2d"``, ``"tensor"``); it lets a caller check inputs from their paths before loading
    them. Returns the formats in writing order.

    Raises
    ------
    MedcamError
        An unknown format, a format given twice, or a DICOM format for a source that cannot carry
        it (the message says what to write instead).
    """
    unknown = sorted({f for f in formats if f not in available_formats()})
    if unknown:
        raise MedcamError(
            f"Unknown output format(s) {unknown}; choose from {', '.join(available_formats())}."
        )
    if len(set(formats)) != len(formats):
        raise MedcamError(f"An output format is listed twice in {list(formats)}.")
    chosen = sorted((get_format(f) for f in formats), key=lambda f: (f.order, f.name))
    if scan is not None:
        kind, has_frame_of_reference = _source_kind(scan)
    if kind is None:
        return chosen
    is_dicom = kind.startswith("dicom")
    for fmt in chosen:
        if fmt.needs == "dicom" and not is_dicom:
            raise MedcamError(
                f"The {fmt.name} output ({fmt.description}) joins the source's DICOM study, but "
                f"this input is {kind!r}, not DICOM. Drop {fmt.name} for it, or use png (a "
                "picture) / nifti (the map on the scan grid)."
            )
        if fmt.needs == "dicom-series":
            if kind != "dicom-series":
                raise MedcamError(
                    f"The {fmt.name} output ({fmt.description}) is written on a DICOM source "
                    f"series, but this input is {kind!r}. Write nifti for NIfTI inputs, or "
                    "dicom-sc (a Secondary Capture) for single DICOM images."
                )
            if has_frame_of_reference is False:
                raise MedcamError(
                    f"The source series has no FrameOfReferenceUID, so {fmt.name} cannot be "
                    "placed on it; write dicom-sc (a Secondary Capture) instead."
                )
    return chosen


@dataclass
class CaseOutput:
    """Everything a format writer needs for one case.

    Attributes
    ----------
    explanation:
        The :class:`medcam.ScanExplanation` (``heatmap: (K, *source_spatial)``).
    folder:
        The case's staging :class:`~medcam.io.output.OutputDir`; write files with
        ``folder.write_file(name, fn)``. They appear in the final case folder all together,
        when every requested format has been written.
    stem:
        File-name stem of the case (sanitised).
    formats:
        Every format requested for this case.
    model:
        The network, for the sidecar's provenance (or ``None``).
    options:
        ``seg_threshold``, ``fractional_seg``, ``alpha``, ``series_number_base``.
    written:
        Format -> paths written so far (final paths, in the case folder).
    """

    explanation: Any
    folder: Any
    stem: str
    formats: Sequence[str]
    model: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    written: dict[str, list[Path]] = field(default_factory=dict)

    @functools.cached_property
    def heat(self) -> np.ndarray:
        """``(K, *source_spatial)`` float32 maps on the host (copied once, on first use)."""
        return self.explanation.heatmap.detach().cpu().numpy().astype(np.float32, copy=False)

    @functools.cached_property
    def image(self) -> np.ndarray:
        """The scan on the host, channels averaged (RGB -> grey): ``(*source_spatial)``."""
        return self.explanation.scan.image.detach().cpu().numpy().mean(axis=0)

    @property
    def scan(self) -> Any:
        return self.explanation.scan

    @property
    def method(self) -> str:
        return self.explanation.cam.method

    @property
    def labels(self) -> list[str]:
        """One label per map (``class1``, ``target0``, ...)."""
        return list(self.explanation.target_labels)

    @property
    def layer_text(self) -> str:
        return "+".join(self.explanation.cam.layers)

    def base(self, k: int) -> str:
        """File-name base of map ``k``: ``<stem>_<method>_<label>``."""
        from medcam.io.output import safe_name

        return f"{self.stem}_{safe_name(self.method)}_{self.labels[k]}"

    def series_number(self, k: int, offset: int) -> int:
        """DICOM SeriesNumber of the ``offset``-th DICOM format for map ``k``."""
        return int(self.options.get("series_number_base", 9000)) + 10 * k + offset
