"""What calibration costs: ``medcam.calibrate_scans`` against explaining the same scans once.

    python benchmarks/bench_calibrate.py            # 4 CT cases of 512 x 512 x 96, ~3 min
    python benchmarks/bench_calibrate.py --cases 8 --size 256

Side by side in one run, each in a fresh process (imports before the clock; peak memory is the
process's own VmHWM): (a) the minimal pipeline, ``medcam.explain_scan`` once per scan with the
default layers; (b) ``medcam.calibrate_scans`` on the same scans and lesion masks (every
candidate layer and rule x 3 methods, each map put back on the scan grid and scored). The
model is the shipped demo DenseNet with its preprocessing (RAS, 4 mm, 48^3); the scans are the
demo's CT phantom at clinical size with a 12 mm lesion each. Results: ``results/calibrate.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results"


def make_cases(folder: Path, n: int, size: int) -> list[tuple[str, str]]:
    import nibabel as nib
    import numpy as np

    from medcam.data.demo import ct_phantom
    from medcam.data.synthetic import Geometry

    spacing = 360.0 / size
    g = Geometry((size, size, 96), (spacing, spacing, 2.5), (-180.0, -180.0, -120.0))
    rng = np.random.default_rng(0)
    pts = g.world_points_lps()
    cases = []
    for i in range(n):
        centre = (rng.uniform(-40, 40), rng.uniform(-30, 10), rng.uniform(-60, 60))
        hu = ct_phantom(g, centre, 12.0, seed=i)
        mask = (np.linalg.norm(pts - np.asarray(centre), axis=-1) <= 12.0).astype(np.uint8)
        scan, lesion = folder / f"ct{i}.nii.gz", folder / f"lesion{i}.nii.gz"
        nib.save(nib.Nifti1Image(hu.astype(np.int16), g.affine_ras), scan)
        nib.save(nib.Nifti1Image(mask, g.affine_ras), lesion)
        cases.append((str(scan), str(lesion)))
    return cases


def child(kind: str, cases: list[tuple[str, str]]) -> dict:
    import torch
    from procmem import peak_rss

    import medcam
    from medcam.data.demo import demo_classifier, demo_preprocess, load_demo_weights

    torch.set_num_threads(2)
    model = load_demo_weights(demo_classifier(), "classifier")
    pre = demo_preprocess()
    rss0 = peak_rss()
    t0 = time.perf_counter()
    out: dict = {}
    if kind == "explain":
        for scan, _ in cases:
            medcam.explain_scan(model, scan, preprocess=pre, target=1)
    else:
        cal = medcam.calibrate_scans(model, [c[0] for c in cases], [c[1] for c in cases], 1,
                                     preprocess=pre)  # fmt: skip
        out = {"candidates": len(cal.table), "chosen_by": cal.describe()}
    return {"seconds": time.perf_counter() - t0, "peak_mb": (peak_rss() - rss0) / 2**20,
            "peak_total_mb": peak_rss() / 2**20, **out}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="in-plane matrix (96 slices)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--list", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(Path(args.list).read_text()))))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        cases = make_cases(Path(tmp), args.cases, args.size)
        listing = Path(tmp) / "cases.json"
        listing.write_text(json.dumps(cases))
        runs = {}
        for kind in ("explain", "calibrate"):
            cmd = [sys.executable, __file__, "--child", kind, "--list", str(listing)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[kind] = json.loads(done.stdout.strip().splitlines()[-1])
            print(kind, runs[kind], flush=True)
    e, c = runs["explain"], runs["calibrate"]
    report = {"cases": args.cases, "shape": [args.size, args.size, 96], "runs": runs,
              "time_ratio": c["seconds"] / e["seconds"], "torch": torch.__version__,
              "threads": 2}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibrate.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Calibration cost: `calibrate_scans` against explaining the same scans once",
        "",
        f"Written by `benchmarks/bench_calibrate.py`: {args.cases} CT phantoms of "
        f"{args.size} x {args.size} x 96 (NIfTI, int16), the demo DenseNet and its "
        f"preprocessing, CPU, 2 threads, torch {torch.__version__}; each run in a fresh "
        "process, peak = the process's VmHWM above its level after imports and model load.",
        "",
        "| run | seconds | per case | peak MB above start | peak MB total |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    labels = {"explain": "explain_scan once per scan (default layers)",
              "calibrate": f"calibrate_scans ({c['candidates']} candidates)"}  # fmt: skip
    for kind, label in labels.items():
        r = runs[kind]
        lines.append(f"| {label} | {r['seconds']:.1f} | {r['seconds'] / args.cases:.1f} | "
                     f"{r['peak_mb']:.0f} | {r['peak_total_mb']:.0f} |")  # fmt: skip
    lines += [
        "",
        f"Calibration takes {report['time_ratio']:.1f}x the time of one explanation per case "
        f"({c['candidates']} candidate maps per case, each put back on the scan grid and "
        f"scored). Its result here: {c['chosen_by']}.",
    ]
    (RESULTS / "calibrate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
