"""Results to a DICOMweb server with STOW-RS, into the source's study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medcam.errors import PacsError
from medcam.pacs import DicomWebConnection, http_errors
from medcam.sinks.base import Sink, WrittenCase, register_sink

__all__ = ["StowSink"]


class StowSink(DicomWebConnection, Sink):
    """STOW-RS each derived series of a case (one request per series) to a DICOMweb service.

    The server's answer is checked instance by instance (every SOP Instance UID listed as
    stored, none failed); the case counts as delivered only when every series is.
    """

    def __init__(
        self, address: str, *, timeout: float = 120.0, attempts: int = 3, env: Any = None
    ) -> None:
        self._connect(address, timeout=timeout, attempts=attempts, env=env)

    def send(self, case: WrittenCase) -> int:
        groups = case.dicom_series()
        stored = 0
        for n, files in enumerate(groups):
            try:
                stored += self._store_series(files, case.study_uid)
            except PacsError as err:
                raise PacsError(
                    f"{err} Stored {n} of the {len(groups)} result series of case "
                    f"{case.name} before that; retry to store the rest (the same "
                    "UIDs are sent again, so nothing is stored twice)."
                ) from err
        return stored

    def _store_series(self, files: list[Path], study_uid: str) -> int:
        import pydicom

        datasets = [pydicom.dcmread(p) for p in files]
        with http_errors(self.endpoint, "storing results (STOW-RS)"):
            answer = self.client.store_instances(datasets, study_instance_uid=study_uid or None)
        failed = list(answer.get("FailedSOPSequence", []) or [])
        done = {
            str(item.ReferencedSOPInstanceUID)
            for item in answer.get("ReferencedSOPSequence", []) or []
        }
        missing = [ds.SOPInstanceUID for ds in datasets if ds.SOPInstanceUID not in done]
        if failed or missing:
            reasons = {hex(int(item.get("FailureReason", 0))) for item in failed}
            raise PacsError(
                f"{self.endpoint} did not store {len(failed) or len(missing)} of "
                f"{len(datasets)} result instances (failure reasons {sorted(reasons)})."
            )
        return len(datasets)

    def close(self) -> None:
        self.client._session.close()


@register_sink("dicomweb+http", "dicomweb+https")
def open_stow(address: str, **options: Any) -> StowSink:
    return StowSink(
        address, **{k: v for k, v in options.items() if k in ("timeout", "attempts", "env")}
    )
