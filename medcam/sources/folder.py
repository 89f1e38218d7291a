"""Scans from local files and folders: a scan file, a DICOM series folder, a folder of cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medcam.sources.base import SeriesRef, Source, register_source

__all__ = ["FolderSource"]


class FolderSource(Source):
    """The cases of local inputs (what ``medcam explain PATH...`` reads); nothing is copied.

    Each case is a scan file, a DICOM series folder, or one entry of a folder of cases
    (:func:`medcam.runner.expand_inputs`).
    """

    def __init__(self, *paths: str | Path) -> None:
        self.paths = [Path(p) for p in paths]
        self.address = ", ".join(str(p) for p in self.paths)

    def check(self) -> None:
        from medcam.runner import expand_inputs

        expand_inputs(self.paths)

    def series(self, study_uid: str | None = None) -> list[SeriesRef]:
        from medcam.runner import expand_inputs

        return [SeriesRef(path=p) for p in expand_inputs(self.paths)]

    def fetch(self, ref: SeriesRef, folder: Path) -> Path:
        return Path(ref.path)  # read in place; never copied or modified


@register_source("folder", "file")
def open_folder(address: str, **_: Any) -> FolderSource:
    path = address[len("file://") :] if address.lower().startswith("file://") else address
    return FolderSource(path)
