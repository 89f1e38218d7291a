"""Results to a DIMSE peer (a PACS) with C-STORE."""

from __future__ import annotations

from typing import Any

from medcam.errors import PacsError
from medcam.pacs import DEFAULT_AE_TITLE, DimseEndpoint, associate, check_status, parse_endpoint
from medcam.sinks.base import Sink, WrittenCase, register_sink

__all__ = ["CStoreSink"]


class CStoreSink(Sink):
    """C-STORE every derived instance of a case on one association, each status checked."""

    def __init__(
        self, address: str, *, calling_ae: str = DEFAULT_AE_TITLE, timeout: float = 60.0
    ) -> None:
        endpoint = parse_endpoint(address)
        if not isinstance(endpoint, DimseEndpoint):
            raise PacsError(f"{address!r} is not a DIMSE address.")
        self.endpoint, self.calling_ae, self.timeout = endpoint, calling_ae, timeout
        self.address = str(endpoint)

    def check(self) -> None:
        from pynetdicom.sop_class import Verification

        assoc = associate(
            self.endpoint,
            self.calling_ae,
            [(Verification, None)],
            what="checking the connection (C-ECHO)",
            timeout=self.timeout,
        )
        try:
            check_status(assoc.send_c_echo(), self.endpoint, "C-ECHO")
        finally:
            assoc.release()

    def send(self, case: WrittenCase) -> int:
        import pydicom

        files = [p for group in case.dicom_series() for p in group]
        if not files:
            return 0
        contexts: dict[str, set[str]] = {}
        for p in files:
            meta = pydicom.dcmread(p, stop_before_pixels=True).file_meta
            contexts.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(
                str(meta.TransferSyntaxUID)
            )
        assoc = associate(
            self.endpoint,
            self.calling_ae,
            [(c, sorted(ts)) for c, ts in contexts.items()],
            what=f"storing the results of case {case.name} (C-STORE)",
            timeout=self.timeout,
        )
        stored = 0
        try:
            for p in files:
                what = f"storing result {stored + 1} of {len(files)} of case {case.name} (C-STORE)"
                try:
                    status = self._store(assoc, p) if assoc.is_established else None
                    check_status(status, self.endpoint, what)
                except (RuntimeError, ValueError, PacsError) as err:
                    reason = str(err)
                    if not isinstance(err, PacsError):  # e.g. no accepted presentation context
                        reason = f"{self.endpoint} cannot take {p.name}: {err}."
                    raise PacsError(
                        f"{reason} {stored} of {len(files)} results were stored before that; "
                        "retry to store the rest (the same UIDs are sent again, so nothing is "
                        "stored twice)."
                    ) from err
                stored += 1
        finally:
            if assoc.is_established:
                assoc.release()
        return stored

    def _store(self, assoc, path):
        return assoc.send_c_store(path)


@register_sink("dimse")
def open_cstore(address: str, **options: Any) -> CStoreSink:
    keys = ("calling_ae", "timeout")
    return CStoreSink(address, **{k: v for k, v in options.items() if k in keys})
