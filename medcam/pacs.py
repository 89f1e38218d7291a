"""DICOM servers: addresses, credentials, connections and clear errors (DICOMweb and DIMSE).

Sources (:mod:`medcam.sources`) and sinks (:mod:`medcam.sinks`) name servers the same way:

- ``dicomweb+http://host:8042/dicom-web`` (or ``dicomweb+https://...``): a DICOMweb service
  (QIDO-RS / WADO-RS / STOW-RS), reached with ``dicomweb-client``.
- ``dimse://AE_TITLE@host:104``: a DIMSE peer (C-ECHO, C-FIND, C-GET / C-MOVE, C-STORE),
  reached with ``pynetdicom``; medcam's own (calling) AE title is an option.

Credentials never appear on a command line or in a URL. For DICOMweb they come from the
environment: ``MEDCAM_DICOMWEB_TOKEN`` (bearer token) or ``MEDCAM_DICOMWEB_TOKEN_FILE`` (a file
holding it), or ``MEDCAM_DICOMWEB_USER`` with ``MEDCAM_DICOMWEB_PASSWORD`` /
``MEDCAM_DICOMWEB_PASSWORD_FILE`` (HTTP basic). ``REQUESTS_CA_BUNDLE`` names a CA bundle for
``https`` with an in-house certificate authority.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medcam.errors import PacsError

__all__ = [
    "DEFAULT_AE_TITLE",
    "DicomWebEndpoint",
    "DimseEndpoint",
    "associate",
    "check_ae_title",
    "dicomweb_client",
    "http_errors",
    "is_remote",
    "parse_endpoint",
]

DEFAULT_AE_TITLE = "MEDCAM"
TOKEN_ENV, TOKEN_FILE_ENV = "MEDCAM_DICOMWEB_TOKEN", "MEDCAM_DICOMWEB_TOKEN_FILE"
USER_ENV, PASSWORD_ENV = "MEDCAM_DICOMWEB_USER", "MEDCAM_DICOMWEB_PASSWORD"
PASSWORD_FILE_ENV = "MEDCAM_DICOMWEB_PASSWORD_FILE"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable chars, no backslash


@dataclass(frozen=True)
class DicomWebEndpoint:
    """A DICOMweb service root, e.g. ``http://pacs:8042/dicom-web``."""

    url: str

    def __str__(self) -> str:
        return f"dicomweb+{self.url}"


@dataclass(frozen=True)
class DimseEndpoint:
    """A DIMSE peer: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"dimse://{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(title: str, what: str = "AE title") -> str:
    """``title`` if it is a valid DICOM AE title (1-16 characters, no backslash)."""
    if not _AE_RE.match(title or "") or not title.strip():
        raise PacsError(f"{what} {title!r} is not a DICOM AE title (1-16 printable characters).")
    return title


def is_remote(text: str | os.PathLike) -> bool:
    """True for a ``dicomweb+http(s)://`` or ``dimse://`` address (not a file path)."""
    return isinstance(text, str) and text.lower().startswith(("dicomweb+", "dimse://"))


def parse_endpoint(text: str) -> DicomWebEndpoint | DimseEndpoint:
    """The server named by ``text`` (see the module docstring for the forms).

    Raises
    ------
    PacsError
        An unknown scheme, a missing host or port, or a password in the URL (credentials come
        from the environment, never from the command line).
    """
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("dicomweb+http", "dicomweb+https"):
        if parts.password is not None or parts.username is not None:
            raise PacsError(
                "Do not put credentials in the DICOMweb URL (they would show in process lists "
                f"and shell history); set {TOKEN_ENV} / {TOKEN_FILE_ENV} or {USER_ENV} + "
                f"{PASSWORD_ENV} / {PASSWORD_FILE_ENV} instead."
            )
        if not parts.hostname:
            raise PacsError(f"{text!r} names no host; e.g. dicomweb+http://pacs:8042/dicom-web")
        url = f"{scheme.split('+', 1)[1]}://{parts.netloc}{parts.path.rstrip('/')}"
        return DicomWebEndpoint(url)
    if scheme == "dimse":
        if parts.password is not None:
            raise PacsError(f"{text!r}: DIMSE has no passwords; use dimse://AE_TITLE@host:port.")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.username or not parts.hostname or port is None:
            raise PacsError(
                f"{text!r} must look like dimse://AE_TITLE@host:port (the peer's AE title, "
                "host and DICOM port), e.g. dimse://ORTHANC@127.0.0.1:4242."
            )
        return DimseEndpoint(
            check_ae_title(parts.username, "The peer's AE title"), parts.hostname, port
        )
    raise PacsError(
        f"{text!r} is not a DICOM server address; use dicomweb+http(s)://host:port/prefix or "
        "dimse://AE_TITLE@host:port."
    )


# -- DICOMweb ----------------------------------------------------------------------------------


def _read_secret_file(path: str, env_name: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as err:
        raise PacsError(f"Cannot read {env_name}={path} ({err.strerror or err}).") from err
    if not value:
        raise PacsError(f"{env_name}={path} is empty.")
    return value


def _credentials(env: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, str] | None]:
    """(headers, basic-auth pair) from the environment; see the module docstring."""
    token = env.get(TOKEN_ENV) or None
    if env.get(TOKEN_FILE_ENV):
        if token:
            raise PacsError(f"Set {TOKEN_ENV} or {TOKEN_FILE_ENV}, not both.")
        token = _read_secret_file(env[TOKEN_FILE_ENV], TOKEN_FILE_ENV)
    user = env.get(USER_ENV) or None
    password = env.get(PASSWORD_ENV) or None
    if env.get(PASSWORD_FILE_ENV):
        if password:
            raise PacsError(f"Set {PASSWORD_ENV} or {PASSWORD_FILE_ENV}, not both.")
        password = _read_secret_file(env[PASSWORD_FILE_ENV], PASSWORD_FILE_ENV)
    if token and (user or password):
        raise PacsError(f"Give a bearer token ({TOKEN_ENV}) or basic auth ({USER_ENV}), not both.")
    if (user is None) != (password is None):
        raise PacsError(f"Basic auth needs both {USER_ENV} and {PASSWORD_ENV} (or its _FILE).")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return headers, ((user, password) if user and password else None)


def dicomweb_client(
    endpoint: DicomWebEndpoint,
    *,
    timeout: float = 60.0,
    attempts: int = 3,
    env: Mapping[str, str] | None = None,
):
    """A ``dicomweb_client.DICOMwebClient`` for ``endpoint`` with the environment's credentials.

    ``timeout`` (seconds) bounds every request, so a server that stops answering gives an error
    instead of a hung job; a request that cannot connect or gets 429/503/504 is tried
    ``attempts`` times (waits of 1, 2, 4 ... s) before the error.
    """
    import requests
    from dicomweb_client import DICOMwebClient

    headers, basic = _credentials(os.environ if env is None else env)
    session = requests.Session()
    if basic is not None:
        session.auth = basic
    session.headers.update(headers)
    client = DICOMwebClient(endpoint.url, session=session, timeout=timeout)
    client.set_http_retry_params(max_attempts=max(1, attempts), wait_exponential_multiplier=500)
    return client


@contextlib.contextmanager
def http_errors(endpoint: DicomWebEndpoint, what: str) -> Iterator[None]:
    """Turn ``requests`` failures during ``what`` into :class:`PacsError` messages that say what
    to check (no credentials or patient data in them)."""
    import requests

    try:
        yield
    except requests.exceptions.Timeout as err:
        raise PacsError(
            f"The DICOMweb server {endpoint} did not answer in time while {what}. Check that it "
            "runs and is not overloaded, then retry."
        ) from err
    except requests.exceptions.ConnectionError as err:
        raise PacsError(
            f"Cannot reach the DICOMweb server {endpoint} while {what} (connection refused, "
            "reset or no route). Check the address and that the server runs, then retry."
        ) from err
    except requests.exceptions.HTTPError as err:
        code = err.response.status_code if err.response is not None else 0
        if code in (401, 403):
            raise PacsError(
                f"The DICOMweb server {endpoint} refused the credentials (HTTP {code}) while "
                f"{what}. Set {TOKEN_ENV} / {TOKEN_FILE_ENV} (bearer token) or {USER_ENV} + "
                f"{PASSWORD_ENV} / {PASSWORD_FILE_ENV} (basic auth) to an account that may "
                "read and store."
            ) from err
        if code == 404:
            raise PacsError(
                f"{endpoint}: not found (HTTP 404) while {what}. Check the URL "
                "prefix (e.g. /dicom-web) and the UIDs."
            ) from err
        raise PacsError(
            f"The DICOMweb server {endpoint} answered HTTP {code} while {what}."
        ) from err
    except requests.exceptions.RequestException as err:
        raise PacsError(f"DICOMweb request to {endpoint} failed while {what}: {err}") from err


class DicomWebConnection:
    """A DICOMweb service's endpoint and ``dicomweb-client`` session, shared by the DICOMweb
    source (QIDO/WADO-RS) and sink (STOW-RS): the address checked, the client made with the
    environment's credentials, and a connection check."""

    endpoint: DicomWebEndpoint
    address: str

    def _connect(self, address: str, *, timeout: float, attempts: int, env: Any) -> None:
        endpoint = parse_endpoint(address)
        if not isinstance(endpoint, DicomWebEndpoint):
            raise PacsError(f"{address!r} is not a DICOMweb address.")
        self.endpoint = endpoint
        self.address = str(endpoint)
        self.client = dicomweb_client(endpoint, timeout=timeout, attempts=attempts, env=env)

    def check(self) -> None:
        with http_errors(self.endpoint, "checking the connection (QIDO-RS)"):
            self.client.search_for_studies(limit=1)


# -- DIMSE -------------------------------------------------------------------------------------


def associate(
    endpoint: DimseEndpoint,
    calling_ae: str,
    contexts: Sequence[Any],
    *,
    what: str,
    ext_neg: Sequence[Any] | None = None,
    handlers: Sequence[Any] | None = None,
    timeout: float = 30.0,
):
    """An established pynetdicom association with ``endpoint`` proposing ``contexts``
    (``(abstract_syntax, [transfer_syntaxes] | None)`` pairs); raises :class:`PacsError` when
    the peer cannot be reached or rejects medcam's AE title."""
    from pynetdicom import AE

    ae = AE(ae_title=check_ae_title(calling_ae, "medcam's AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    for abstract, syntaxes in contexts:
        if syntaxes:
            ae.add_requested_context(abstract, list(syntaxes))
        else:
            ae.add_requested_context(abstract)
    assoc = ae.associate(
        endpoint.host,
        endpoint.port,
        ae_title=endpoint.ae_title,
        ext_neg=list(ext_neg or []) or None,
        evt_handlers=list(handlers or []) or None,
    )
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise PacsError(
            f"The DICOM peer {endpoint} rejected the association from AE title {calling_ae!r} "
            f"while {what}. Ask its administrator to register {calling_ae!r} (host, port) and "
            "allow it this operation, or check the peer's AE title."
        )
    raise PacsError(
        f"Cannot reach the DICOM peer {endpoint} while {what} (no association: refused, timed "
        "out or aborted). Check the host, port and that the peer runs, then retry."
    )


def check_status(status: Any, endpoint: DimseEndpoint, what: str) -> int:
    """The DIMSE status code of ``status``; raises :class:`PacsError` on failure or when the
    association broke (empty status)."""
    if status is None or "Status" not in status:
        raise PacsError(
            f"The DICOM peer {endpoint} went away while {what} (association aborted or timed "
            "out). Nothing is marked done; retry once the peer is back."
        )
    code = int(status.Status)
    if code in (0x0000, 0xFF00, 0xFF01) or 0xB000 <= code <= 0xBFFF:  # success, pending, warning
        return code
    comment = str(status.get("ErrorComment", "")).strip()
    raise PacsError(
        f"The DICOM peer {endpoint} refused {what} (status 0x{code:04X}"
        f"{': ' + comment if comment else ''})."
    )
