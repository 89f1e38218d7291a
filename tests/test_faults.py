"""The whole CLI under faults: a full disk, a read-only folder, a process killed at random points
while writing, two writers of one output, a cohort worker killed mid-run.

What every test asserts: a case folder that can be seen is complete (exactly the files of one
run, each readable) or absent; nothing stale from an earlier run is mixed in; the failure is
one clear line on stderr with a non-zero exit status; a rerun completes and sweeps what a
killed process left.

The full disk and the read-only folder are real where the test may mount a tmpfs (as root on
Linux); elsewhere the full disk is simulated (writes into the output folder fail with ENOSPC
beyond a byte budget) and the read-only folder is a folder without write permission (skipped as
root without mount).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medcam.cli import main

ROOT = Path(__file__).parent.parent
MODEL = ["--model", "tests.helpers:intensity_cam_3d", "--layer", "conv", "--target", "0"]
FIRST = "nifti,json"  # an earlier run's formats
SECOND = "nifti,png,json"  # this run's


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """A folder of three small NIfTI cases, a bright blob in each."""
    folder = tmp_path_factory.mktemp("cases")
    rng = np.random.default_rng(0)
    for i in range(3):
        data = rng.normal(0, 0.1, (24, 20, 12)).astype(np.float32)
        data[6 + 4 * i : 10 + 4 * i, 8:12, 4:8] += 3.0
        nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.5, 1.0])), folder / f"s{i}.nii.gz")
    return folder


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _explain(inputs: Path, out: Path, formats: str, model: list[str] = MODEL) -> list[str]:
    return ["explain", str(inputs), "--out", str(out), *model, "--format", formats]


def _subprocess(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "medcam", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _error_lines(output: str) -> list[str]:
    """The lines of a CLI run that are not progress bars."""
    return [x for x in output.replace("\r", "\n").splitlines() if x.strip() and "case/s" not in x]


def _expected_names(case: str, formats: str) -> set[str]:
    parts = set(formats.split(","))
    names = {f"{case}.json"} if "json" in parts else set()
    if "nifti" in parts:
        names.add(f"{case}_gradcam_class0.nii.gz")
    if "png" in parts:
        names.add(f"{case}_gradcam_class0.png")
    return names


def _check_case(folder: Path, allowed: list[str]) -> str:
    """``folder`` is complete for one of ``allowed`` formats lists (which one is returned) and
    every file in it reads back; anything else fails the test."""
    names = {p.name for p in folder.iterdir()}
    matches = [f for f in allowed if names == _expected_names(folder.name, f)]
    assert matches, f"{folder} holds {sorted(names)}: not one run's complete outputs"
    for p in folder.iterdir():
        if p.suffix == ".json":
            record = json.loads(p.read_text())
            assert sorted(record["outputs"]["files"]) == sorted(
                f for f in matches[0].split(",") if f != "json"
            )
        elif p.name.endswith(".nii.gz"):
            assert np.isfinite(np.asarray(nib.load(p).dataobj)).all()
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
    return matches[0]


def _visible(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if not p.name.startswith("."))


def _hidden(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("."))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _can_mount() -> bool:
    if os.environ.get("MEDCAM_TEST_NO_MOUNT"):  # to run the simulated variants
        return False
    return sys.platform.startswith("linux") and os.geteuid() == 0 and bool(shutil.which("mount"))


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir(parents=True, exist_ok=True)
    mounted = False
    if _can_mount():
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True)  # fmt: skip
        mounted = done.returncode == 0
    if not mounted:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# ----------------------------------------------------------------------------- full disk


def _fill(disk: Path, leave: int) -> Path:
    """Fill the file system of ``disk`` until ``leave`` bytes are free."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    filler = disk / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """``(folder, fill(leave), free())``: a folder on a small file system (a real 4 MB tmpfs
    where the test can mount one, else ENOSPC simulated for writes beyond a budget)."""
    disk = tmp_path / "disk"
    with _tmpfs(disk, "size=4m") as mounted:
        if mounted:
            state: dict[str, Path] = {}

            def fill(leave: int) -> None:
                state["filler"] = _fill(disk, leave)

            def free() -> None:
                state.pop("filler").unlink()

            yield disk, fill, free, "tmpfs"
            return
        from medcam.io.output import OutputDir

        budget: dict[str, int | None] = {"left": None}
        write_file = OutputDir.write_file

        def limited(self, name, write):
            def counted(tmp: Path) -> None:
                write(tmp)
                if budget["left"] is not None:
                    budget["left"] -= tmp.stat().st_size
                    if budget["left"] < 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

            return write_file(self, name, counted)

        monkeypatch.setattr(OutputDir, "write_file", limited)
        disk.mkdir(exist_ok=True)

        def fill_sim(leave: int) -> None:
            budget["left"] = leave

        def free_sim() -> None:
            budget["left"] = None

        yield disk, fill_sim, free_sim, "simulated"


def test_full_disk_keeps_the_previous_result_and_says_so(cases, small_disk):
    disk, fill, free, how = small_disk
    scan = cases / "s0.nii.gz"
    out = disk / "out"
    code, output = _cli(*_explain(scan, out, FIRST))
    assert code == 0, output
    (case,) = _visible(out)
    before = _tree(case)
    nifti = case / f"{case.name}_gradcam_class0.nii.gz"
    # room for this run's NIfTI but not its PNG: the disk fills in the middle of the case
    fill(nifti.stat().st_size + 8192)
    code, output = _cli(*_explain(scan, out, SECOND))
    assert code == 2, output
    (line,) = _error_lines(output)
    assert line.startswith("medcam: error:") and "No space left on device" in line, how
    assert "Nothing of this case was written" in line and "Traceback" not in output
    assert _tree(case) == before  # the earlier run's complete result, untouched
    assert _visible(out) == [case] and _hidden(out) == []  # no staging folder left
    free()
    code, output = _cli(*_explain(scan, out, SECOND))
    assert code == 0, output
    assert _check_case(case, [SECOND]) == SECOND and _hidden(out) == []


@pytest.mark.parametrize("leave", [4096, 16384], ids=["no-room-for-a-record", "room-for-records"])
def test_full_disk_in_a_cohort_run(cases, small_disk, tmp_path, leave):
    """A cohort case that hits a full disk is recorded as failed (if even the record cannot
    be written, the run stops with one line) and a rerun with space completes it."""
    disk, fill, free, _ = small_disk
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,input\n" + "".join(f"c{i},{cases}/s{i}.nii.gz\n" for i in (0, 1)))
    out = disk / "cohort"
    args = ["cohort", "run", "--manifest", str(manifest), "--out", str(out), *MODEL, "--format",
            "nifti,json"]  # fmt: skip
    fill(leave)
    code, output = _cli(*args)
    assert code in (0, 2), output
    assert "Traceback" not in output
    failed = 0
    for folder in _visible(out):
        if folder.is_dir():  # a complete result with its record, or only a failure record
            names = {p.name for p in folder.iterdir()}
            record = json.loads((folder / "medcam.json").read_text())
            if record["status"] == "done":
                assert names == {"medcam.json", *record["outputs"]}
            else:
                assert names == {"medcam.json"} and "No space left" in record["error"]
                failed += 1
    errors = [x for x in _error_lines(output) if x.startswith("medcam: error:")]
    assert len(errors) == (code == 2)
    if code == 2:  # not even the failure record fitted
        assert "cannot be recorded" in errors[0] and "No space left" in errors[0]
    assert failed or code == 2
    free()
    code, output = _cli(*args)
    assert code == 0 and "0 failed" in output, output
    code, output = _cli("cohort", "status", "--out", str(out))
    assert code == 0 and "2 done, 0 failed" in output, output


# ----------------------------------------------------------------------------- read-only


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder that cannot be written to: a read-only tmpfs as root, else no permission, else
    (root without mount) EROFS simulated for anything created inside it."""
    folder = tmp_path / "ro"
    with _tmpfs(folder, "ro,size=64k") as mounted:
        if mounted:
            yield folder
            return
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return

    def refuse(real):
        def call(path, *args, **kwargs):
            if str(folder) in os.fspath(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", refuse(os.open))
    monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
    yield folder


@pytest.mark.parametrize("command", ["explain", "cohort", "compare"])
def test_read_only_output_is_refused_before_the_model_runs(cases, read_only, tmp_path, command):
    exploding = ["--model", "tests.helpers:exploding_model", "--layer", "conv"]
    if command == "explain":
        args = _explain(cases, read_only / "out", "nifti", exploding)
    elif command == "compare":
        args = ["compare", str(cases / "s0.nii.gz"), str(cases / "s1.nii.gz"), "--dates",
                "2024-01-02,2024-06-30", "--out", str(read_only / "out"), *exploding]  # fmt: skip
    else:
        manifest = tmp_path / "m.csv"
        manifest.write_text(f"case_id,input\nc0,{cases}/s0.nii.gz\n")
        args = ["cohort", "run", "--manifest", str(manifest), "--out", str(read_only / "out"),
                *exploding]  # fmt: skip
    code, output = _cli(*args)
    assert code == 2, output
    (line,) = _error_lines(output)
    assert line.startswith("medcam: error: Cannot write to the output folder")
    assert "forward ran" not in output and "Traceback" not in output


def test_inputs_on_a_read_only_file_system_are_explained(cases, tmp_path):
    """medcam never writes next to its inputs: a series on read-only media works."""
    if not _can_mount():
        pytest.skip("needs root on Linux to mount a read-only tmpfs")
    media = tmp_path / "media"
    with _tmpfs(media, "size=1m") as mounted:
        if not mounted:
            pytest.skip("tmpfs cannot be mounted here")
        shutil.copy(cases / "s1.nii.gz", media / "s1.nii.gz")
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        code, output = _cli(*_explain(media / "s1.nii.gz", tmp_path / "out", SECOND))
        assert code == 0, output
        (case,) = _visible(tmp_path / "out")
        _check_case(case, [SECOND])


# ----------------------------------------------------------------------------- killed writers


@pytest.mark.slow
def test_a_writer_killed_at_random_points_never_leaves_a_partial_or_mixed_case(cases, tmp_path):
    """An earlier run wrote every case with other formats; a rerun is SIGKILLed at random
    points while it writes (a random case, a random delay after that case's staging folder
    appears). Each time, every visible case folder is one run's complete outputs; a last rerun
    completes every case and sweeps the killed runs' staging folders."""
    out = tmp_path / "out"
    code, output = _cli(*_explain(cases, out, FIRST))
    assert code == 0, output
    names = [p.name for p in _visible(out)]
    assert len(names) == 3
    rng = random.Random(int(os.environ.get("MEDCAM_FAULT_SEED", "15")))
    kills = []
    for _ in range(3):
        k, delay = rng.randrange(3), rng.choice([0.0, 0.002, 0.01, 0.03, 0.08])
        proc = _subprocess(_explain(cases, out, SECOND))
        seen: set[str] = set()
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline and len(seen) <= k:
            seen |= {p.name for p in out.glob(".*.tmp-*")}
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills.append((k, delay, proc.returncode))
        assert [p.name for p in _visible(out)] == names, kills
        states = [_check_case(out / n, [FIRST, SECOND]) for n in names]
        kills[-1] += (states,)
    assert any(rc == -signal.SIGKILL for *_, rc, _ in kills), kills  # not all finished first
    code, output = _cli(*_explain(cases, out, SECOND))
    assert code == 0, output
    assert [_check_case(out / n, [SECOND]) for n in names] == [SECOND] * 3
    assert _hidden(out) == []  # the killed runs' staging folders were swept


@pytest.mark.slow
def test_two_cli_writers_of_one_output(cases, tmp_path):
    """Two ``medcam explain`` processes write the same case at once with different formats:
    both succeed, and the case folder is one of them complete."""
    out = tmp_path / "out"
    scan = cases / "s2.nii.gz"
    procs = [_subprocess(_explain(scan, out, f)) for f in (FIRST, SECOND)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    (case,) = _visible(out)
    _check_case(case, [FIRST, SECOND])
    assert _hidden(out) == []


# ----------------------------------------------------------------------------- cohort


@pytest.mark.slow
def test_a_cohort_worker_killed_mid_run_then_resumed(cases, tmp_path):
    """A cohort run is killed after its second case: the cases it finished are complete (their
    outputs and a 'done' record), the others absent; the rerun skips the finished ones and
    completes the rest; a rerun with another target leaves no file of the first target."""
    manifest = tmp_path / "m.csv"
    lines = [f"c{i},{cases}/s{i % 3}.nii.gz" for i in range(6)]
    manifest.write_text("case_id,input\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    slow = ["--model", "tests.helpers:slow_intensity_cam_3d", "--layer", "conv"]
    args = ["cohort", "run", "--manifest", str(manifest), "--out", str(out), *slow, "--target",
            "0", "--format", "nifti,json"]  # fmt: skip
    proc = _subprocess(args)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list(out.glob("*/medcam.json"))) >= 2:
            break
        time.sleep(0.005)
    time.sleep(random.Random(16).uniform(0.0, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    finished = {}
    for folder in _visible(out):
        if not folder.is_dir():
            continue
        record = json.loads((folder / "medcam.json").read_text())
        assert record["status"] == "done"
        assert {p.name for p in folder.iterdir()} == {"medcam.json", *record["outputs"]}
        finished[folder.name] = record["finished"]
    assert 2 <= len(finished) < 6
    code, output = _cli(*args)
    assert code == 0 and f"{len(finished)} skipped" in output, output
    for case_id, when in finished.items():
        assert json.loads((out / case_id / "medcam.json").read_text())["finished"] == when
    assert _hidden(out) == []
    # another target: every case folder is replaced as a whole, no class-0 file stays
    code, output = _cli("cohort", "run", "--manifest", str(manifest), "--out", str(out),
                        *MODEL[:-1], "1", "--format", "nifti,json")  # fmt: skip
    assert code == 0 and "6 done" in output, output
    for i in range(6):
        names = {p.name for p in (out / f"c{i}").iterdir()}
        assert not any("class0" in n for n in names) and any("class1" in n for n in names)


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("command", ["cohort", "compare"])
@pytest.mark.parametrize(
    "content",
    [b"case_id,input\n\xff\xfe\x00broken\n", b"\x00\x01\x02" * 40],
    ids=["not-utf8", "binary"],
)
def test_an_unreadable_manifest_is_one_line(tmp_path, command, content):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    out = str(tmp_path / "o")
    if command == "cohort":
        args = ["cohort", "run", "--manifest", str(manifest), "--out", out, *MODEL]
    else:
        args = ["compare", "--manifest", str(manifest), "--out", out]
    code, output = _cli(*args)
    assert code == 2, output
    (line,) = _error_lines(output)
    assert line.startswith("medcam: error:") and str(manifest) in line, line
    assert "Traceback" not in output


def test_manifest_readers_raise_input_errors(tmp_path):
    """The API: a manifest that is a folder or cannot be decoded is an InputError."""
    from medcam.cohort import read_cohort_manifest
    from medcam.errors import InputError
    from medcam.runner import read_manifest

    folder = tmp_path / "folder.csv"
    folder.mkdir()
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"scan\n\xff\xfe\n")
    for reader in (read_cohort_manifest, read_manifest):
        for path in (folder, binary):
            with pytest.raises(InputError, match="Cannot read the manifest"):
                reader(path)


def test_a_manifest_saved_by_a_spreadsheet_is_read(cases, tmp_path):
    """Excel writes a UTF-8 byte-order mark before the header: the columns still match."""
    from medcam.cohort import read_cohort_manifest

    manifest = tmp_path / "m.csv"
    manifest.write_bytes(f"case_id,input\r\nc0,{cases}/s0.nii.gz\r\n".encode("utf-8-sig"))
    assert [c.case_id for c in read_cohort_manifest(manifest)] == ["c0"]
