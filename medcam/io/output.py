"""Safe output: checked folders, sanitised names, atomic writes, inputs never replaced."""

from __future__ import annotations

import contextlib
import glob
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
        self.final: Path | None = None  # set on a case's staging folder

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

    def _refuse_input_folder(self, final: Path) -> None:
        resolved = final.resolve()
        if any(resolved == q or resolved in q.parents for q in self._inputs):
            raise OutputError(
                f"Refusing to replace {final}: it holds input files. Choose another output "
                "folder or case name."
            )

    def _sweep(self, name: str) -> None:
        """Remove what killed writers left for ``name``: staging folders whose process is gone
        and replaced folders not yet deleted."""
        for p in self.path.glob(f".{glob.escape(name)}.*-*"):
            kind, _, rest = p.name[len(name) + 2 :].partition("-")
            if kind == "old" or (kind == "tmp" and not _alive(rest.split("-")[0])):
                shutil.rmtree(p, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _swap_in(self, tmp: Path, final: Path) -> None:
        """Make ``tmp`` be ``final`` (replacing a previous ``final`` as a whole), under a lock
        so that two writers of one name never interleave their renames."""
        old = None
        with _locked(self.path):
            if final.exists() or final.is_symlink():
                old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(final, old)
            os.replace(tmp, final)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()

    def _staging(self, name: str) -> Path:
        return self.path / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    @contextlib.contextmanager
    def folder(self, name: str) -> Iterator[Path]:
        """Yield a temporary folder; on success it replaces folder ``name`` as a whole."""
        final = self.target(name)
        self._refuse_input_folder(final)
        tmp = self._staging(name)
        tmp.mkdir()
        try:
            yield tmp
            self._swap_in(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.written.append(final)

    @contextlib.contextmanager
    def case(self, name: str) -> Iterator[OutputDir]:
        """A case as a transaction: every output of case ``name`` appears together, or none.

        Yields an :class:`OutputDir` on a hidden staging folder beside ``name``; write the
        case's files there. When the block ends without an exception, the staging folder
        replaces folder ``name`` with one rename (a previous ``name`` is replaced as a whole, so
        outputs of an earlier run never mix with this one's); on an exception it is deleted and
        ``name`` stays as it was. Staging folders of killed processes are removed on the next
        write of the same case.

        Use :meth:`final_path` on the staging folder's paths to report where files will be.
        """
        final = self.target(name)
        self._refuse_input_folder(final)
        self._sweep(name)
        tmp = self._staging(name)
        try:
            tmp.mkdir()
        except OSError as err:
            raise OutputError(f"Cannot create a folder in {self.path}: {err}") from err
        stage = OutputDir(tmp, ())
        stage._inputs = self._inputs
        stage.final = final
        try:
            yield stage
            self._swap_in(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.written.append(final)

    def final_path(self, path: Path) -> Path:
        """Where ``path`` (written in this staging folder) is once the case is committed."""
        if self.final is None:
            return Path(path)
        return self.final / Path(path).relative_to(self.path)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` itself for the block (no lock file is left);
    a no-op where ``fcntl`` does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
