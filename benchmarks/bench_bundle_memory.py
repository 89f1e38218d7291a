"""Memory and time of the MONAI model-zoo spleen bundle on a 512 x 512 x 300 CT, alone and
with medcam attached (``python -m monai.bundle run`` + ``configs/medcam.json``).

Each run is a fresh process (as a user runs it); peak memory is the child's peak resident set
(``ru_maxrss``) on CPU, or the CUDA allocator's peak when ``--device cuda`` (read inside the run
through a tiny extra config). The bundle's configs are the vendored ones in ``tests/bundles``
with seeded random weights (the real weights cannot be downloaded here); random weights predict
"spleen" nearly everywhere, which is the worst case for medcam (every window holds part of the
target, so none is skipped).

    python benchmarks/bench_bundle_memory.py            # ~25 min on 2 CPU cores
    python benchmarks/bench_bundle_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CUDA_PEAK = {
    "+initialize": ["$torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None"],
    "+run": ["$print('CUDA_PEAK_MB', torch.cuda.max_memory_allocated() / 2**20, flush=True) "
             "if torch.cuda.is_available() else None"],
}  # fmt: skip


WRAPPER = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stdout.write(done.stdout)\n"
    "sys.stderr.write(done.stderr)\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)


def _run(bundle: Path, configs: list[str], args: list[str]) -> dict:
    """One bundle run in a fresh process; its peak RSS (the largest of the run's processes,
    data-loader workers included) read by a wrapper process that has no other child."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs),
           "--bundle_root", str(bundle), *args]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    values = {}
    for line in done.stdout.splitlines():
        for key in ("PEAK_RSS_KB", "CUDA_PEAK_MB"):
            if line.startswith(key):
                values[key] = float(line.split()[-1])
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(values["PEAK_RSS_KB"] / 1024),
        "cuda_peak_mb": round(values["CUDA_PEAK_MB"]) if "CUDA_PEAK_MB" in values else None,
    }


def main() -> None:
    from tests.zoo import MEDCAM_CONFIG, make_bundle, write_ct

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="512,512,300")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bundle_memory"))
    opts = parser.parse_args()
    shape = tuple(int(v) for v in opts.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle("spleen_ct_segmentation", tmp)
        write_ct(tmp / "data" / "imagesTs" / "ct.nii.gz", shape, (0.8, 0.8, 1.5))
        extra = tmp / "cuda_peak.json"
        extra.write_text(json.dumps(CUDA_PEAK))
        config = str(bundle / "configs" / "inference.json")
        args = ["--dataset_dir", str(tmp / "data"), "--device", f"$torch.device('{opts.device}')"]
        rows = {}
        cases = [
            ("bundle alone", [config, str(extra)], []),
            ("bundle + medcam, layercam", [config, str(MEDCAM_CONFIG), str(extra)],
             ["--medcam#method", "layercam", "--medcam#formats", "['nifti']"]),
            ("bundle + medcam, gradcam", [config, str(MEDCAM_CONFIG), str(extra)],
             ["--medcam#formats", "['nifti']"]),
        ]  # fmt: skip
        model_space = None
        for name, configs, more in cases:
            out = tmp / name.replace(" ", "_").replace(",", "").replace("+", "plus")
            rows[name] = _run(bundle, configs, [*args, "--output_dir", str(out), *more])
            print(name, rows[name], flush=True)
            for sidecar in (out / "medcam").glob("*.json"):
                record = json.loads(sidecar.read_text())["explanation"]
                shape = " x ".join(str(v) for v in record["model_input_shape"][2:])
                windows = record["sliding_window"]["windows"]
                model_space = f"{shape} (1.5 x 1.5 x 2 mm), {windows} windows of 96^3"
    import torch

    result = {
        "ct_shape": list(shape),
        "ct_spacing_mm": [0.8, 0.8, 1.5],
        "model_space_shape": model_space,
        "device": opts.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": rows,
    }
    Path(opts.out + ".json").write_text(json.dumps(result, indent=2))
    lines = ["| run | seconds | peak RSS MB | CUDA peak MB |", "| --- | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['seconds']} | {r['peak_rss_mb']} | {r['cuda_peak_mb']} |")
    Path(opts.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
