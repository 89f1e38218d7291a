"""The clinical path end to end: medcam's CLI against a minimal direct pipeline, side by side.

A synthetic 512 x 512 CT series (made by this script, int16 + rescale, one file per slice) goes
through ``medcam explain --bundle examples/bundles/classify3d`` with every format (NIfTI,
Parametric Map, SEG, Secondary Capture, PNG, JSON), and through the same job done directly:
SimpleITK reads the series, one resample to the model grid, forward + backward at the same
layer, one trilinear resize back to the scan grid (SimpleITK), nibabel and highdicom writes,
matplotlib pictures. Each run is a fresh process (peak RSS is the process's own high-water
mark, VmHWM); rounds interleave the two tools, so both see the same machine load::

    python benchmarks/bench_pipeline.py                        # 300 and 1,000 slices
    python benchmarks/bench_pipeline.py --slices 300 --rounds 3 --quick
    python benchmarks/bench_pipeline.py --suite folder         # cases/min, serial vs prefetch
    python benchmarks/bench_pipeline.py --device cuda --out /some/folder   # on a GPU

``--device cuda`` puts the model, the CAM and the resampling back to the scan grid on the GPU
for both tools (the minimal pipeline then resamples with ``torch.nn.functional.grid_sample``
on the device, slab by slab). Without SimpleITK (or with ``--reader pydicom``) the minimal
pipeline reads the series with pydicom and resamples with torch; the results record which
reader and resampler it used, and the load average (``os.getloadavg()``) before each run.

Runtime on 2 loaded CPU cores: about 10 minutes for the default (one round; most of it the
1,000-slice runs, the series are made once); ``--suite folder`` about 5 more; on a 16-core
GPU machine the default takes about 3-4 minutes. Results: ``<out>/pipeline_<device>.json``
and ``.md`` (``pipeline_<device>_both.*`` for both suites; ``--out`` defaults to
``benchmarks/results``). The series are cached under ``--work`` (default: a ``medcam-bench``
folder in the system's temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procmem import peak_rss

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
BUNDLE = ROOT / "examples" / "bundles" / "classify3d"
FORMATS = "nifti,dicom-pm,dicom-seg,dicom-sc,png,json"
LAYER = "class_layers.relu"  # the same layer and method (Grad-CAM) for both tools


# ----------------------------------------------------------------------------- data


def make_series(folder: Path, slices: int, size: int = 512, seed: int = 0) -> Path:
    """A CT-like chest series (air, body, lungs, spine, a lesion, noise), 0.8 x 0.8 x 1.5 mm,
    written slice by slice (a 1,000-slice volume is never held in memory)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    spacing = (0.8, 0.8, 1.5)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    x = (np.arange(size) - size / 2 + 0.5) * spacing[0]
    y = (np.arange(size) - size / 2 + 0.5) * spacing[1]
    xx, yy = np.meshgrid(x, y, indexing="xy")  # (rows, columns)
    body = (xx / 170) ** 2 + (yy / 120) ** 2 <= 1
    lungs = (((xx - 75) / 60) ** 2 + (yy / 70) ** 2 <= 1) | (
        ((xx + 75) / 60) ** 2 + (yy / 70) ** 2 <= 1
    )
    spine = xx**2 + (yy - 70) ** 2 <= 18**2
    length = slices * spacing[2]
    lesion = (60.0, -20.0, 0.55 * length)
    for k in range(slices):
        z = k * spacing[2]
        hu = np.full((size, size), -1000.0, np.float32)
        hu[body] = 40.0
        if 0.2 * length < z < 0.6 * length:
            hu[lungs] = -850.0
        hu[spine] = 700.0
        hu[(xx - lesion[0]) ** 2 + (yy - lesion[1]) ** 2 + (z - lesion[2]) ** 2 <= 20.0**2] = 120.0
        hu += rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
        ds = pydicom.Dataset()
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
        ds.PatientName, ds.PatientID = "Bench^CT", "BENCH"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "CT", 1, "bench chest"
        ds.PatientPosition, ds.BodyPartExamined, ds.Manufacturer = "HFS", "CHEST", "bench"
        ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(x[0]), float(y[0]), z]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.KVP, ds.WindowCenter, ds.WindowWidth = 120, 40, 400
        ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / f"ct_{k:04d}.dcm", enforce_file_format=True)
    done.touch()
    return folder


# ----------------------------------------------------------------------------- the minimal pipeline


def read_series(series: Path):
    """The series as a float32 ``(Z, Y, X)`` volume in HU, its LPS affine (index ``(x, y, z)``
    -> mm), the files in slice order and the reader used: SimpleITK when it is installed,
    else pydicom (slices sorted along the slice normal)."""
    import numpy as np

    try:
        import SimpleITK as sitk
    except ImportError:
        sitk = None
    if sitk is not None and os.environ.get("MEDCAM_BENCH_READER") != "pydicom":
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.SetOutputPixelType(sitk.sitkFloat32)
        image = reader.Execute()  # LPS, HU
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(
            image.GetSpacing()
        )
        affine[:3, 3] = image.GetOrigin()
        return sitk.GetArrayViewFromImage(image), affine, files, "SimpleITK", image
    import pydicom

    headers = []
    for f in sorted(series.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        headers.append((f, ds))
    iop = np.asarray(headers[0][1].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(
        key=lambda fd: float(np.dot(normal, np.asarray(fd[1].ImagePositionPatient, float)))
    )
    first = headers[0][1]
    positions = np.asarray([h[1].ImagePositionPatient for h in headers], dtype=np.float64)
    dz = float(np.dot(normal, positions[-1] - positions[0])) / max(len(headers) - 1, 1)
    row, col = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = iop[:3] * col, iop[3:] * row, normal * dz
    affine[:3, 3] = positions[0]
    volume = np.empty((len(headers), int(first.Rows), int(first.Columns)), np.float32)
    for k, (f, _) in enumerate(headers):
        ds = pydicom.dcmread(f)
        np.multiply(ds.pixel_array, float(ds.RescaleSlope), out=volume[k], casting="unsafe")
        volume[k] += float(ds.RescaleIntercept)
    return volume, affine, [str(f) for f, _ in headers], "pydicom", None


def _torch_resample(source, source_affine, target_affine, target_shape, device, fill=0.0,
                    slab=32):  # fmt: skip
    """Trilinear samples of ``source: (Z, Y, X)`` (torch, on ``device``; affine: index
    ``(x, y, z)`` -> mm) at the voxels of a target grid ``(Z, Y, X)``, in slabs of ``slab``
    target slices; returns a float32 NumPy ``(Z, Y, X)`` array."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    m = np.linalg.solve(source_affine, target_affine)  # target index -> source index
    zs, ys, xs = target_shape
    size = torch.tensor(source.shape[::-1], dtype=torch.float32, device=device)  # (X, Y, Z)
    rot = torch.as_tensor(m[:3, :3], dtype=torch.float32, device=device)
    shift = torch.as_tensor(m[:3, 3], dtype=torch.float32, device=device)
    src = (source - fill)[None, None]
    out = np.empty(target_shape, np.float32)
    jj, ii = torch.meshgrid(torch.arange(ys, device=device, dtype=torch.float32),
                            torch.arange(xs, device=device, dtype=torch.float32),
                            indexing="ij")  # fmt: skip
    for z0 in range(0, zs, slab):
        z1 = min(z0 + slab, zs)
        kk = torch.arange(z0, z1, device=device, dtype=torch.float32)[:, None, None]
        idx = torch.stack(torch.broadcast_tensors(ii[None], jj[None], kk), dim=-1)  # (x, y, z)
        pos = idx @ rot.T + shift
        grid = (2.0 * pos / (size - 1) - 1.0)[None]
        sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)[0, 0] + fill  # fmt: skip
        out[z0:z1] = sampled.cpu().numpy()
    return out


def run_minimal(series: Path, out: Path, device: str) -> dict[str, float]:
    """The job done directly; returns seconds per stage (and, as ``"reader"`` /
    ``"resample"``, which library read the series and resampled)."""
    import glob

    import highdicom as hd
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    import pydicom
    import torch
    import torch.nn.functional as F
    from monai.networks.nets import DenseNet
    from pydicom.sr.codedict import codes

    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = now - t
        t = now

    out.mkdir(parents=True, exist_ok=True)
    volume, scan_affine, files, reader_name, image = read_series(series)
    use_sitk = image is not None and device == "cpu"  # SimpleITK resamples on the CPU only
    lap("load")
    # the bundle's model grid: RAS axes, 4 mm, 48^3 centred on the scan
    size, step = 48, 4.0
    shape_xyz = np.asarray(volume.shape[::-1], dtype=np.float64)
    centre = (scan_affine @ np.append((shape_xyz - 1) / 2.0, 1.0))[:3]
    direction = np.diag([-1.0, -1.0, 1.0])  # RAS axes, in LPS
    half = step * (size - 1) / 2.0
    origin = centre - direction @ np.full(3, half)
    grid_affine = np.eye(4)
    grid_affine[:3, :3] = direction * step
    grid_affine[:3, 3] = origin
    if use_sitk:
        import SimpleITK as sitk

        grid = sitk.Image([size] * 3, sitk.sitkFloat32)
        grid.SetSpacing([step] * 3)
        grid.SetOrigin(origin.tolist())
        grid.SetDirection(direction.flatten().tolist())
        small = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1000.0)
        x = sitk.GetArrayFromImage(small).transpose(2, 1, 0)
    else:
        vol_t = torch.as_tensor(np.asarray(volume), device=device)
        x = _torch_resample(vol_t, scan_affine, grid_affine, (size,) * 3, device, fill=-1000.0)
        x = x.transpose(2, 1, 0)
        del vol_t
    x = np.clip((x + 200.0) / 600.0, 0.0, 1.0)
    batch = torch.as_tensor(x, dtype=torch.float32, device=device)[None, None]
    lap("preprocess")
    net = DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=8,
                   growth_rate=8, block_config=(3, 3), bn_size=2)  # fmt: skip
    net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", map_location="cpu"))
    net = net.to(device).eval()
    layer = dict(net.named_modules())[LAYER]
    acts = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.enable_grad():
        logits = net(batch)
        cls = int(logits[0].argmax())
        (grad,) = torch.autograd.grad(logits[0, cls], acts[0])
    handle.remove()
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * acts[0]).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]
    if device != "cpu":
        torch.cuda.synchronize()
    lap("explain")
    if use_sitk:
        cam_img = sitk.GetImageFromArray(cam.cpu().numpy().transpose(2, 1, 0).copy())
        cam_img.CopyInformation(grid)
        back = sitk.Resample(cam_img, image, sitk.Transform(), sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32)  # fmt: skip
        heat = sitk.GetArrayViewFromImage(back)  # (Z, Y, X) float32
    else:  # on the device, slab by slab; cam is indexed (u, v, w): as (Z, Y, X) its transpose
        cam_zyx = cam.permute(2, 1, 0).contiguous()
        heat = _torch_resample(cam_zyx, grid_affine, scan_affine, volume.shape, device,
                               slab=64 if device != "cpu" else 16)  # fmt: skip
    times["reader"] = reader_name
    times["resample"] = "SimpleITK" if use_sitk else f"torch grid_sample ({device})"
    lap("back to scan")
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    nii = nib.Nifti1Image(heat.T, lps_to_ras @ scan_affine)
    nii.header.set_intent("estimate", name="GradCAM")
    nib.save(nii, out / "heat.nii.gz")
    lap("nifti")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    lo, hi = float(heat.min()), float(heat.max())
    hi = hi if hi > lo else lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="gradcam", lut_explanation="Grad-CAM", unit=codes.UCUM.NoUnits,
        value_range=(lo, hi), intercept=0.0, slope=1.0,
        quantity_definition=codes.DCM.GradientWeightedClassActivation,
    )  # fmt: skip
    pm = hd.pm.ParametricMap(
        source_images=sources, pixel_array=heat, series_instance_uid=hd.UID(), series_number=90,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="bench",
        manufacturer_model_name="minimal", software_versions="0", device_serial_number="0",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        window_center=(lo + hi) / 2, window_width=hi - lo,
    )  # fmt: skip
    pm.save_as(out / "pm.dcm")
    del pm
    lap("dicom-pm")
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="gradcam", segmented_property_category=
        codes.SCT.SpatialAndRelationalConcept, segmented_property_type=
        codes.DCM.GradientWeightedClassActivation,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="bench", family=codes.cid7162.ArtificialIntelligence, version="0"),
    )  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=(heat >= 0.5 * hi).astype(np.uint8),
        segmentation_type="BINARY", segment_descriptions=[segment], omit_empty_frames=False,
        series_instance_uid=hd.UID(), series_number=91, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="bench", manufacturer_model_name="minimal",
        software_versions="0", device_serial_number="0",
    )  # fmt: skip
    seg.save_as(out / "seg.dcm")
    del seg
    lap("dicom-seg")
    jet = matplotlib.colormaps["jet"]
    sc_dir = out / "sc"
    sc_dir.mkdir(exist_ok=True)
    series_uid = hd.UID()
    for k, ds in enumerate(sources):
        gray = np.clip((volume[k] + 160.0) / 400.0, 0.0, 1.0)[..., None]
        h = np.clip(heat[k] / hi, 0.0, 1.0)
        a = (0.4 * h)[..., None]
        rgb = np.round(((1 - a) * gray + a * jet(h)[..., :3]) * 255).astype(np.uint8)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ds, pixel_array=rgb, photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid,
            sop_instance_uid=hd.UID(), series_number=92, instance_number=k + 1,
            manufacturer="bench", pixel_spacing=[float(v) for v in ds.PixelSpacing],
            patient_orientation=("L", "P"),
        )  # fmt: skip
        sc.save_as(sc_dir / f"sc_{k:04d}.dcm")
    lap("dicom-sc")
    zyx = np.unravel_index(int(np.argmax(heat)), heat.shape)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    cuts = [(volume[zyx[0]], heat[zyx[0]]), (volume[:, zyx[1]], heat[:, zyx[1]]),
            (volume[:, :, zyx[2]], heat[:, :, zyx[2]])]  # fmt: skip
    for ax, (img, h) in zip(axes, cuts, strict=True):
        ax.imshow(img, cmap="gray", vmin=-160, vmax=240)
        ax.imshow(h, cmap="jet", alpha=0.4)
        ax.axis("off")
    fig.savefig(out / "views.png", dpi=90)
    plt.close(fig)
    lap("png")
    record = {"class": cls, "layer": LAYER, "files": sorted(glob.glob(str(out / "*")))}
    (out / "case.json").write_text(json.dumps(record, indent=2))
    lap("json")
    return times


# ----------------------------------------------------------------------------- runs


def child_cli(argv: list[str]) -> None:
    """Run medcam's command line (the ``medcam`` entry point) in this process, then report
    this process's peak RSS on stderr."""
    from medcam.cli import main as medcam_main

    code = 0
    try:
        medcam_main(argv, standalone_mode=False)
    except SystemExit as err:
        code = int(err.code or 0)
    finally:
        print(f"BENCH_PEAK_RSS {peak_rss()}", file=sys.stderr, flush=True)
    sys.exit(code)


def child_minimal(series: str, out: str, device: str) -> None:
    times = run_minimal(Path(series), Path(out), device)
    info = {k: times.pop(k) for k in ("reader", "resample")}
    print(f"BENCH_INFO {json.dumps(info)}", file=sys.stderr, flush=True)
    print(f"BENCH_STAGES {json.dumps(times)}", file=sys.stderr, flush=True)
    print(f"BENCH_PEAK_RSS {peak_rss()}", file=sys.stderr, flush=True)


_STAGE = re.compile(r"([a-z][a-z -]*?) (\d+\.\d+) s")


def medcam_stages(text: str) -> dict[str, float]:
    """Stage times from medcam's per-case line: ``... (n outputs): load 1.23 s, ...``."""
    for line in text.splitlines():
        if " outputs): " in line:
            return {k.strip(): float(v) for k, v in _STAGE.findall(line.split("outputs): ", 1)[1])}
    return {}


def run_tool(tool: str, series: Path, out: Path, device: str, extra: list[str]) -> dict:
    """One fresh process: wall seconds, peak RSS and stage times."""
    shutil.rmtree(out, ignore_errors=True)
    if tool == "medcam":
        cmd = [sys.executable, __file__, "--child-cli", "--", "explain", str(series),
               "--bundle", str(BUNDLE), "--layer", LAYER, "--method", "gradcam", "--format",
               FORMATS, "--out", str(out), "--device", device, *extra]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--child-minimal", str(series), str(out), device]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path)  # medcam from this tree
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss = int(re.search(r"BENCH_PEAK_RSS (\d+)", done.stderr).group(1))
    info: dict = {}
    if tool == "medcam":
        stages = medcam_stages(done.stdout + "\n" + done.stderr)
        for sidecar in sorted(out.rglob("*.json")):  # how medcam went back to the scan grid
            explanation = json.loads(sidecar.read_text()).get("explanation", {})
            if "inverse" in explanation:
                info["inverse"] = explanation["inverse"]
                break
    else:
        stages = json.loads(re.search(r"BENCH_STAGES (\{.*\})", done.stderr).group(1))
        info = json.loads(re.search(r"BENCH_INFO (\{.*\})", done.stderr).group(1))
    return {"wall_s": wall, "peak_rss_mb": rss / 2**20, "stages": stages, "info": info,
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}  # fmt: skip


def median_stages(runs: list[dict]) -> dict[str, float]:
    names = list(dict.fromkeys(k for r in runs for k in r["stages"]))
    return {n: statistics.median(r["stages"].get(n, 0.0) for r in runs) for n in names}


def pipeline_suite(args, work: Path) -> dict:
    results = {}
    for slices in args.slices:
        series = make_series(work / f"ct512x512x{slices}", slices)
        runs: dict[str, list[dict]] = {"medcam": [], "minimal": []}
        for r in range(args.rounds):
            order = ["medcam", "minimal"] if r % 2 == 0 else ["minimal", "medcam"]
            for tool in order:
                res = run_tool(tool, series, work / f"out-{tool}", args.device, [])
                runs[tool].append(res)
                print(f"{slices} slices, round {r + 1}, {tool}: {res['wall_s']:.1f} s, "
                      f"peak {res['peak_rss_mb']:.0f} MB, load {res['load_avg_before']:.1f}",
                      flush=True)  # fmt: skip
        summary = {}
        for tool, rs in runs.items():
            summary[tool] = {
                "wall_s": statistics.median(r["wall_s"] for r in rs),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                "stages": median_stages(rs),
                "info": rs[-1]["info"],
            }
        summary["ratio_wall"] = summary["medcam"]["wall_s"] / summary["minimal"]["wall_s"]
        summary["ratio_rss"] = summary["medcam"]["peak_rss_mb"] / summary["minimal"]["peak_rss_mb"]
        summary["runs"] = runs
        results[str(slices)] = summary
    return results


def folder_suite(args, work: Path) -> dict:
    """Cases per minute for a folder of cases, serial (--prefetch 0) and overlapped."""
    folder = work / f"folder-{args.cases}x{args.folder_slices}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        for i in range(args.cases):
            make_series(folder / f"case{i:02d}", args.folder_slices, seed=i)
        (folder / ".complete").touch()
    runs: dict[str, list[dict]] = {"serial": [], "overlapped": []}
    for r in range(args.rounds):
        order = ["serial", "overlapped"] if r % 2 == 0 else ["overlapped", "serial"]
        for mode in order:
            extra = ["--prefetch", "0"] if mode == "serial" else []
            res = run_tool("medcam", folder, work / f"out-folder-{mode}", args.device, extra)
            res["cases_per_min"] = 60.0 * args.cases / res["wall_s"]
            runs[mode].append(res)
            print(f"folder, round {r + 1}, {mode}: {res['wall_s']:.1f} s "
                  f"({res['cases_per_min']:.2f} cases/min), peak {res['peak_rss_mb']:.0f} MB, "
                  f"load {res['load_avg_before']:.1f}", flush=True)  # fmt: skip
    summary = {m: {"wall_s": statistics.median(r["wall_s"] for r in rs),
                   "cases_per_min": statistics.median(r["cases_per_min"] for r in rs),
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs)}
               for m, rs in runs.items()}  # fmt: skip
    serial, overlapped = summary["serial"], summary["overlapped"]
    summary["speedup"] = overlapped["cases_per_min"] / serial["cases_per_min"]
    summary["cases"], summary["slices_per_case"] = args.cases, args.folder_slices
    summary["runs"] = runs
    return summary


def machine() -> dict:
    import numpy
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "cpus": os.cpu_count(),
            "load_avg_start": os.getloadavg()}  # fmt: skip
    try:
        import medcam

        info["medcam"] = medcam.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import SimpleITK

        info["SimpleITK"] = SimpleITK.Version_VersionString()
    except ImportError:
        info["SimpleITK"] = None  # the minimal pipeline reads with pydicom
    return info


def write_markdown(path: Path, result: dict) -> None:
    m = result["machine"]
    load = ", ".join(f"{v:.1f}" for v in m["load_avg_start"])
    lines = [f"# Pipeline benchmark ({result['device']})", "",
             f"Python {m['python']}, torch {m['torch']}, NumPy {m['numpy']}, medcam "
             f"{m.get('medcam', '?')}, SimpleITK {m.get('SimpleITK') or 'not installed'}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; {m['cpus']} CPUs.", "",
             f"Load average (1, 5, 15 min) at start {load}; at end "
             f"{result['load_avg_end'][0]:.1f}. {result['rounds']} round(s) per tool and size "
             "(medians), tools interleaved.", ""]  # fmt: skip
    for slices, s in result.get("pipeline", {}).items():
        mi, me = s["minimal"].get("info", {}), s["medcam"].get("info", {})
        inverse = me.get("inverse") or {}
        lines += [f"## 512 x 512 x {slices} CT series, every format", "",
                  f"Minimal pipeline: read with {mi.get('reader')}, resampled with "
                  f"{mi.get('resample')}. medcam back to the scan grid: "
                  f"{inverse.get('method', '?')} ({inverse.get('resamples', '?')} resample of "
                  f"{', '.join(inverse.get('transforms', []))}).", "",
                  "| | medcam | minimal | ratio |", "| --- | ---: | ---: | ---: |",
                  f"| wall, s | {s['medcam']['wall_s']:.1f} | {s['minimal']['wall_s']:.1f} | "
                  f"**{s['ratio_wall']:.2f}** |",
                  f"| peak RSS, MB | {s['medcam']['peak_rss_mb']:.0f} | "
                  f"{s['minimal']['peak_rss_mb']:.0f} | **{s['ratio_rss']:.2f}** |"]  # fmt: skip
        stages = list(dict.fromkeys([*s["medcam"]["stages"], *s["minimal"]["stages"]]))
        for name in stages:
            a, b = s["medcam"]["stages"].get(name), s["minimal"]["stages"].get(name)
            fa = f"{a:.2f}" if a is not None else "–"
            fb = f"{b:.2f}" if b is not None else "–"
            lines.append(f"| {name}, s | {fa} | {fb} | |")
        lines.append("")
    folder = result.get("folder")
    if folder:
        lines += [f"## Folder of {folder['cases']} cases ({folder['slices_per_case']} slices each)",
                  "", "| | serial (--prefetch 0) | overlapped (default) |",
                  "| --- | ---: | ---: |",
                  f"| cases/min | {folder['serial']['cases_per_min']:.2f} | "
                  f"{folder['overlapped']['cases_per_min']:.2f} |",
                  f"| wall, s | {folder['serial']['wall_s']:.1f} | "
                  f"{folder['overlapped']['wall_s']:.1f} |",
                  f"| peak RSS, MB | {folder['serial']['peak_rss_mb']:.0f} | "
                  f"{folder['overlapped']['peak_rss_mb']:.0f} |", "",
                  f"Speed-up: **{folder['speedup']:.2f}x**.", ""]  # fmt: skip
    path.write_text("\n".join(lines))


#: What both pipelines import (SimpleITK is optional: the minimal pipeline then reads with
#: pydicom and resamples with torch).
NEEDED = ("torch", "monai", "pydicom", "highdicom", "nibabel", "matplotlib", "click", "tqdm",
          "numpy")  # fmt: skip


def preflight() -> None:
    """Stop before any work, naming the packages missing here."""
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"bench_pipeline: missing packages: {', '.join(missing)} (pip install them).")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-cli":
        child_cli(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-minimal":
        child_minimal(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="300,1000", help="series lengths (default 300,1000)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per tool and size")
    parser.add_argument("--suite", default="pipeline", help="pipeline, folder or both")
    parser.add_argument("--cases", type=int, default=6, help="folder suite: number of cases")
    parser.add_argument("--folder-slices", type=int, default=120)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "medcam-bench"))
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results")
    parser.add_argument(
        "--reader",
        choices=["auto", "pydicom"],
        default="auto",
        help="the minimal pipeline's reader: SimpleITK when installed, or pydicom",
    )
    parser.add_argument("--quick", action="store_true", help="do not write results")
    args = parser.parse_args()
    preflight()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("bench_pipeline: --device cuda, but torch sees no CUDA device.")
    args.slices = [int(v) for v in str(args.slices).split(",")]
    if args.reader == "pydicom":
        os.environ["MEDCAM_BENCH_READER"] = "pydicom"  # the children inherit it
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": args.device, "machine": machine(), "rounds": args.rounds}
    suites = ["pipeline", "folder"] if args.suite == "both" else [args.suite]
    if "pipeline" in suites:
        result["pipeline"] = pipeline_suite(args, work)
    if "folder" in suites:
        result["folder"] = folder_suite(args, work)
    result["load_avg_end"] = os.getloadavg()
    name = f"pipeline_{args.device.split(':')[0]}"
    if args.suite != "pipeline":
        name += f"_{args.suite}"
    text = json.dumps(result, indent=2)
    results = Path(args.out)
    print(text if args.quick else f"results: {results / name}.json / .md")
    if not args.quick:
        results.mkdir(parents=True, exist_ok=True)
        (results / f"{name}.json").write_text(text)
        write_markdown(results / f"{name}.md", result)


if __name__ == "__main__":
    main()
