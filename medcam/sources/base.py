"""Where scans come from: one small interface, one registered module per kind of source.

A source lists the series it can give (:class:`SeriesRef`) and fetches one into a local folder
that :func:`medcam.load_scan` reads. Kinds register by address scheme, the way output formats
and CAM methods register::

    @register_source("dicomweb+http", "dicomweb+https")
    def open_dicomweb(address, **options) -> Source: ...

:func:`open_source` picks the kind from the address (a folder or file path is the ``folder``
source).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcam.errors import InputError, MedcamError

__all__ = [
    "NON_IMAGE_MODALITIES",
    "SeriesFilter",
    "SeriesRef",
    "Source",
    "is_medcam_result",
    "open_source",
    "register_source",
    "source_kinds",
]

# Series that hold no images to explain (structured reports, presentation states, key objects,
# segmentations, RT objects, documents, raw data): skipped unless asked for by UID.
NON_IMAGE_MODALITIES = frozenset(
    {
        "SR",
        "PR",
        "KO",
        "SEG",
        "RTSTRUCT",
        "RTPLAN",
        "RTDOSE",
        "RTRECORD",
        "DOC",
        "REG",
        "RWV",
        "PLAN",
        "FID",
        "AU",
        "ECG",
        "HD",
        "RAW",
    }
)
DERIVED_BY = "medcam"  # Manufacturer of medcam's own results: never explained again


def is_medcam_result(manufacturer: str, description: str) -> bool:
    """True for a series medcam made (Manufacturer ``medcam``; or, where a server does not
    report the Manufacturer, a SeriesDescription starting with ``medcam ``)."""
    if manufacturer:
        return manufacturer.strip().lower() == DERIVED_BY
    return (description or "").lower().startswith(f"{DERIVED_BY} ")


@dataclass(frozen=True)
class SeriesRef:
    """One series a source can fetch.

    Attributes
    ----------
    study_uid, series_uid:
        StudyInstanceUID / SeriesInstanceUID (empty for a folder that is not DICOM).
    modality, description:
        Modality and SeriesDescription as the source reports them ("" when unknown).
    instances:
        Number of instances the source reports (``None`` when unknown).
    manufacturer:
        Manufacturer, when the source reports it (medcam's own results say ``medcam``).
    path:
        For the folder source: the file or folder to load.
    """

    study_uid: str = ""
    series_uid: str = ""
    modality: str = ""
    description: str = ""
    instances: int | None = None
    manufacturer: str = ""
    path: Path | None = None

    @property
    def label(self) -> str:
        """A short name for logs: modality, description and a UID suffix (no patient data)."""
        if self.path is not None and not self.series_uid:
            return str(self.path)
        tail = self.series_uid[-12:]
        return f"{self.modality or '?'} series ...{tail} ({self.instances or '?'} instances)"


@dataclass
class SeriesFilter:
    """Which series of a study to explain.

    Attributes
    ----------
    series_uids:
        Only these series (explicitly chosen series are taken whatever their modality).
    modalities:
        Only these modalities (e.g. ``["CT"]``); default every image modality.
    description:
        A regular expression the SeriesDescription must contain (case-insensitive).
    """

    series_uids: Sequence[str] = ()
    modalities: Sequence[str] = ()
    description: str | None = None
    _pattern: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.description:
            try:
                self._pattern = re.compile(self.description, re.IGNORECASE)
            except re.error as err:
                raise MedcamError(f"--series-description {self.description!r}: {err}") from err
        self.modalities = [m.upper() for m in self.modalities]

    def why_not(self, ref: SeriesRef) -> str | None:
        """``None`` when ``ref`` is to be explained, else the reason it is skipped."""
        if self.series_uids:
            return None if ref.series_uid in self.series_uids else "not a requested series"
        if is_medcam_result(ref.manufacturer, ref.description):
            return "a medcam result"
        modality = ref.modality.upper()
        if self.modalities and modality not in self.modalities:
            return f"modality {modality or '?'} not in {', '.join(self.modalities)}"
        if modality in NON_IMAGE_MODALITIES:
            return f"modality {modality} holds no images to explain"
        if self._pattern is not None and not self._pattern.search(ref.description or ""):
            return f"description does not match {self.description!r}"
        return None

    def select(self, refs: Iterable[SeriesRef]) -> tuple[list[SeriesRef], list[tuple]]:
        """(chosen series, [(skipped series, reason)]); requested UIDs that the study does not
        hold raise :class:`InputError`."""
        refs = list(refs)
        chosen, skipped = [], []
        for ref in refs:
            reason = self.why_not(ref)
            if reason is None:
                chosen.append(ref)
            else:
                skipped.append((ref, reason))
        missing = set(self.series_uids) - {r.series_uid for r in refs}
        if missing:
            raise InputError(f"The study holds no series {sorted(missing)}.")
        return chosen, skipped


class Source(ABC):
    """Where scans come from: list series, fetch one into a local folder."""

    #: the address the source was opened with (no credentials in it)
    address: str = ""

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~medcam.errors.MedcamError` now if the source is unusable (server
        unreachable, credentials refused), before any model runs."""

    @abstractmethod
    def series(self, study_uid: str | None = None) -> list[SeriesRef]:
        """Every series of ``study_uid`` (or, for a folder, every case)."""

    @abstractmethod
    def fetch(self, ref: SeriesRef, folder: Path) -> Path:
        """Make ``ref`` readable by :func:`medcam.load_scan`: write its files into ``folder``
        (an empty temporary folder) and return the path to load (the folder, or for a local
        source the original path, untouched)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_SOURCES: dict[str, Callable[..., Source]] = {}


def register_source(*schemes: str) -> Callable[[Callable[..., Source]], Callable[..., Source]]:
    """Decorator registering ``open(address: str, **options) -> Source`` for address
    ``schemes`` (``"folder"`` for local paths)."""

    def decorator(fn: Callable[..., Source]) -> Callable[..., Source]:
        for scheme in schemes:
            _SOURCES[scheme.lower()] = fn
        return fn

    return decorator


def _load_builtins() -> None:
    from medcam.sources import dicomweb, dimse, folder  # noqa: F401


def source_kinds() -> tuple[str, ...]:
    """Registered address schemes."""
    _load_builtins()
    return tuple(sorted(_SOURCES))


def scheme_of(address: str | Path) -> str:
    """The registry key of ``address``: its URL scheme, or ``folder`` for a path."""
    text = str(address)
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", text)
    return match.group(1).lower() if match else "folder"


def open_source(address: str | Path, **options: Any) -> Source:
    """The source for ``address``: ``dicomweb+http(s)://...``, ``dimse://AET@host:port`` or a
    local path. ``options`` go to the kind's opener (e.g. ``calling_ae`` for DIMSE)."""
    _load_builtins()
    scheme = scheme_of(address)
    if scheme not in _SOURCES:
        raise MedcamError(
            f"Unknown source {str(address)!r}; use a path, dicomweb+http(s)://... "
            "or dimse://AET@host:port."
        )
    return _SOURCES[scheme](str(address), **options)
