"""A case is a transaction: all its outputs appear together or none do, never mixed."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medcam
from medcam.io.output import OutputDir
from medcam.writers import registry
from tests.conftest import IntensityCAM


@pytest.fixture
def explanation(tmp_path):
    scan = tmp_path / "scan.nii.gz"
    data = np.zeros((8, 7, 6), np.float32)
    data[2, 3, 4] = 1.0
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), scan)
    return medcam.explain_scan(IntensityCAM().eval(), scan, target=0, layers="conv")


@pytest.fixture
def failing_format():
    """A registered format that fails like a full disk, after other formats were written."""

    @registry.register_format("test-disk-full", order=55, description="fails")
    def write(out):
        out.folder.write_file("partial.bin", lambda p: p.write_bytes(b"x"))
        raise OSError(errno.ENOSPC, "No space left on device")

    yield "test-disk-full"
    registry._FORMATS.pop("test-disk-full")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_failure_mid_case_writes_nothing_and_keeps_the_previous_result(
    tmp_path, explanation, failing_format
):
    out = tmp_path / "out"
    first = medcam.write_outputs(explanation, out, ["nifti", "json"], case="c1")
    case = first["nifti"][0].parent
    before = _tree(case)
    with pytest.raises(OSError, match="No space left"):
        medcam.write_outputs(explanation, out, ["nifti", "png", failing_format, "json"], case="c1")
    assert _tree(case) == before  # the previous run's outputs, untouched
    assert sorted(p.name for p in out.iterdir()) == ["c1"]  # no staging folder left
    with pytest.raises(OSError):
        medcam.write_outputs(explanation, out, ["nifti", failing_format], case="c2")
    assert not (out / "c2").exists()


def test_rerun_replaces_the_case_as_a_whole(tmp_path, explanation):
    out = tmp_path / "out"
    medcam.write_outputs(explanation, out, ["nifti", "png", "json"], case="c")
    again = medcam.write_outputs(explanation, out, ["nifti", "json"], case="c")
    names = sorted(p.name for p in (out / "c").iterdir())
    assert names == sorted(p.name for paths in again.values() for p in paths)
    assert not any(n.endswith(".png") for n in names)  # nothing stale from the first run
    sidecar = json.loads(again["json"][0].read_text())
    assert sorted(sidecar["outputs"]["files"]) == ["nifti"]


def test_dicom_format_for_nifti_input_is_refused_before_anything(tmp_path, explanation):
    out = tmp_path / "out"
    for fmt in ("dicom-pm", "dicom-seg", "dicom-sc"):
        with pytest.raises(medcam.MedcamError, match="nifti"):
            medcam.write_outputs(explanation, out, ["nifti", fmt], case="c")
    assert not out.exists() or not any(out.iterdir())


def _writer(out: str, scan: str, tag: int, rounds: int, errors) -> None:
    ex = medcam.explain_scan(IntensityCAM().eval(), scan, target=0, layers="conv")
    formats = ["nifti", "json"] if tag == 0 else ["json"]
    for _ in range(rounds):
        try:
            medcam.write_outputs(ex, out, formats, case="shared")
        except Exception as err:  # reported to the parent
            errors.put(f"{type(err).__name__}: {err}")


@pytest.mark.slow
def test_two_concurrent_writers_never_mix_or_fail(tmp_path, explanation):
    out = tmp_path / "out"
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    scan = str(explanation.scan.source)
    procs = [ctx.Process(target=_writer, args=(str(out), scan, t, 20, errors)) for t in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert errors.empty(), errors.get()
    names = sorted(p.name for p in (out / "shared").iterdir())
    record = json.loads((out / "shared" / "shared.json").read_text())
    listed = sorted(n for files in record["outputs"]["files"].values() for n in files)
    assert names == sorted([*listed, "shared.json"])  # exactly one writer's complete set
    assert sorted(p.name for p in out.iterdir()) == ["shared"]  # nothing left behind


def _slow_case(out: str, started) -> None:
    with OutputDir(out).case("k") as stage:
        stage.write_file("a.txt", lambda p: p.write_text("a"))
        started.set()
        time.sleep(60)


def test_a_killed_writer_leaves_nothing_visible_and_is_swept(tmp_path, explanation):
    out = tmp_path / "out"
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_slow_case, args=(str(out), started))
    proc.start()
    assert started.wait(60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert not (out / "k").exists()
    assert len(list(out.glob(".k.tmp-*"))) == 1  # the dead writer's staging folder
    with OutputDir(out).case("k") as stage:
        stage.write_file("b.txt", lambda p: p.write_text("b"))
    assert sorted(p.name for p in out.iterdir()) == ["k"]
    assert sorted(p.name for p in (out / "k").iterdir()) == ["b.txt"]


def test_a_case_folder_holding_inputs_is_never_replaced(tmp_path):
    inputs = tmp_path / "series"
    inputs.mkdir()
    (inputs / "1.dcm").write_bytes(b"x")
    root = OutputDir(tmp_path, [inputs / "1.dcm"])
    with pytest.raises(medcam.OutputError, match="holds input files"), root.case("series"):
        pass
    assert (inputs / "1.dcm").read_bytes() == b"x"
