"""Safe output: checked folders, sanitised names, atomic writes, inputs never replaced."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from medcam.errors import OutputError

__all__ = ["OutputDir", "safe_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, max_len: int = 64) -> str:
    """A file-name component made from arbitrary text (e.g. a DICOM tag value).

    Only ``A-Z a-z 0-9 . _ -`` survive (anything else becomes ``_``); leading dots are
    dropped, so ``"../x"`` cannot leave the output folder or hide a file.

    >>> safe_name("../../etc/passwd")
    'etc_passwd'
    """
    cleaned = _UNSAFE.sub("_", str(text)).strip("._-")
    cleaned = re.sub(r"\.{2,}", "_", cleaned)[:max_len].strip("._-")
    return cleaned or "unnamed"


class OutputDir:
    """An output folder checked up front, whose files are written atomically.

    Parameters
    ----------
    path:
        Folder to write into; created if missing.
    inputs:
        Files that were read; writing to any of them raises :class:`OutputError`.

    Raises
    ------
    OutputError
        If the folder cannot be created or written to (checked before any work is done).
    """

    def __init__(self, path: str | Path, inputs: Iterable[Path] = ()) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".medcam-probe-"):
                pass
        except OSError as err:
            raise OutputError(
                f"Cannot write to the output folder {self.path} ({err.strerror or err}). "
                "Choose a folder you can write to, or fix its permissions."
            ) from err
        self._inputs = {Path(p).resolve() for p in inputs}
        self.written: list[Path] = []

    def target(self, name: str) -> Path:
        """Path of output ``name`` inside the folder, checked to stay inside and spare inputs."""
        if Path(name).name != name or name in ("", ".", ".."):
            raise OutputError(f"Output name {name!r} must be a plain file name.")
        path = self.path / name
        if path.resolve() in self._inputs:
            raise OutputError(
                f"Refusing to write {path}: it is one of the input files. Choose another "
                "output folder."
            )
        return path

    def write_file(self, name: str, write: Callable[[Path], None]) -> Path:
        """Call ``write(tmp_path)``, then rename the temporary file to ``name`` atomically."""
        final = self.target(name)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            write(tmp)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.written.append(final)
        return final

    @contextlib.contextmanager
    def folder(self, name: str) -> Iterator[Path]:
        """Yield a temporary folder; on success it replaces folder ``name`` as a whole."""
        final = self.target(name)
        if final.resolve() in {p.parent for p in self._inputs}:
            raise OutputError(f"Refusing to replace {final}: it holds input files.")
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            yield tmp
            if final.exists():
                old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.written.append(final)
