"""Results to a local folder: the case folder copied in as one transaction."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from medcam.io.output import OutputDir
from medcam.sinks.base import Sink, WrittenCase, register_sink

__all__ = ["FolderSink"]


class FolderSink(Sink):
    """Copy each case folder to ``path/<case>/``; it appears whole or not at all, replacing a
    previous copy of the same case (so a resend leaves one copy)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.address = str(self.path)

    def check(self) -> None:
        OutputDir(self.path)  # created and probed for writing

    def send(self, case: WrittenCase) -> int:
        if Path(case.folder).resolve() == (self.path / case.name).resolve():
            return 0  # already there
        root = OutputDir(self.path)
        with root.case(case.name) as stage:
            shutil.copytree(case.folder, stage.path, dirs_exist_ok=True)
        return sum(1 for p in Path(case.folder).rglob("*") if p.is_file())


@register_sink("folder", "file")
def open_folder(address: str, **_: Any) -> FolderSink:
    return FolderSink(
        address[len("file://") :] if address.lower().startswith("file://") else address
    )
