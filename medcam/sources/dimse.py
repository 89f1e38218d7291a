"""Scans from a DIMSE peer (a classic PACS): C-FIND for a study's series, then C-GET or C-MOVE.

C-GET brings the images back on medcam's own association (nothing to configure on the PACS
beyond allowing medcam's AE title). C-MOVE is what most PACS allow: the PACS opens a second
association to medcam's storage port, so it must know medcam's AE title, host and port (the
same entry a routing rule to ``medcam listen`` uses).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from medcam.errors import InputError, PacsError
from medcam.pacs import DEFAULT_AE_TITLE, DimseEndpoint, associate, check_status, parse_endpoint
from medcam.sources.base import SeriesRef, Source, register_source

__all__ = ["IMAGE_STORAGE_CLASSES", "DimseSource", "received_file_name"]

# Image storage SOP classes medcam asks for on a C-GET (a request holds at most 128 presentation
# contexts, so not every storage class fits).
IMAGE_STORAGE_CLASSES = (
    "CTImageStorage",
    "EnhancedCTImageStorage",
    "LegacyConvertedEnhancedCTImageStorage",
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "LegacyConvertedEnhancedMRImageStorage",
    "PositronEmissionTomographyImageStorage",
    "EnhancedPETImageStorage",
    "LegacyConvertedEnhancedPETImageStorage",
    "NuclearMedicineImageStorage",
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing",
    "BreastTomosynthesisImageStorage",
    "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage",
    "XRayAngiographicImageStorage",
    "XRayRadiofluoroscopicImageStorage",
    "XRay3DAngiographicImageStorage",
    "RTImageStorage",
    "SecondaryCaptureImageStorage",
)
_UID = re.compile(r"^[0-9.]{1,64}$")


def _storage_classes() -> list[str]:
    import pynetdicom.sop_class as sop

    return [getattr(sop, n) for n in IMAGE_STORAGE_CLASSES if hasattr(sop, n)]


def received_file_name(sop_instance_uid: str) -> str:
    """A safe file name for a received instance (its UID, checked to be a UID)."""
    import hashlib

    uid = str(sop_instance_uid)
    if _UID.match(uid):
        return f"{uid}.dcm"
    return f"{hashlib.sha256(uid.encode()).hexdigest()[:32]}.dcm"


class DimseSource(Source):
    """A DIMSE peer: C-FIND (study root, SERIES level), then C-GET (default) or C-MOVE.

    Parameters
    ----------
    address:
        ``dimse://AE_TITLE@host:port`` of the peer.
    calling_ae:
        medcam's AE title (the PACS must know it).
    retrieve:
        ``"get"`` (C-GET) or ``"move"`` (C-MOVE to ``calling_ae``, received on ``move_port``).
    move_port:
        Local port the PACS sends C-MOVE results to (its entry for ``calling_ae``).
    timeout:
        Seconds for connecting and for each DIMSE message.
    """

    def __init__(
        self,
        address: str,
        *,
        calling_ae: str = DEFAULT_AE_TITLE,
        retrieve: str = "get",
        move_port: int | None = None,
        timeout: float = 60.0,
    ) -> None:
        endpoint = parse_endpoint(address)
        if not isinstance(endpoint, DimseEndpoint):
            raise PacsError(f"{address!r} is not a DIMSE address.")
        if retrieve not in ("get", "move"):
            raise PacsError(f"retrieve must be 'get' or 'move', not {retrieve!r}.")
        if retrieve == "move" and not move_port:
            raise PacsError("C-MOVE needs the local port the PACS sends to (--move-port).")
        self.endpoint, self.calling_ae, self.retrieve = endpoint, calling_ae, retrieve
        self.move_port, self.timeout = move_port, timeout
        self.address = str(endpoint)

    def _associate(self, contexts, what: str, **kwargs):
        return associate(
            self.endpoint, self.calling_ae, contexts, what=what, timeout=self.timeout, **kwargs
        )

    def check(self) -> None:
        from pynetdicom.sop_class import Verification

        assoc = self._associate([(Verification, None)], "checking the connection (C-ECHO)")
        try:
            check_status(assoc.send_c_echo(), self.endpoint, "C-ECHO")
        finally:
            assoc.release()

    def series(self, study_uid: str | None = None) -> list[SeriesRef]:
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as Find

        if not study_uid:
            raise InputError("Give the study to explain (--study StudyInstanceUID).")
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        for keyword in (
            "SeriesInstanceUID",
            "Modality",
            "SeriesDescription",
            "Manufacturer",
            "NumberOfSeriesRelatedInstances",
        ):
            setattr(query, keyword, "")
        what = "searching the study's series (C-FIND)"
        assoc = self._associate([(Find, None)], what)
        refs = []
        try:
            for status, ident in assoc.send_c_find(query, Find):
                check_status(status, self.endpoint, what)
                if ident is None or "SeriesInstanceUID" not in ident:
                    continue
                count = ident.get("NumberOfSeriesRelatedInstances")
                refs.append(
                    SeriesRef(
                        study_uid=study_uid,
                        series_uid=str(ident.SeriesInstanceUID),
                        modality=str(ident.get("Modality", "") or ""),
                        description=str(ident.get("SeriesDescription", "") or ""),
                        instances=int(count) if count not in (None, "") else None,
                        manufacturer=str(ident.get("Manufacturer", "") or ""),
                    )
                )
        finally:
            assoc.release()
        if not refs:
            raise InputError(f"{self.endpoint} holds no study {study_uid} (or it has no series).")
        return refs

    def _query(self, ref: SeriesRef):
        from pydicom import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = ref.study_uid
        query.SeriesInstanceUID = ref.series_uid
        return query

    def fetch(self, ref: SeriesRef, folder: Path) -> Path:
        folder = Path(folder)
        lock = threading.Lock()
        received: list[str] = []

        def on_store(event) -> int:
            name = received_file_name(event.request.AffectedSOPInstanceUID)
            with lock, open(folder / name, "wb") as f:
                f.write(event.encoded_dataset())
                received.append(name)
            return 0x0000

        if self.retrieve == "get":
            final = self._get(ref, on_store)
        else:
            final = self._move(ref, on_store)
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        if failed or not received:
            raise PacsError(
                f"{self.endpoint} sent {len(received)} instances of {ref.label}, {failed} failed "
                f"(C-{self.retrieve.upper()}). Check that the peer may send these images to "
                f"{self.calling_ae!r}, then retry."
            )
        if ref.instances is not None and len(received) < ref.instances:
            raise PacsError(
                f"{self.endpoint} sent {len(received)} of {ref.instances} instances "
                f"of {ref.label}; retry once the series is complete."
            )
        return folder

    def _get(self, ref: SeriesRef, on_store):
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get

        classes = _storage_classes()
        what = f"fetching {ref.label} (C-GET)"
        assoc = self._associate(
            [(Get, None), *[(c, None) for c in classes]],
            what,
            ext_neg=[build_role(c, scp_role=True) for c in classes],
            handlers=[(evt.EVT_C_STORE, on_store)],
        )
        try:
            final = None
            for status, _ in assoc.send_c_get(self._query(ref), Get):
                check_status(status, self.endpoint, what)
                final = status
            return check_final(final, self.endpoint, what)
        finally:
            assoc.release()

    def _move(self, ref: SeriesRef, on_store):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as Move

        what = f"fetching {ref.label} (C-MOVE to {self.calling_ae} on port {self.move_port})"
        scp = AE(ae_title=self.calling_ae)
        scp.supported_contexts = AllStoragePresentationContexts
        try:
            server = scp.start_server(
                ("0.0.0.0", int(self.move_port)),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, on_store)],
            )
        except OSError as err:
            raise PacsError(f"Cannot listen on port {self.move_port} for C-MOVE: {err}") from err
        try:
            assoc = self._associate([(Move, None)], what)
            try:
                final = None
                for status, _ in assoc.send_c_move(self._query(ref), self.calling_ae, Move):
                    check_status(status, self.endpoint, what)
                    final = status
                return check_final(final, self.endpoint, what)
            finally:
                assoc.release()
        finally:
            server.shutdown()


def check_final(status, endpoint: DimseEndpoint, what: str):
    """The last status of a C-GET / C-MOVE, checked to be there."""
    if status is None:
        raise PacsError(f"The DICOM peer {endpoint} gave no answer while {what}; retry.")
    return status


@register_source("dimse")
def open_dimse(address: str, **options: Any) -> DimseSource:
    keys = ("calling_ae", "retrieve", "move_port", "timeout")
    return DimseSource(address, **{k: v for k, v in options.items() if k in keys})
