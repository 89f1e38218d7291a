"""Engine speed: medcam vs MONAI GradCAM, pytorch-grad-cam and Captum, side by side.

One run, the same model and input for every tool, rounds interleaved (each round runs every
case once, in order), medians reported with ratios and peak memory::

    python benchmarks/bench_engine.py                   # CPU, every suite
    python benchmarks/bench_engine.py --device cuda     # on a GPU
    python benchmarks/bench_engine.py --rounds 3 --size 64 --quick
    python benchmarks/bench_engine.py --suite scorecam,transformer --rounds 3

Suites: ``cnn`` (Grad-CAM on DenseNet121-3D 96^3 and ResNet18-2D 224^2, against MONAI,
pytorch-grad-cam and Captum), ``scorecam`` (Score-CAM on ResNet18-2D, against pytorch-grad-cam's
ScoreCAM; it has no 3D Score-CAM), ``transformer`` (Grad-CAM on a MONAI ViT-3D's tokens, against
pytorch-grad-cam with a ``reshape_transform``). Results go to
``benchmarks/results/engine_<device>[_<suites>].json`` and ``.md``.

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
from procmem import peak_rss

import medcam

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- tools


def import_pytorch_grad_cam() -> tuple[types.ModuleType | None, str]:
    """pytorch-grad-cam, with a torchvision stub in ``sys.modules`` only while it is imported and
    only when the real torchvision cannot be (as in tests/engine/reference.py)."""
    stubs: list[types.ModuleType] = []
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
        stubs = [stub, transforms, functional, stub.ops]
        for mod in stubs:
            sys.modules[mod.__name__] = mod
    else:
        note = "real torchvision"
    try:
        return importlib.import_module("pytorch_grad_cam"), note
    except ImportError as err:
        return None, f"pytorch-grad-cam not installed ({err})"
    finally:
        for mod in stubs:
            sys.modules.pop(mod.__name__, None)


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


def cpu_peak_in_fresh_process(argv: list[str], model_index: int, case: str) -> int:
    """Peak RSS growth of one call of ``case``, measured in a fresh process.

    The CPU allocator keeps freed memory, so in-process RSS sampling says little about one case
    among others; a fresh process that builds everything, then runs the case once, does.
    """
    cmd = [sys.executable, __file__, *argv, "--one-case", str(model_index), case]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- cases


def baseline_cases(net: torch.nn.Module, x: torch.Tensor, output=None) -> dict[str, Callable]:
    """The model's own cost: forward without and with a graph, forward + full backward."""

    def logits(out):
        return out if output is None else out[output]

    def forward_no_grad():
        with torch.no_grad():
            return net(x)

    def forward_with_graph():
        with torch.enable_grad():
            return logits(net(x)).sum()

    def forward_backward():
        net.zero_grad(set_to_none=True)
        out = logits(net(x))
        out[:, 0].sum().backward()
        net.zero_grad(set_to_none=True)
        return out

    return {
        "forward (no grad)": forward_no_grad,
        "forward with graph": forward_with_graph,
        "forward+backward (param grads)": forward_backward,
    }


def scorecam_cases(net, layer, x, num_classes, pgc, captum, per_eval: int = 16) -> dict:
    """Score-CAM, one class, same number of masked inputs per forward pass for both tools."""
    cases = {"forward (no grad)": baseline_cases(net, x)["forward (no grad)"]}
    explainer = medcam.Explainer(net, layer, "scorecam", perturbations_per_eval=per_eval)
    cases["medcam Score-CAM 1 class"] = lambda: explainer(x, 0).heatmap
    cases[f"medcam Score-CAM {num_classes} classes"] = lambda: explainer(x, "all").heatmap
    if pgc is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc_net = copy.deepcopy(net)
        cam = pgc.ScoreCAM(model=pgc_net, target_layers=[dict(pgc_net.named_modules())[layer]])
        cam.batch_size = per_eval
        cases["pytorch-grad-cam ScoreCAM 1 class"] = lambda: cam(
            input_tensor=x, targets=[ClassifierOutputTarget(0)]
        )
    return cases


class ViTLogits(torch.nn.Module):
    """MONAI's ViT returns (logits, hidden states); pytorch-grad-cam needs the logits alone."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit(x)[0]


def vit_grid(net: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    stride = net.patch_embedding.patch_embeddings.stride
    return tuple(s // p for s, p in zip(x.shape[2:], stride, strict=True))


def transformer_cases(net, layer, x, num_classes, pgc, captum) -> dict:
    """Grad-CAM on a ViT block's tokens: medcam reads the grid from the model; pytorch-grad-cam
    gets the equivalent reshape_transform (drop the class token, tokens -> grid)."""
    cases = baseline_cases(net, x, output=0)
    explainer = medcam.Explainer(net, layer, "gradcam", output=0)
    cases["medcam 1 class"] = lambda: explainer(x, 0).heatmap
    cases[f"medcam {num_classes} classes"] = lambda: explainer(x, "all").heatmap
    if pgc is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        grid = vit_grid(net, x)

        def reshape(t):
            return t[:, 1:].reshape(t.shape[0], *grid, t.shape[-1]).movedim(-1, 1)

        wrapped = ViTLogits(copy.deepcopy(net))
        module = dict(wrapped.named_modules())[f"vit.{layer}"]
        cam = pgc.GradCAM(model=wrapped, target_layers=[module], reshape_transform=reshape)
        xb = x.repeat(num_classes, *([1] * (x.ndim - 1)))
        cases["pytorch-grad-cam 1 class"] = lambda: cam(
            input_tensor=x, targets=[ClassifierOutputTarget(0)]
        )
        cases[f"pytorch-grad-cam {num_classes} classes (batched input)"] = lambda: cam(
            input_tensor=xb, targets=[ClassifierOutputTarget(c) for c in range(num_classes)]
        )
    return cases


def build_cases(
    net: torch.nn.Module, layer: str, x: torch.Tensor, num_classes: int, pgc, captum,
    suite: str = "cnn",
) -> dict[str, Callable[[], object]]:  # fmt: skip
    """Every case as a no-argument callable returning something that holds the full map."""
    if suite == "scorecam":
        return scorecam_cases(net, layer, x, num_classes, pgc, captum)
    if suite == "transformer":
        return transformer_cases(net, layer, x, num_classes, pgc, captum)
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


def pearson(a: torch.Tensor, b) -> float | None:
    a = a.detach().float().flatten().cpu()
    b = torch.as_tensor(b).detach().float().flatten().cpu()
    r = torch.corrcoef(torch.stack([a, b]))[0, 1]
    return None if torch.isnan(r) else float(r)  # None: a constant (all-zero) map


def agreement_extra(suite, net, layer, x, pgc) -> dict[str, float | None]:
    """pytorch-grad-cam's map against medcam's (sample 0, class 0): Pearson r at full
    resolution with medcam's heatmap, and the largest difference from pytorch-grad-cam's own
    scaling + resizing (``scale_cam_image``, as in its BaseCAM) applied to medcam's raw map."""
    import numpy as np

    out: dict[str, float | None] = {"class": 0}
    if pgc is None:
        return out
    from pytorch_grad_cam.utils.image import scale_cam_image

    x = x[:1]
    cases = build_cases(net, layer, x, 2, pgc, None, suite)
    key = "pytorch-grad-cam ScoreCAM 1 class" if suite == "scorecam" else "pytorch-grad-cam 1 class"
    theirs = np.asarray(cases[key]())[0]
    method = "scorecam" if suite == "scorecam" else "gradcam"
    output = 0 if suite == "transformer" else None
    result = medcam.explain(net, x, 0, layers=layer, method=method, output=output)
    out["Pearson r, full resolution"] = pearson(result.heatmap[0, 0], theirs)
    size = tuple(reversed(x.shape[2:]))
    raw = result.raw[layer][:, 0].cpu().numpy()
    scaled = scale_cam_image(np.maximum(scale_cam_image(raw, size), 0))[0]
    out["max |difference| from its scaling of medcam's raw map"] = float(
        np.abs(scaled - theirs).max()
    )
    return out


def run_model(
    index, name, net, layer, x, num_classes, args, device, pgc, captum, suite="cnn"
) -> dict:
    net = net.to(device).eval()
    x = x.to(device)
    cases = build_cases(net, layer, x, num_classes, pgc, captum, suite)
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
    fb = med.get("forward+backward (param grads)", float("nan"))
    fg = med.get("forward with graph", med["forward (no grad)"])
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
    if suite != "cnn":
        return {
            "suite": suite,
            "model": name,
            "layer": layer,
            "input_shape": list(x.shape),
            "feature_shape": list(
                medcam.explain(
                    net, x, 0, layers=layer, output=0 if suite == "transformer" else None
                ).feature_shapes[layer]
            ),
            "num_classes": num_classes,
            "rounds": args.rounds,
            "rows": rows,
            "summary": extra_summary(suite, med, num_classes, pgc),
            "agreement_r_with_medcam": agreement_extra(suite, net, layer, x, pgc),
        }
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


def extra_summary(suite: str, med: dict, k: int, pgc) -> dict[str, float]:
    if suite == "scorecam":
        out = {"medcam_scorecam_1_class_s": med["medcam Score-CAM 1 class"]}
        if pgc is not None:
            out["pytorch_grad_cam_over_medcam_1_class"] = (
                med["pytorch-grad-cam ScoreCAM 1 class"] / med["medcam Score-CAM 1 class"]
            )
        return out
    out = {
        "medcam_all_classes_over_forward_with_graph": med[f"medcam {k} classes"]
        / med["forward with graph"]
    }
    if pgc is not None:
        out["pytorch_grad_cam_over_medcam_1_class"] = (
            med["pytorch-grad-cam 1 class"] / med["medcam 1 class"]
        )
        out[f"pytorch_grad_cam_over_medcam_{k}_classes"] = (
            med[f"pytorch-grad-cam {k} classes (batched input)"] / med[f"medcam {k} classes"]
        )
    return out


def to_markdown(report: dict) -> str:
    lines = [
        f"# Engine benchmark ({report['device']})",
        "",
        f"{report['when']}; torch {report['torch']}, monai {report['monai']}, "
        f"{report['threads']} threads; pytorch-grad-cam: {report['pytorch_grad_cam']}; "
        f"captum: {report['captum']}; machine load: {report.get('load', 'not recorded')}. "
        f"Medians of {report['rounds']} interleaved rounds after a "
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
        cls = agree.pop("class")
        if model.get("suite", "cnn") == "cnn":
            what = f"Pearson r, full resolution, sample 0, predicted class {cls}"
        else:
            what = f"pytorch-grad-cam, sample 0, class {cls}"
        lines += ["", f"Agreement with medcam's map ({what}):", ""]
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
    parser.add_argument("--quick", action="store_true", help="3D model only (cnn suite)")
    parser.add_argument("--suite", default="cnn,scorecam,transformer",
                        help="comma-separated: cnn, scorecam, transformer")  # fmt: skip
    parser.add_argument("--one-case", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.argv = ["--size", str(args.size), "--batch", str(args.batch), "--device", args.device]
    args.argv += ["--quick"] if args.quick else []
    args.argv += ["--suite", args.suite]
    device = torch.device(args.device)
    pgc, pgc_note = import_pytorch_grad_cam()
    captum = import_captum()
    models = make_models(args)
    if args.one_case:
        index, case = int(args.one_case[0]), args.one_case[1]
        suite, name, net, layer, x, k = models[index]
        fn = build_cases(net.eval(), layer, x, k, pgc, captum, suite)[case]
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
        "load": "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) at the start".format(
            *os.getloadavg()
        ),
        "models": [],
    }
    for index, (suite, name, net, layer, x, k) in enumerate(models):
        print(f"[{suite}] {name} {tuple(x.shape)} layer {layer} on {device}", flush=True)
        result = run_model(index, name, net, layer, x, k, args, device, pgc, captum, suite)
        report["models"].append(result)
    report["load_end"] = "load average {:.1f} / {:.1f} / {:.1f} at the end".format(*os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"engine_{device.type}" + (f"_b{args.batch}" if args.batch != 1 else "")
    if set(args.suite.split(",")) != set(SUITES):
        stem += "_" + args.suite.replace(",", "-")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = to_markdown(report)
    (args.out / f"{stem}.md").write_text(md)
    print(md)


SUITES = ("cnn", "scorecam", "transformer")


def make_models(args: argparse.Namespace) -> list[tuple]:
    """(suite, name, network, layer, input, num_classes) for each benchmarked model, seeded."""
    suites = args.suite.split(",")
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise SystemExit(f"unknown suite(s) {sorted(unknown)}; choose from {SUITES}")
    models = []
    if "cnn" in suites:
        torch.manual_seed(0)
        models.append(
            (
                "cnn",
                "MONAI DenseNet121 3D",
                DenseNet121(spatial_dims=3, in_channels=1, out_channels=2),
                "class_layers.relu",
                torch.randn(args.batch, 1, args.size, args.size, args.size),
                2,
            )
        )
        if not args.quick:
            models.append(
                (
                    "cnn",
                    "MONAI ResNet18 2D",
                    resnet18(spatial_dims=2, n_input_channels=1, num_classes=2),
                    "layer4",
                    torch.randn(args.batch, 1, 224, 224),
                    2,
                )
            )
    if "scorecam" in suites:
        torch.manual_seed(0)
        models.append(
            (
                "scorecam",
                "MONAI ResNet18 2D",
                resnet18(spatial_dims=2, n_input_channels=1, num_classes=2),
                "layer2",  # 128 channels: 128 masked forward passes per sample
                torch.randn(args.batch, 1, 64, 64),
                2,
            )
        )
    if "transformer" in suites:
        from monai.networks.nets import ViT

        torch.manual_seed(0)
        models.append(
            (
                "transformer",
                "MONAI ViT 3D (12 blocks, hidden 384, patch 16)",
                ViT(
                    in_channels=1,
                    img_size=(96, 96, 96),
                    patch_size=16,
                    hidden_size=384,
                    mlp_dim=1536,
                    num_layers=12,
                    num_heads=6,
                    classification=True,
                    num_classes=2,
                    spatial_dims=3,
                ),
                "blocks.11.norm1",  # the last attention's input (pytorch-grad-cam's advice)
                torch.randn(args.batch, 1, 96, 96, 96),
                2,
            )
        )
    return models


if __name__ == "__main__":
    main()
