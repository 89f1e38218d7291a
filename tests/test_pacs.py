"""Server addresses and credentials (no server needed)."""

from __future__ import annotations

import pytest

from medcam.errors import PacsError
from medcam.pacs import (
    DicomWebEndpoint,
    DimseEndpoint,
    _credentials,
    check_ae_title,
    dicomweb_client,
    is_remote,
    parse_endpoint,
)


def test_parse_endpoint():
    assert parse_endpoint("dicomweb+http://pacs:8042/dicom-web/") == DicomWebEndpoint(
        "http://pacs:8042/dicom-web"
    )
    assert parse_endpoint("dicomweb+https://pacs/wado").url == "https://pacs/wado"
    assert parse_endpoint("dimse://ORTHANC@10.0.0.5:4242") == DimseEndpoint(
        "ORTHANC", "10.0.0.5", 4242
    )
    assert is_remote("dimse://A@h:1") and is_remote("dicomweb+http://h")
    assert not is_remote("scans/ct") and not is_remote("http://h")
    for bad in ("http://pacs/dicom-web", "dimse://pacs:104", "dimse://AE@pacs",
                "dicomweb+http:///x", "dimse://AE@pacs:notaport"):  # fmt: skip
        with pytest.raises(PacsError):
            parse_endpoint(bad)


def test_no_credentials_in_urls():
    for url in ("dicomweb+http://user:pw@pacs/dicom-web", "dicomweb+http://user@pacs/dw"):
        with pytest.raises(PacsError, match="MEDCAM_DICOMWEB_TOKEN") as info:
            parse_endpoint(url)
        assert "pw" not in str(info.value)


def test_ae_titles():
    assert check_ae_title("MEDCAM") == "MEDCAM"
    for bad in ("", " ", "A" * 17, "A\\B", "Ä"):
        with pytest.raises(PacsError):
            check_ae_title(bad)


def test_credentials_from_environment_and_files(tmp_path):
    assert _credentials({}) == ({}, None)
    assert _credentials({"MEDCAM_DICOMWEB_TOKEN": "abc"}) == ({"Authorization": "Bearer abc"},
                                                              None)  # fmt: skip
    token = tmp_path / "token"
    token.write_text("from-file\n")
    headers, _ = _credentials({"MEDCAM_DICOMWEB_TOKEN_FILE": str(token)})
    assert headers == {"Authorization": "Bearer from-file"}
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    env = {"MEDCAM_DICOMWEB_USER": "u", "MEDCAM_DICOMWEB_PASSWORD_FILE": str(pw)}
    assert _credentials(env) == ({}, ("u", "secret"))
    client = dicomweb_client(DicomWebEndpoint("http://127.0.0.1:1/dw"), env=env)
    assert client._session.auth == ("u", "secret")
    conflicting = [
        {"MEDCAM_DICOMWEB_TOKEN": "a", "MEDCAM_DICOMWEB_TOKEN_FILE": str(token)},
        {"MEDCAM_DICOMWEB_TOKEN": "a", "MEDCAM_DICOMWEB_USER": "u",
         "MEDCAM_DICOMWEB_PASSWORD": "p"},
        {"MEDCAM_DICOMWEB_USER": "u"},
        {"MEDCAM_DICOMWEB_TOKEN_FILE": str(tmp_path / "missing")},
    ]  # fmt: skip
    for env in conflicting:
        with pytest.raises(PacsError) as info:
            _credentials(env)
        assert "a" != str(info.value)
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(PacsError, match="empty"):
        _credentials({"MEDCAM_DICOMWEB_TOKEN_FILE": str(empty)})


def test_cli_checks_before_any_work(tmp_path):
    from click.testing import CliRunner

    from medcam.cli import main

    runner = CliRunner()
    cases = [
        (["explain", "dicomweb+http://127.0.0.1:1/dw", "--bundle", str(tmp_path)], "--study"),
        (["explain", "dicomweb+http://127.0.0.1:1/dw", "--study", "1.2"], "Nothing would be kept"),
        (["explain", "dimse://A@h:1", "--study", "1.2", "--store", "--format", "png"],
         "has none"),
        (["explain", "dimse://A@h:1", "--study", "1.2", "--store", "--format", "dicom-pm,png"],
         "--out"),
        (["explain", "dimse://A@h:1", "--study", "1.2", "--store", "--store-to", "x"],
         "not both"),
        (["explain", str(tmp_path), "--study", "1.2", "--out", str(tmp_path)], "server inputs"),
        (["explain", str(tmp_path)], "--out"),
        (["explain", "dicomweb+http://u:pw@h/dw", "--study", "1.2", "--store"], "credentials"),
    ]  # fmt: skip
    for args, expected in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert "Traceback" not in result.output
