"""Where results go: one small interface, one registered module per kind of sink.

Every result is first written as a case folder (:func:`medcam.write_outputs`, one transaction);
a sink then delivers that case: copies it to a folder, or stores its DICOM objects (Parametric
Map, SEG, Secondary Capture series) in a PACS. Kinds register by address scheme::

    @register_sink("dicomweb+http", "dicomweb+https")
    def open_stow(address, **options) -> Sink: ...
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcam.errors import MedcamError

__all__ = ["Sink", "WrittenCase", "open_sink", "register_sink", "sink_kinds"]


@dataclass
class WrittenCase:
    """A committed case folder and what each format wrote in it.

    Attributes
    ----------
    name:
        The case (folder) name.
    folder:
        ``out/<case>/``.
    outputs:
        Format -> written paths (a Secondary Capture series is a folder of files).
    study_uid:
        StudyInstanceUID of the source (DICOM results join this study); "" otherwise.
    """

    name: str
    folder: Path
    outputs: dict[str, list[Path]] = field(default_factory=dict)
    study_uid: str = ""

    def dicom_series(self) -> list[list[Path]]:
        """The DICOM results, one list of files per derived series (PM, SEG, SC...)."""
        from medcam.writers.registry import get_format

        groups = []
        for fmt, paths in self.outputs.items():
            if get_format(fmt).needs not in ("dicom", "dicom-series"):
                continue
            for p in paths:
                p = Path(p)
                groups.append(sorted(p.glob("*.dcm")) if p.is_dir() else [p])
        return [g for g in groups if g]


class Sink(ABC):
    """Where results go."""

    #: the address the sink was opened with (no credentials in it)
    address: str = ""

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~medcam.errors.MedcamError` now if the sink is unusable (server
        unreachable, credentials refused), before any model runs."""

    @abstractmethod
    def send(self, case: WrittenCase) -> int:
        """Deliver ``case``; returns the number of objects stored. Sending the same case again
        stores nothing twice (the objects keep their UIDs; a PACS keeps one copy)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


_SINKS: dict[str, Callable[..., Sink]] = {}


def register_sink(*schemes: str) -> Callable[[Callable[..., Sink]], Callable[..., Sink]]:
    """Decorator registering ``open(address: str, **options) -> Sink`` for address
    ``schemes`` (``"folder"`` for local paths)."""

    def decorator(fn: Callable[..., Sink]) -> Callable[..., Sink]:
        for scheme in schemes:
            _SINKS[scheme.lower()] = fn
        return fn

    return decorator


def _load_builtins() -> None:
    from medcam.sinks import cstore, folder, stow  # noqa: F401


def sink_kinds() -> tuple[str, ...]:
    """Registered address schemes."""
    _load_builtins()
    return tuple(sorted(_SINKS))


def open_sink(address: str | Path, **options: Any) -> Sink:
    """The sink for ``address``: ``dicomweb+http(s)://...`` (STOW-RS), ``dimse://AET@host:port``
    (C-STORE) or a local folder."""
    _load_builtins()
    text = str(address)
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", text)
    scheme = match.group(1).lower() if match else "folder"
    if scheme not in _SINKS:
        raise MedcamError(
            f"Unknown destination {text!r}; use a folder, dicomweb+http(s)://... "
            "or dimse://AET@host:port."
        )
    return _SINKS[scheme](text, **options)
