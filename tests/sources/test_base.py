"""Choosing the series of a study, and the folder source (no server needed)."""

from __future__ import annotations

import pytest

from medcam.errors import InputError, MedcamError
from medcam.sources import SeriesFilter, SeriesRef, open_source, source_kinds
from medcam.sources.dicomweb import DicomWebSource
from medcam.sources.dimse import DimseSource, received_file_name
from medcam.sources.folder import FolderSource

STUDY = [
    SeriesRef("1", "1.1", "CT", "abdomen venous", 120),
    SeriesRef("1", "1.2", "CT", "scout", 1),
    SeriesRef("1", "1.3", "SR", "dose report", 1),
    SeriesRef("1", "1.4", "OT", "medcam gradcam class1 overlay", 120, manufacturer="medcam"),
    SeriesRef("1", "1.5", "MR", "T1", 80),
    SeriesRef("1", "1.6", "OT", "medcam gradcam class1", 1),  # no Manufacturer reported
]


def test_default_filter_skips_results_and_non_images():
    chosen, skipped = SeriesFilter().select(STUDY)
    assert [r.series_uid for r in chosen] == ["1.1", "1.2", "1.5"]
    reasons = dict((r.series_uid, why) for r, why in skipped)
    assert reasons == {"1.3": "modality SR holds no images to explain", "1.4": "a medcam result",
                       "1.6": "a medcam result"}  # fmt: skip


def test_filters():
    chosen, _ = SeriesFilter(modalities=["ct"], description="venous").select(STUDY)
    assert [r.series_uid for r in chosen] == ["1.1"]
    chosen, _ = SeriesFilter(series_uids=["1.2"]).select(STUDY)
    assert [r.series_uid for r in chosen] == ["1.2"]
    with pytest.raises(InputError, match=r"1\.9"):
        SeriesFilter(series_uids=["1.9"]).select(STUDY)
    with pytest.raises(MedcamError, match="series-description"):
        SeriesFilter(description="(")
    # logs name series without patient data
    assert STUDY[0].label == "CT series ...1.1 (120 instances)"


def test_open_source_by_address(tmp_path):
    assert {"folder", "dicomweb+http", "dicomweb+https", "dimse"} <= set(source_kinds())
    assert isinstance(open_source(tmp_path), FolderSource)
    assert isinstance(open_source("dicomweb+http://127.0.0.1:1/dw"), DicomWebSource)
    assert isinstance(open_source("dimse://PACS@127.0.0.1:104", calling_ae="ME"), DimseSource)
    with pytest.raises(MedcamError, match="Unknown source"):
        open_source("ftp://x/y")
    with pytest.raises(MedcamError, match="move-port"):
        open_source("dimse://PACS@127.0.0.1:104", retrieve="move")


def test_folder_source_reads_in_place(phantom_cases, tmp_path):
    from medcam.runner import expand_inputs

    folder, _, _ = phantom_cases
    source = open_source(folder)
    source.check()
    refs = source.series()
    assert [r.path for r in refs] == expand_inputs([folder])
    assert source.fetch(refs[0], tmp_path) == refs[0].path  # nothing copied
    assert not list(tmp_path.iterdir())
    with pytest.raises(InputError):
        open_source(tmp_path / "missing").check()


def test_received_file_names_are_safe():
    assert received_file_name("1.2.840.1") == "1.2.840.1.dcm"
    name = received_file_name("../../etc/passwd")
    assert "/" not in name and name.endswith(".dcm") and not name.startswith(".")
