"""Cohort runs: manifest checks, sharding, resume after a killed worker under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medcam.cli import main
from medcam.cohort import Case, read_cohort_manifest, resolve_shard, shard_cases
from medcam.errors import InputError

ROOT = Path(__file__).parent.parent
N_CASES = 12


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    lines = ["case_id,input"]
    for i in range(N_CASES):
        data = rng.normal(0, 1, (16, 16, 12)).astype(np.float32)
        nib.save(
            nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), folder / f"scan{i:02d}.nii.gz"
        )
        lines.append(f"c{i:02d},scan{i:02d}.nii.gz")
    (folder / "cohort.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_shards_are_disjoint_and_complete():
    cases = [Case(f"c{i:02d}", Path(".")) for i in range(N_CASES)]
    for world in (1, 2, 3, 5, 16):
        parts = [shard_cases(cases, r, world) for r in range(world)]
        ids = [c.case_id for part in parts for c in part]
        assert sorted(ids) == sorted(c.case_id for c in cases) and len(ids) == len(set(ids))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced, no padding


def test_rank_from_environment():
    assert resolve_shard("1/4") == (1, 4)
    assert resolve_shard(env={"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert resolve_shard(env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4",
                              "SLURM_ARRAY_TASK_MIN": "3"}) == (2, 4)  # fmt: skip
    assert resolve_shard(env={}) == (0, 1)
    with pytest.raises(Exception, match="i/N"):
        resolve_shard("x")


def test_manifest_errors_before_any_work(cohort, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,input,colour\nc1,scan.nii.gz,red\n")
    with pytest.raises(InputError, match="unknown \\['colour'\\]"):
        read_cohort_manifest(bad)
    bad.write_text(f"case_id,input\na,{cohort}/scan00.nii.gz\na,{cohort}/scan01.nii.gz\n"
                   f"b,{cohort}/nope.nii.gz\nc/../x,{cohort}/scan02.nii.gz\n")  # fmt: skip
    with pytest.raises(InputError) as info:
        read_cohort_manifest(bad)
    text = str(info.value)
    assert "duplicate case_id 'a'" in text and "nope.nii.gz does not exist" in text
    assert "may only use" in text and "3 problem(s)" in text
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["cohort", "run", "--manifest", str(bad), "--out", str(out),
                                       "--model", "tests.helpers:intensity_cam_3d"])  # fmt: skip
    assert result.exit_code == 2 and "duplicate case_id" in result.output
    assert not out.exists()


def _records(out: Path) -> dict[str, dict]:
    recs = {}
    for f in out.glob("*/medcam.json"):
        recs[f.parent.name] = json.loads(f.read_text())
    return recs


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _torchrun(manifest: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--standalone", "-m", "medcam", "cohort", "run", "--manifest", str(manifest),
            "--out", str(out), "--model", "tests.helpers:slow_intensity_cam_3d", "--layer",
            "conv", "--target", "0", "--format", "nifti,json"]  # fmt: skip


def test_torchrun_killed_worker_then_resume(cohort, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_torchrun(cohort / "cohort.csv", out), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(_records(out)) < 3:
        time.sleep(0.1)
    assert len(_records(out)) >= 3, first.communicate(timeout=60)[0].decode()[-3000:]
    workers = _children(first.pid)
    assert len(workers) == 2
    for pid in workers:  # kill one worker that is still running
        try:
            os.kill(pid, signal.SIGKILL)
            break
        except ProcessLookupError:
            continue
    first.communicate(timeout=120)
    assert first.returncode != 0  # torchrun stops the group when a worker dies
    before = _records(out)
    assert 3 <= len(before) < N_CASES
    assert all(r["status"] == "done" for r in before.values())
    second = subprocess.run(_torchrun(cohort / "cohort.csv", out), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _records(out)
    assert sorted(after) == [f"c{i:02d}" for i in range(N_CASES)]
    assert all(r["status"] == "done" for r in after.values())
    for case_id, rec in before.items():  # finished before the kill: not recomputed
        assert after[case_id]["finished"] == rec["finished"]
    ranks = {r["rank"] for r in after.values()}
    assert ranks == {0, 1}
    for case_id in after:  # exactly one heatmap per case
        assert len(list((out / case_id).glob("*.nii.gz"))) == 1
    status = CliRunner().invoke(main, ["cohort", "status", "--out", str(out)])
    assert status.exit_code == 0 and f"{N_CASES} done, 0 failed, 0 missing" in status.output
    assert (out / "index.csv").read_text().count(",done,") == N_CASES


def test_failed_case_is_recorded_and_status_is_nonzero(cohort, tmp_path):
    manifest = tmp_path / "m.csv"
    broken = tmp_path / "broken.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), broken)
    manifest.write_text(f"case_id,input\nok,{cohort}/scan00.nii.gz\nbad,{broken}\n")
    out = tmp_path / "out"
    runner = CliRunner()
    run = runner.invoke(main, ["cohort", "run", "--manifest", str(manifest), "--out", str(out),
                               "--model", "tests.helpers:intensity_cam_3d", "--layer", "conv",
                               "--target", "0", "--format", "nifti,json"])  # fmt: skip
    assert run.exit_code == 0 and "1 done" in run.output and "1 failed" in run.output
    bad = json.loads((out / "bad" / "medcam.json").read_text())
    assert bad["status"] == "failed" and "NaN" in bad["error"]
    status = runner.invoke(main, ["cohort", "status", "--out", str(out)])
    assert status.exit_code == 1 and "1 done, 1 failed" in status.output
    # a rerun redoes only the failed case
    ok_finished = json.loads((out / "ok" / "medcam.json").read_text())["finished"]
    again = runner.invoke(main, ["cohort", "run", "--manifest", str(manifest), "--out", str(out),
                                 "--model", "tests.helpers:intensity_cam_3d", "--layer", "conv",
                                 "--target", "0", "--format", "nifti,json"])  # fmt: skip
    assert "1 skipped" in again.output
    assert json.loads((out / "ok" / "medcam.json").read_text())["finished"] == ok_finished


def test_overlapped_cohort_writes_what_a_serial_one_writes(cohort, tmp_path):
    manifest = tmp_path / "m.csv"
    rows = [f"c{i:02d},{cohort}/scan{i:02d}.nii.gz" for i in range(4)]
    manifest.write_text("case_id,input\n" + "\n".join(rows) + "\n")
    runner = CliRunner()
    outs = {}
    for prefetch in ("0", "2"):
        out = tmp_path / f"out{prefetch}"
        run = runner.invoke(main, ["cohort", "run", "--manifest", str(manifest), "--out",
                                   str(out), "--model", "tests.helpers:intensity_cam_3d",
                                   "--layer", "conv", "--target", "0", "--format", "nifti,json",
                                   "--prefetch", prefetch, "--quiet"])  # fmt: skip
        assert run.exit_code == 0 and "4 done" in run.output, run.output
        outs[prefetch] = out
    records = {p: _records(o) for p, o in outs.items()}
    assert records["0"].keys() == records["2"].keys() == {f"c{i:02d}" for i in range(4)}
    for case_id, record in records["0"].items():
        other = records["2"][case_id]
        assert record["status"] == other["status"] == "done"
        assert record["outputs"] == other["outputs"]
        assert {"load", "explain", "nifti", "json"} <= set(other["seconds"])
        for name in record["outputs"]:
            if name.endswith(".nii.gz"):
                a = nib.load(outs["0"] / case_id / name)
                b = nib.load(outs["2"] / case_id / name)
                np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
                np.testing.assert_array_equal(a.affine, b.affine)
