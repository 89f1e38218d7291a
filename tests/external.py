"""External tools some tests need (dciodvfy, Orthanc, Chromium, Node packages).

``.ci/run`` installs them and sets ``MEDCAM_TEST_STRICT=1``: there, a missing tool fails the
test, so a green CI run cannot hide a missing install step. Elsewhere (a developer's machine
after only the README's test command) such a test is skipped, with the command that installs
the tool as the reason.
"""

from __future__ import annotations

import os
import shutil

import pytest

STRICT = os.environ.get("MEDCAM_TEST_STRICT", "") not in ("", "0")

INSTALL_HINT = {
    "dciodvfy": "apt-get install -y dicom3tools",
    "Orthanc": "apt-get install -y orthanc orthanc-dicomweb",
    "chromium": "apt-get install -y chromium",
    "node": "install Node.js 20",
}


def require_tool(name: str, hint: str | None = None) -> str:
    """The path of executable ``name``; skip the test (fail under ``MEDCAM_TEST_STRICT``)."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed ({hint or INSTALL_HINT.get(name, 'see .ci/run')})")
    return path  # type: ignore[return-value]


def missing(reason: str) -> None:
    """Skip with ``reason``, or fail when CI requires every external tool."""
    if STRICT:
        pytest.fail(f"{reason}; .ci/run installs it (MEDCAM_TEST_STRICT=1)")
    pytest.skip(reason)
