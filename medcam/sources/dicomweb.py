"""Scans from a DICOMweb server: QIDO-RS to list a study's series, WADO-RS to fetch one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medcam.errors import InputError, OutputError, PacsError
from medcam.pacs import DicomWebConnection, http_errors
from medcam.sources.base import SeriesRef, Source, register_source

__all__ = ["DicomWebSource"]


def _value(row: dict, tag: str, default: Any = "") -> Any:
    values = row.get(tag, {}).get("Value") or []
    return values[0] if values else default


class DicomWebSource(DicomWebConnection, Source):
    """A DICOMweb service (``dicomweb-client``): QIDO-RS search, WADO-RS retrieve.

    Parameters
    ----------
    address:
        ``dicomweb+http(s)://host:port/prefix``; credentials come from the environment
        (:mod:`medcam.pacs`).
    timeout:
        Seconds for each HTTP request.
    """

    def __init__(
        self, address: str, *, timeout: float = 60.0, attempts: int = 3, env: Any = None
    ) -> None:
        self._connect(address, timeout=timeout, attempts=attempts, env=env)

    def series(self, study_uid: str | None = None) -> list[SeriesRef]:
        if not study_uid:
            raise InputError("Give the study to explain (--study StudyInstanceUID).")
        with http_errors(self.endpoint, "searching the study's series (QIDO-RS)"):
            rows = self.client.search_for_series(
                study_uid, fields=["Manufacturer", "SeriesDescription", "Modality"]
            )
        if not rows:
            raise InputError(f"{self.endpoint} holds no study {study_uid} (or it has no series).")
        refs = []
        for row in rows:
            count = _value(row, "00201209", None)
            refs.append(
                SeriesRef(
                    study_uid=study_uid,
                    series_uid=str(_value(row, "0020000E")),
                    modality=str(_value(row, "00080060")),
                    description=str(_value(row, "0008103E")),
                    instances=int(count) if count not in (None, "") else None,
                    manufacturer=str(_value(row, "00080070")),
                )
            )
        return refs

    def fetch(self, ref: SeriesRef, folder: Path) -> Path:
        import requests

        folder = Path(folder)

        def retrieve(media_types):
            n = 0
            for n, ds in enumerate(
                self.client.iter_series(ref.study_uid, ref.series_uid, media_types=media_types),
                start=1,
            ):
                try:
                    ds.save_as(folder / f"{n:05d}.dcm", enforce_file_format=True)
                except OSError as err:
                    raise OutputError(
                        f"Cannot keep the retrieved instances of {ref.label} in {folder} "
                        f"({err.strerror or err}); free space in the temporary folder (TMPDIR) "
                        "and retry."
                    ) from err
            return n

        with http_errors(self.endpoint, f"fetching {ref.label} (WADO-RS)"):
            try:
                count = retrieve(None)  # uncompressed (Explicit VR Little Endian)
            except requests.exceptions.HTTPError as err:
                if err.response is None or err.response.status_code not in (406, 415):
                    raise
                for p in folder.iterdir():
                    p.unlink()
                count = retrieve((("application/dicom", "*"),))  # as stored
        if ref.instances is not None and count < ref.instances:
            raise PacsError(
                f"{self.endpoint} gave {count} of the {ref.instances} instances of "
                f"{ref.label}; retry once the series is complete."
            )
        return folder

    def close(self) -> None:
        self.client._session.close()


@register_source("dicomweb+http", "dicomweb+https")
def open_dicomweb(address: str, **options: Any) -> DicomWebSource:
    return DicomWebSource(
        address, **{k: v for k, v in options.items() if k in ("timeout", "attempts", "env")}
    )
