"""Engine speed: medcam vs MONAI GradCAM, pytorch-grad-cam and Captum, side by side.

One run, the same model and input for every tool, rounds interleaved (each round runs every
case once, in order), medians reported with ratios and peak memory::

    python benchmarks/bench_engine.py                   # CPU, DenseNet121-3D 96^3 + ResNet18-2D
    python benchmarks/bench_engine.py --device cuda     # on a GPU
    python benchmarks/bench_engine.py --rounds 3 --size 64 --quick

Results go to ``benchmarks/results/engine_<device>.json`` and ``.md``.

Install the comparison tools with ``bash benchmarks/install.sh`` (grad-cam without its
torchvision dependency, which would replace the CPU torch wheel). pytorch-grad-cam imports
torchvision only for utilities the benchmark does not use (image preprocessing, detection box
IoU); where torchvision cannot be imported, a stub module stands in for it at import time and
the result file says so. The Grad-CAM code path measured is pytorch-grad-cam's own.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, resnet18

import medcam

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- tools


def import_pytorch_grad_cam() -> tuple[types.ModuleType | None, str]:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # the CPU torch wheel + PyPI torchvision do not load together
        note = f"torchvision stubbed ({type(err).__name__}: {str(err)[:80]})"
        stub = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        for name in ("Compose", "Normalize", "ToTensor"):
            setattr(transforms, name, object)
        functional.resize = None
        transforms.functional = functional
        stub.transforms = transforms
        stub.ops = types.ModuleType("torchvision.ops")
        for mod in (stub, transforms, functional, stub.ops):
            sys.modules[mod.__name__] = mod
    else:
        note = "real torchvision"
    try:
        return importlib.import_module("pytorch_grad_cam"), note
    except ImportError as err:
        return None, f"pytorch-grad-cam not installed ({err})"


def import_captum():
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        return None
    return LayerGradCam, LayerAttribution


# ----------------------------------------------------------------------------- memory


def cuda_peak(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - start


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM; unlike ru_maxrss, it is not
    inherited from the parent across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cpu_peak_in_fresh_process(argv: list[str], model_index: int, case: str) -> int:
    """Peak RSS growth of one call of ``case``, measured in a fresh process.

    The CPU allocator keeps freed memory, so in-process RSS sampling says little about one case
    among others; a fresh process that builds everything, then runs the case once, does.
    """
    cmd = [sys.executable, __file__, *argv, "--one-case", str(model_index), case]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- cases


def build_cases(
    net: torch.nn.Module, layer: str, x: torch.Tensor, num_classes: int, pgc, captum
) -> dict[str, Callable[[], object]]:
    """Every case as a no-argument callable returning something that holds the full map."""
    spatial = tuple(x.shape[2:])
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    classes = list(range(num_classes))
    cases: dict[str, Callable[[], object]] = {}

    def forward_no_grad():
        with torch.no_grad():
            return net(x)

    def forward_with_graph():
        with torch.enable_grad():
            return net(x).sum()

    def forward_backward():
        net.zero_grad(set_to_none=True)
        out = net(x)
        out[:, 0].sum().backward()
        net.zero_grad(set_to_none=True)
        return out

    cases["forward (no grad)"] = forward_no_grad
    cases["forward with graph"] = forward_with_graph
    cases["forward+backward (param grads)"] = forward_backward

    explainer = medcam.Explainer(net, layer, "gradcam")
    cases["medcam 1 class"] = lambda: explainer(x, 0).heatmap
    cases[f"medcam {num_classes} classes"] = lambda: explainer(x, "all").heatmap

    from monai.visualize import GradCAM as MonaiGradCAM

    monai_cam = MonaiGradCAM(copy.deepcopy(net), target_layers=layer, postprocessing=lambda t: t)
    cases["MONAI GradCAM 1 class"] = lambda: monai_cam(x, class_idx=0)
    cases[f"MONAI GradCAM {num_classes} classes"] = lambda: [
        monai_cam(x, class_idx=c) for c in classes
    ]

    if pgc is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc_net = copy.deepcopy(net)
        pgc_layer = dict(pgc_net.named_modules())[layer]
        pgc_cam = pgc.GradCAM(model=pgc_net, target_layers=[pgc_layer])
        xb = x.repeat(num_classes, *([1] * (x.ndim - 1)))
        cases["pytorch-grad-cam 1 class"] = lambda: pgc_cam(
            input_tensor=x, targets=[ClassifierOutputTarget(0)]
        )
        cases[f"pytorch-grad-cam {num_classes} classes (batched input)"] = lambda: pgc_cam(
            input_tensor=xb, targets=[ClassifierOutputTarget(c) for c in classes]
        )
    if captum is not None:
        layer_grad_cam, layer_attribution = captum
        lgc = layer_grad_cam(net, dict(net.named_modules())[layer])
        xb = x.repeat(num_classes, *([1] * (x.ndim - 1)))

        def captum_case(inp, target):
            attr = lgc.attribute(inp, target=target, relu_attributions=True)
            return layer_attribution.interpolate(attr, spatial, interpolate_mode=mode)

        cases["Captum LayerGradCam 1 class"] = lambda: captum_case(x, 0)
        cases[f"Captum {num_classes} classes (batched input)"] = lambda: captum_case(xb, classes)
    return cases


def agreement(net, layer, x, pgc, captum) -> dict[str, float | None]:
    """Pearson r of each tool's map with medcam's (first sample, its predicted class)."""
    x = x[:1]
    result = medcam.explain(net, x, "pred", layers=layer)
    cls = int(result.classes[0, 0])
    ours = result.heatmap[0, 0].flatten().cpu()
    out: dict[str, float | None] = {"class": cls}
    from monai.visualize import GradCAM as MonaiGradCAM

    monai_cam = MonaiGradCAM(copy.deepcopy(net), layer, postprocessing=lambda t: t)
    monai_map = monai_cam(x, class_idx=cls)
    maps = {"MONAI": monai_map[0, 0].detach()}
    if pgc is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc_net = copy.deepcopy(net)
        cam = pgc.GradCAM(model=pgc_net, target_layers=[dict(pgc_net.named_modules())[layer]])
        maps["pytorch-grad-cam (min-max, scipy zoom)"] = torch.as_tensor(
            cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)])[0]
        )
    if captum is not None:
        lgc = captum[0](net, dict(net.named_modules())[layer])
        attr = lgc.attribute(x, target=cls, relu_attributions=True)
        mode = "trilinear" if x.ndim == 5 else "bilinear"
        maps["Captum"] = F.interpolate(attr, x.shape[2:], mode=mode, align_corners=False)[0, 0]
    for name, m in maps.items():
        m = m.detach().float().flatten().cpu()
        r = torch.corrcoef(torch.stack([ours, m]))[0, 1]
        out[name] = None if torch.isnan(r) else float(r)  # None: a constant (all-zero) map
    return out


def run_model(index, name, net, layer, x, num_classes, args, device, pgc, captum) -> dict:
    net = net.to(device).eval()
    x = x.to(device)
    cases = build_cases(net, layer, x, num_classes, pgc, captum)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peaks: dict[str, int] = {}
    for case, fn in cases.items():  # warm-up round, which also measures memory
        if device.type == "cuda":
            peaks[case] = cuda_peak(fn)
        else:
            fn()
            peaks[case] = cpu_peak_in_fresh_process(args.argv, index, case)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for case, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times[case].append(time.perf_counter() - t0)
            del out
        print(f"  {name}: round {r + 1}/{args.rounds} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    fb = med["forward+backward (param grads)"]
    fg = med["forward with graph"]
    rows = [
        {
            "case": k,
            "median_s": med[k],
            "ratio_to_forward_backward": med[k] / fb,
            "ratio_to_forward_with_graph": med[k] / fg,
            "peak_mem_mb": peaks[k] / 2**20,
            "times_s": times[k],
        }
        for k in cases
    ]
    mc1, mck = med["medcam 1 class"], med[f"medcam {num_classes} classes"]
    summary = {
        "medcam_all_classes_over_forward_with_graph": mck / fg,
        "monai_over_medcam_1_class": med["MONAI GradCAM 1 class"] / mc1,
        f"monai_over_medcam_{num_classes}_classes": med[f"MONAI GradCAM {num_classes} classes"]
        / mck,
    }
    if pgc is not None:
        summary["pytorch_grad_cam_over_medcam_1_class"] = med["pytorch-grad-cam 1 class"] / mc1
    if captum is not None:
        summary["captum_over_medcam_1_class"] = med["Captum LayerGradCam 1 class"] / mc1
    return {
        "model": name,
        "layer": layer,
        "input_shape": list(x.shape),
        "feature_shape": list(medcam.explain(net, x, 0, layers=layer).feature_shapes[layer]),
        "num_classes": num_classes,
        "rounds": args.rounds,
        "rows": rows,
        "summary": summary,
        "agreement_r_with_medcam": agreement(net, layer, x, pgc, captum),
    }


def to_markdown(report: dict) -> str:
    lines = [
        f"# Engine benchmark ({report['device']})",
        "",
        f"{report['when']}; torch {report['torch']}, monai {report['monai']}, "
        f"{report['threads']} threads; pytorch-grad-cam: {report['pytorch_grad_cam']}; "
        f"captum: {report['captum']}. Medians of {report['rounds']} interleaved rounds after a "
        "warm-up round. Peak memory: growth during one call (CUDA: allocator peak above the "
        "allocation before the call; CPU: peak RSS growth in a fresh process that builds the "
        "models, then runs the case once).",
        "",
    ]
    for model in report["models"]:
        lines += [
            f"## {model['model']}, input {tuple(model['input_shape'])}, layer "
            f"`{model['layer']}` (feature grid {tuple(model['feature_shape'])})",
            "",
            "| case | median s | volumes/s | ÷ fwd+bwd | ÷ fwd with graph | peak MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        batch = model["input_shape"][0]
        for r in model["rows"]:
            lines.append(
                f"| {r['case']} | {r['median_s']:.3f} | {batch / r['median_s']:.2f} | "
                f"{r['ratio_to_forward_backward']:.2f} | {r['ratio_to_forward_with_graph']:.2f} | "
                f"{r['peak_mem_mb']:.0f} |"
            )
        lines += ["", "| summary | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in model["summary"].items()]
        agree = dict(model["agreement_r_with_medcam"])
        lines += [
            "",
            f"Agreement with medcam's map (Pearson r, full resolution, sample 0, predicted class "
            f"{agree.pop('class')}):",
            "",
        ]
        lines += [f"- {k}: {'constant map' if v is None else f'{v:.4f}'}" for k, v in agree.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=96, help="3D input edge length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="3D model only")
    parser.add_argument("--one-case", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.argv = ["--size", str(args.size), "--batch", str(args.batch), "--device", args.device]
    args.argv += ["--quick"] if args.quick else []
    device = torch.device(args.device)
    pgc, pgc_note = import_pytorch_grad_cam()
    captum = import_captum()
    models = make_models(args)
    if args.one_case:
        index, case = int(args.one_case[0]), args.one_case[1]
        name, net, layer, x, k = models[index]
        fn = build_cases(net.eval(), layer, x, k, pgc, captum)[case]
        before = peak_rss()
        fn()
        print(peak_rss() - before)
        return
    import monai

    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "threads": torch.get_num_threads(),
        "pytorch_grad_cam": pgc_note,
        "captum": "installed" if captum else "not installed",
        "rounds": args.rounds,
        "models": [],
    }
    for index, (name, net, layer, x, k) in enumerate(models):
        print(f"{name} {tuple(x.shape)} layer {layer} on {device}", flush=True)
        result = run_model(index, name, net, layer, x, k, args, device, pgc, captum)
        report["models"].append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"engine_{device.type}" + (f"_b{args.batch}" if args.batch != 1 else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = to_markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    print(md)


def make_models(args: argparse.Namespace) -> list[tuple]:
    """(name, network, layer, input, num_classes) for each benchmarked model, seeded."""
    torch.manual_seed(0)
    models = [
        (
            "MONAI DenseNet121 3D",
            DenseNet121(spatial_dims=3, in_channels=1, out_channels=2),
            "class_layers.relu",
            torch.randn(args.batch, 1, args.size, args.size, args.size),
            2,
        )
    ]
    if not args.quick:
        models.append(
            (
                "MONAI ResNet18 2D",
                resnet18(spatial_dims=2, n_input_channels=1, num_classes=2),
                "layer4",
                torch.randn(args.batch, 1, 224, 224),
                2,
            )
        )
    return models


if __name__ == "__main__":
    main()
