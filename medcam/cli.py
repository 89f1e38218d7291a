"""The ``medcam`` command line: explain, layers, demo. Logic lives in the package."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from medcam.errors import MedcamError

FORMATS_HELP = "Comma-separated: nifti, dicom-pm, dicom-seg, dicom-sc, png, json."


def _model_options(f):
    f = click.option("--preprocess", help="package.module:factory returning MONAI array transforms "
                     "for the model input (default: the bundle's, else none).")(f)  # fmt: skip
    f = click.option("--weights", type=click.Path(exists=True, dir_okay=False),
                     help="State-dict file for --model.")(f)  # fmt: skip
    f = click.option("--model", "model_spec", metavar="MODULE:FACTORY",
                     help="Python factory returning the eager network.")(f)  # fmt: skip
    f = click.option("--bundle", type=click.Path(exists=True, file_okay=False),
                     help="MONAI bundle folder (network_def + models/model.pt).")(f)  # fmt: skip
    f = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ...")(f)
    return f


def _window_options(f):
    f = click.option("--overlap", type=float, default=0.25, show_default=True,
                     help="Sliding-window overlap.")(f)  # fmt: skip
    f = click.option("--sw-batch-size", type=int, default=1, show_default=True,
                     help="Windows per forward pass.")(f)  # fmt: skip
    f = click.option("--roi-size", help="Explain in sliding windows of this size, e.g. "
                     "96,96,96 (fully convolutional networks on large volumes).")(f)  # fmt: skip
    return f


def _run(fn):
    """Call ``fn``; a MedcamError becomes a one-line message and exit status 2."""
    try:
        return fn()
    except MedcamError as err:
        click.echo(f"medcam: error: {err}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medcam-monai")
def main() -> None:
    """Explain 2D/3D medical-imaging CNNs; heatmaps back in the original scan space."""


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@_model_options
@click.option("--layer", "layers", multiple=True, default=["auto"], show_default=True,
              help="Target layer name (repeat for several) or auto.")  # fmt: skip
@click.option("--method", default="auto", show_default=True,
              help="auto (Grad-CAM for classifiers, LayerCAM for segmenters), gradcam, "
              "gradcam++, hirescam, xgradcam, layercam, cam.")  # fmt: skip
@click.option("--target", default="pred", show_default=True,
              help="pred, all, a class index, 1,2 or seg:1 (segmentation class).")  # fmt: skip
@click.option("--format", "formats", default="nifti,png,json", show_default=True,
              help=FORMATS_HELP)  # fmt: skip
@click.option("--normalize", type=click.Choice(["none", "minmax", "percentile"]), default="none",
              show_default=True)  # fmt: skip
@click.option("--fusion", type=click.Choice(["mean", "product"]), default=None,
              help="Fuse several --layer maps.")  # fmt: skip
@click.option(
    "--name-from-input",
    is_flag=True,
    help="Name outputs after the input (may expose identifiers); default: a hash.",
)
@_window_options
def explain(inputs, out, bundle, model_spec, weights, preprocess, device, layers, method, target,
            formats, normalize, fusion, name_from_input, roi_size, sw_batch_size,
            overlap) -> None:  # fmt: skip
    """Explain INPUT... (a scan file, a DICOM series folder, or a folder of cases)."""
    from tqdm import tqdm

    from medcam.runner import explain_inputs, load_model, parse_target, parse_window

    def work():
        spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                          preprocess=preprocess, device=device)  # fmt: skip
        layer_arg = list(layers) if list(layers) != ["auto"] else "auto"
        explain_inputs(spec, inputs, out, layers=layer_arg, method=method,
                       target=parse_target(target), formats=[f.strip() for f in formats.split(",")],
                       normalize=normalize, fusion=fusion, name_from_input=name_from_input,
                       window=parse_window(roi_size, sw_batch_size, overlap),
                       progress=lambda it: tqdm(it, desc="cases", unit="case"),
                       log=tqdm.write)  # fmt: skip

    _run(work)


@main.command()
@_model_options
@click.option("--input-size", help="Model input spatial size, e.g. 96,96,96 (default: from the "
              "bundle's metadata).")  # fmt: skip
@click.option("--in-channels", type=int, default=None, help="Input channels (default 1).")
@click.option("--all", "show_all", is_flag=True, help="Also list layers without spatial output.")
def layers(bundle, model_spec, weights, preprocess, device, input_size, in_channels, show_all):
    """List candidate target layers with their feature-grid shapes, and say which layers the
    default (--layer auto) explains and why."""
    import torch

    from medcam.engine.auto import auto_choice
    from medcam.engine.layers import check_hookable, model_device, trace_layers
    from medcam.errors import LayerError
    from medcam.runner import load_model

    def work():
        spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                          preprocess=preprocess, device=device)  # fmt: skip
        if input_size:
            shape = (in_channels or 1, *[int(v) for v in input_size.split(",")])
        elif spec.input_shape:
            shape = (in_channels or spec.input_shape[0], *spec.input_shape[1:])
        else:
            raise MedcamError("Give --input-size (e.g. 96,96,96); the model does not say it.")
        x = torch.zeros(1, *shape, device=device)
        check_hookable(spec.network)
        infos, out = trace_layers(spec.network, x.to(model_device(spec.network, x)))
        out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        try:
            choice = auto_choice(infos, shape[1:], out_shape)
        except LayerError as err:
            choice, why = None, str(err)
        chosen = choice.layers if choice else []
        click.echo(f"{'layer':60s} {'type':24s} output shape")
        for info in infos:
            if info.is_candidate or show_all:
                mark = "" if info.is_candidate else "  (not a target)"
                mark += "  <- default" if info.name in chosen else ""
                click.echo(f"{info.name:60s} {info.type:24s} {info.output_shape}{mark}")
        if choice is None:
            click.echo(f"\ndefault (--layer auto): none. {why}")
            return
        fused = f", {choice.fusion} fusion" if choice.fusion else ""
        click.echo(f"\ndefault (--layer auto) for input {shape}: {' + '.join(chosen)}{fused}")
        click.echo(f"  why: {choice.rule}")
        click.echo("  (--layer last explains the deepest feature layer alone, as before)")

    _run(work)


@main.command()
@click.argument("visits", nargs=-1, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False),
    help="CSV with columns scan, heatmap (optional), date (optional), label (optional).",
)
@click.option(
    "--dates", help="Comma-separated YYYY-MM-DD, one per VISIT (default: DICOM StudyDate)."
)
@_model_options
@click.option("--layer", "layers", multiple=True, default=["auto"], show_default=True)
@click.option("--method", default="auto", show_default=True)
@click.option("--target", default="pred", show_default=True)
@click.option(
    "--registration",
    type=click.Choice(["rigid", "affine", "deformable", "none"]),
    default="rigid",
    show_default=True,
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Activation threshold in heatmap units (default: half the baseline maximum).",
)
@click.option("--mr", is_flag=True, help="MR (no CT body threshold; Otsu mask instead).")
def compare(visits, out, manifest, dates, bundle, model_spec, weights, preprocess, device, layers,
            method, target, registration, threshold, mr) -> None:  # fmt: skip
    """Compare one patient's heatmaps across VISITS (scan files/folders) or a --manifest."""
    from medcam.longitudinal import compare as run_compare
    from medcam.runner import load_model, load_timepoints, parse_target, read_manifest

    def work():
        if bool(manifest) == bool(visits):
            raise MedcamError("Give the visits as arguments or as --manifest, not both or none.")
        if manifest:
            entries = read_manifest(manifest)
        else:
            date_list = dates.split(",") if dates else [None] * len(visits)
            if len(date_list) != len(visits):
                raise MedcamError(f"{len(date_list)} --dates for {len(visits)} visits.")
            entries = [{"scan": v, "date": d} for v, d in zip(visits, date_list, strict=True)]
        spec = None
        if bundle or model_spec:
            spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                              preprocess=preprocess, device=device)  # fmt: skip
        layer_arg = list(layers) if list(layers) != ["auto"] else "auto"
        tps = load_timepoints(entries, spec, layers=layer_arg, method=method,
                              target=parse_target(target))  # fmt: skip
        result = run_compare(tps, registration=registration, threshold=threshold, out=out,
                             body_threshold=None if mr else -500.0)  # fmt: skip
        for row in result.rows:
            click.echo(
                f"{row['date']} (day {row['days']:4d}): activated {row['volume_ml']:.2f} mL "
                f"({row['volume_change_pct']:+.1f} %), centroid shift "
                f"{row['centroid_shift_mm']:.2f} mm, Dice {row['dice']:.2f}"
            )
        click.echo(f"report: {Path(out) / 'report.html'}")

    _run(work)


@main.group()
def cohort() -> None:
    """Cohort runs over a manifest, alone or under torchrun / SLURM: sharded, resumable."""


@cohort.command("run")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False),
              help="CSV: case_id, input[, target, mask].")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False))
@_model_options
@click.option("--layer", "layers", multiple=True, default=["auto"], show_default=True)
@click.option("--method", default="auto", show_default=True)
@click.option("--target", default="pred", show_default=True, help="Default target per case.")
@click.option("--format", "formats", default="nifti,png,json", show_default=True,
              help=FORMATS_HELP)  # fmt: skip
@click.option("--normalize", type=click.Choice(["none", "minmax", "percentile"]), default="none")
@click.option("--fusion", type=click.Choice(["mean", "product"]), default=None)
@click.option("--shard", help="i/N: run shard i of N (default: torchrun / SLURM environment).")
@_window_options
def cohort_run(manifest, out, bundle, model_spec, weights, preprocess, device, layers, method,
               target, formats, normalize, fusion, shard, roi_size, sw_batch_size,
               overlap) -> None:  # fmt: skip
    """Explain every case of MANIFEST this rank owns; skip cases already done."""
    from tqdm import tqdm

    from medcam.cohort import gather_and_index, read_cohort_manifest, resolve_shard, run_cohort
    from medcam.runner import cohort_processor, load_model, parse_window

    def work():
        cases = read_cohort_manifest(manifest)  # every manifest problem before any work
        rank, world = resolve_shard(shard)
        fmt = [f.strip() for f in formats.split(",")]
        layer_arg = list(layers) if list(layers) != ["auto"] else "auto"
        spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                          preprocess=preprocess, device=device)  # fmt: skip
        window = parse_window(roi_size, sw_batch_size, overlap)
        process = cohort_processor(spec, layers=layer_arg, method=method, target=target,
                                   formats=fmt, normalize=normalize, fusion=fusion,
                                   window=window)  # fmt: skip
        config = {
            "model": spec.source, "weights": _file_hash(weights), "bundle": bundle,
            "preprocess": preprocess, "layers": layer_arg, "method": method, "target": target,
            "formats": fmt, "normalize": normalize, "fusion": fusion, "window": window,
        }  # fmt: skip
        counts = run_cohort(
            cases, out, process, config=config, rank=rank, world=world,
            progress=lambda it: tqdm(it, desc=f"rank {rank}/{world}", position=rank, unit="case"),
            log=tqdm.write,
        )  # fmt: skip
        click.echo(f"rank {rank}/{world}: {counts['done']} done, {counts['skipped']} skipped "
                   f"(already done), {counts['failed']} failed")  # fmt: skip
        gather_and_index(out, rank, world)

    _run(work)


@cohort.command("status")
@click.option("--out", required=True, type=click.Path(exists=True, file_okay=False))
def cohort_status_cmd(out) -> None:
    """Done / failed / missing counts and a merged index.csv; exit 1 while incomplete."""
    from medcam.cohort import cohort_status

    def work():
        status = cohort_status(out)
        c = status["counts"]
        click.echo(f"{c['done']} done, {c['failed']} failed, {c['missing']} missing of "
                   f"{status['total']}; index: {Path(out) / 'index.csv'}")  # fmt: skip
        for row in status["rows"]:
            if row["status"] == "failed":
                click.echo(f"  failed: {row['case_id']}: {row['error']}")
        if not status["complete"]:
            sys.exit(1)

    _run(work)


def _file_hash(path) -> str | None:
    if not path:
        return None
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True)
def demo(out, device) -> None:
    """Run the main job on built-in synthetic data (offline, about a minute on a CPU)."""
    from medcam.demo import run_demo

    _run(lambda: run_demo(Path(out), device=device, log=click.echo))


if __name__ == "__main__":
    main()
