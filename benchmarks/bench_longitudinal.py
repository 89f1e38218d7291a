"""Longitudinal speed and accuracy: medcam compare vs a minimal SimpleITK pipeline and medcam's
previous release, on one known-answer patient series.

The series (issue 16): four visits over seven weeks (days 0, 14, 28, 49), each on its own
anisotropic 96^3 grid, the patient moved by 14-17 degrees and 20-37 mm, one visit rescaled by
+4 % (as from a wrong pixel spacing), a liver lesion growing to 2.4x and shrinking to 0.6x of
its baseline volume. Every case runs in a fresh process (imports done before the clock starts),
rounds interleaved (each round runs every case once), medians reported with ratios, CPU time,
peak memory (RSS growth during the call) and accuracy against the known motion and volumes::

    python benchmarks/bench_longitudinal.py               # 3 rounds, ~6 min on 2 cores
    python benchmarks/bench_longitudinal.py --rounds 1 --no-previous --no-deformable

Cases:

* ``medcam rigid`` / ``medcam affine``: ``compare(visits)`` without writing anything (rigid
  includes the affine check registration; affine includes the rigid one it starts from);
* ``medcam rigid + report``: also writes NIfTI difference maps, transforms, PNGs, CSV, JSON and
  the HTML report;
* ``medcam deformable``: the opt-in B-spline;
* ``SimpleITK minimal``: what a user writes from SimpleITK's registration notebook (geometry
  initialiser, Mattes MI, 1 % sampling, gradient descent, 3 levels) + resampling + volumes, no
  quality checks;
* ``medcam previous``: the longitudinal module as it was before issue 16 (``--previous-ref``,
  extracted with ``git archive`` into a temporary folder and imported from there).

Results go to ``benchmarks/results/longitudinal.json`` and ``.md``; the machine's load average
is recorded before and after every run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from procmem import peak_rss

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PREVIOUS_REF = "c7f95fc"  # main before issue 16
CASES = ("medcam rigid", "medcam affine", "medcam rigid + report", "SimpleITK minimal",
         "medcam previous", "medcam deformable")  # fmt: skip
LESION = (-45.0, -10.0, 15.0)
RADIUS0 = 14.0
VOLUME_FACTORS = (1.0, 2.4, 1.6, 0.6)
DAYS = (0, 14, 28, 49)
RESCALED_VISIT = 2


# ----------------------------------------------------------------------------- the series


def make_series(path: Path, size: int) -> None:
    """Write the four visits (images, heatmaps, affines, motions) to ``path`` (.npz)."""
    sys.path.insert(0, str(ROOT))
    from tests.longitudinal.phantoms import MOTIONS, Visit, build, grid, scaled

    visits = []
    for i, (days, factor) in enumerate(zip(DAYS, VOLUME_FACTORS, strict=True)):
        motion = MOTIONS[i]
        if i == RESCALED_VISIT:
            motion = scaled(motion, 1.04)
        radius = RADIUS0 * factor ** (1 / 3)
        g = grid(i, n=size, spacing=3.4 * 96 / size)
        visits.append(Visit(days, g, motion, {"lesion": (LESION, radius)}))
    tps = build(visits)
    arrays = {}
    for i, (tp, v) in enumerate(zip(tps, visits, strict=True)):
        arrays[f"image{i}"] = tp.image
        arrays[f"heat{i}"] = tp.heatmap
        arrays[f"affine{i}"] = tp.affine_lps
        arrays[f"motion{i}"] = np.eye(4) if v.motion is None else v.motion
        arrays[f"radius{i}"] = np.array(v.findings["lesion"][1])
    np.savez(path, **arrays)


def load_series(path: Path):
    data = np.load(path)
    n = len([k for k in data.files if k.startswith("image")])
    return [{k: data[f"{k}{i}"] for k in ("image", "heat", "affine", "motion", "radius")}
            for i in range(n)]  # fmt: skip


def rotation_degrees(motion: np.ndarray) -> float:
    m = motion[:3, :3] / np.cbrt(abs(np.linalg.det(motion[:3, :3])))
    return float(np.degrees(np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1))))


# ----------------------------------------------------------------------------- cases


def _timepoints(series):
    from medcam.longitudinal import Timepoint

    base = datetime.date(2026, 1, 5)
    return [Timepoint(v["image"], v["affine"], v["heat"], base + datetime.timedelta(days=d),
                      {"patient": "P1", "method": "gradcam"})
            for v, d in zip(series, DAYS, strict=True)]  # fmt: skip


def _accuracy(series, map_points: list, volumes: list[float]) -> dict:
    """Mean registration error over the baseline body (mm), error at the lesion, volume
    errors (%) against the truth."""
    base = series[0]
    idx = np.argwhere(base["image"] > -500)[::200]
    pts = idx @ base["affine"][:3, :3].T + base["affine"][:3, 3]
    body, lesion = [], []
    for v, mp in zip(series[1:], map_points, strict=True):
        m = v["motion"]
        body.append(float(np.linalg.norm(mp(pts) - (pts @ m[:3, :3].T + m[:3, 3]), axis=1).mean()))
        at = np.asarray(LESION)
        lesion.append(float(np.linalg.norm(mp(at[None])[0] - (m[:3, :3] @ at + m[:3, 3]))))
    truth = [4 / 3 * np.pi * float(v["radius"]) ** 3 / 1000 for v in series]
    # the rescaled visit's lesion is 1.04^3 larger in the scanner: that is the volume on its grid
    truth[RESCALED_VISIT] *= 1.04**3
    vol_err = [100 * (got - t) / t for got, t in zip(volumes, truth, strict=True)]
    return {"registration_error_mm": body, "lesion_error_mm": lesion,
            "volume_error_pct": vol_err}  # fmt: skip


def case_medcam(series, kind: str, out: Path | None = None):
    from medcam.longitudinal import compare

    tps = _timepoints(series)
    formats = ["nifti", "png", "csv", "json", "html"] if out is not None else None
    start = time.perf_counter()
    result = compare(tps, registration=kind, out=out, formats=formats)
    seconds = time.perf_counter() - start
    acc = _accuracy(series, [r.map_points for r in result.registrations],
                    [r["volume_ml"] for r in result.rows])  # fmt: skip
    acc["flagged_visits"] = sorted({f.visit for f in result.flags})
    return seconds, acc


def case_previous(series):
    from medcam.longitudinal import compare  # imported from the extracted previous tree

    tps = _timepoints(series)
    start = time.perf_counter()
    result = compare(tps)
    seconds = time.perf_counter() - start
    acc = _accuracy(series, [r.map_points for r in result.registrations],
                    [r["volume_ml"] for r in result.rows])  # fmt: skip
    return seconds, acc


def case_simpleitk(series):
    """SimpleITK's notebook recipe, per follow-up: register, resample the heatmap, volumes."""
    import SimpleITK as sitk

    from medcam.longitudinal.registration import to_sitk

    start = time.perf_counter()
    fixed = to_sitk(series[0]["image"], series[0]["affine"])
    transforms, volumes = [], []
    for v in series:
        voxel_ml = abs(np.linalg.det(v["affine"][:3, :3])) / 1000
        volumes.append(float((v["heat"] >= 0.5).sum() * voxel_ml))
    for v in series[1:]:
        moving = to_sitk(v["image"], v["affine"])
        initial = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.GEOMETRY,
        )  # fmt: skip
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.01, 42)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=100,
                                          convergenceMinimumValue=1e-6,
                                          convergenceWindowSize=10)  # fmt: skip
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(initial, inPlace=False)
        t = reg.Execute(fixed, moving)
        sitk.Resample(to_sitk(v["heat"], v["affine"]), fixed, t, sitk.sitkLinear, 0.0)
        transforms.append(t)
    seconds = time.perf_counter() - start

    def mapper(t):
        return lambda p: np.array([t.TransformPoint([float(x) for x in q]) for q in p])

    return seconds, _accuracy(series, [mapper(t) for t in transforms], volumes)


def current_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def worker(case: str, data: Path) -> None:
    """Run ``case`` once in this (fresh) process and print a JSON line."""
    series = load_series(data)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import nibabel  # noqa: F401
    import SimpleITK  # noqa: F401

    import medcam.longitudinal

    if case != "medcam previous":
        import medcam.longitudinal.figures
        import medcam.longitudinal.report  # noqa: F401
    rss0 = current_rss()
    cpu0 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        if case == "medcam rigid":
            seconds, acc = case_medcam(series, "rigid")
        elif case == "medcam affine":
            seconds, acc = case_medcam(series, "affine")
        elif case == "medcam deformable":
            seconds, acc = case_medcam(series, "deformable")
        elif case == "medcam rigid + report":
            seconds, acc = case_medcam(series, "rigid", Path(tmp) / "out")
        elif case == "SimpleITK minimal":
            seconds, acc = case_simpleitk(series)
        elif case == "medcam previous":
            seconds, acc = case_previous(series)
        else:
            raise SystemExit(f"unknown case {case!r}")
    cpu = time.process_time() - cpu0
    print(json.dumps({"case": case, "seconds": seconds, "cpu_seconds": cpu,
                      "peak_mb": (peak_rss() - rss0) / 2**20, **acc}))  # fmt: skip


# ----------------------------------------------------------------------------- driver


def previous_tree(ref: str, where: Path) -> Path | None:
    """``git archive`` of medcam at ``ref`` into ``where`` (None when git or the ref is missing)."""
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "medcam"],
                             capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(where)], input=tar, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return where


def run_case(case: str, data: Path, previous: Path | None) -> dict:
    env = dict(os.environ)
    if case == "medcam previous":
        env["PYTHONPATH"] = str(previous)
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--worker", case, "--data", str(data)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["load_before"], record["load_after"] = load_before, os.getloadavg()[0]
    return record


def summarise(runs: list[dict], cases: list[str]) -> dict:
    out = {}
    for case in cases:
        rs = [r for r in runs if r["case"] == case]
        if not rs:
            continue
        med = {
            k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_seconds", "peak_mb")
        }
        last = rs[-1]
        out[case] = {**med, "rounds": len(rs), "seconds_all": [round(r["seconds"], 2) for r in rs],
                     "load": [round(r["load_before"], 2) for r in rs],
                     **{k: last[k] for k in ("registration_error_mm", "lesion_error_mm",
                                             "volume_error_pct")},
                     "flagged_visits": last.get("flagged_visits")}  # fmt: skip
    return out


def markdown(summary: dict, meta: dict) -> str:
    rigid = summary.get("medcam rigid", {}).get("seconds")
    lines = [
        "# Longitudinal benchmark",
        "",
        f"{meta['series']}. {meta['machine']}. Medians of {meta['rounds']} interleaved rounds, "
        "each case in a fresh process (imports before the clock). Load average (1 min) before "
        f"each run: {meta['load_range']}.",
        "",
        "| case | wall s | ÷ medcam rigid | CPU s | peak MB | registration error, mean over "
        "body (mm) | at lesion (mm) | volume error (%) | flagged |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for case, s in summary.items():
        ratio = f"{s['seconds'] / rigid:.2f}" if rigid else ""
        reg = ", ".join(f"{v:.2f}" for v in s["registration_error_mm"])
        les = ", ".join(f"{v:.2f}" for v in s["lesion_error_mm"])
        vol = ", ".join(f"{v:+.1f}" for v in s["volume_error_pct"])
        flagged = ", ".join(s["flagged_visits"]) if s.get("flagged_visits") else (
            "—" if s.get("flagged_visits") is None else "none")  # fmt: skip
        lines.append(f"| {case} | {s['seconds']:.2f} | {ratio} | {s['cpu_seconds']:.2f} | "
                     f"{s['peak_mb']:.0f} | {reg} | {les} | {vol} | {flagged} |")  # fmt: skip
    lines += ["", "Per-round wall seconds and load:", ""]
    for case, s in summary.items():
        lines.append(f"- {case}: {s['seconds_all']} (load {s['load']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--previous-ref", default=PREVIOUS_REF)
    p.add_argument("--no-previous", action="store_true")
    p.add_argument("--no-deformable", action="store_true")
    p.add_argument("--worker")
    p.add_argument("--data", type=Path)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.data)
        return
    cases = [c for c in CASES if not (c == "medcam previous" and args.no_previous)
             and not (c == "medcam deformable" and args.no_deformable)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "series.npz"
        make_series(data, args.size)
        previous = None
        if "medcam previous" in cases:
            previous = previous_tree(args.previous_ref, Path(tmp))
            if previous is None:
                cases.remove("medcam previous")
        runs = []
        for r in range(args.rounds):
            for case in cases:
                if case == "medcam deformable" and r > 0:
                    continue  # one round: it is the slow, opt-in path
                record = run_case(case, data, previous)
                print(f"round {r + 1} {case}: {record['seconds']:.2f} s "
                      f"(load {record['load_before']:.2f})", flush=True)  # fmt: skip
                runs.append(record)
        series = load_series(data)
    summary = summarise(runs, cases)
    loads = [r["load_before"] for r in runs]
    motions = [
        f"{rotation_degrees(v['motion']):.0f} deg / {np.linalg.norm(v['motion'][:3, 3]):.0f} mm"
        for v in series[1:]
    ]
    meta = {
        "series": (f"4 visits (days {', '.join(map(str, DAYS))}), {args.size}^3 anisotropic grids, "
                   f"motion {'; '.join(motions)}, visit {RESCALED_VISIT + 1} rescaled +4 %, "
                   f"lesion volume x {', '.join(map(str, VOLUME_FACTORS))}"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}",
        "rounds": args.rounds,
        "load_range": f"{min(loads):.1f}-{max(loads):.1f}",
        "previous_ref": args.previous_ref if "medcam previous" in cases else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "longitudinal.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2)
    )
    (RESULTS / "longitudinal.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
