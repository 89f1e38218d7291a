"""The ``medcam`` command line: explain, layers, demo. Logic lives in the package."""

from __future__ import annotations

import contextlib
import os
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


def _calibration_option(f):
    return click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
                        help="Layers, method and fusion from `medcam layers --calibrate ... "
                        "--save FILE` (recorded as layers_chosen_by in every result); instead "
                        "of --layer / --method / --fusion.")(f)  # fmt: skip


def _window_options(f):
    f = click.option("--overlap", type=float, default=None,
                     help="Sliding-window overlap (default: the bundle's, else 0.25).",
                     )(f)  # fmt: skip
    f = click.option("--sw-batch-size", type=int, default=None,
                     help="Windows per forward pass without gradients (default: the bundle's, "
                     "else 1).")(f)  # fmt: skip
    f = click.option("--roi-size", help="Explain in sliding windows of this size, e.g. "
                     "96,96,96 (default: a --bundle's own SlidingWindowInferer; without one, the "
                     "whole volume).")(f)  # fmt: skip
    return f


def _run_options(f):
    f = click.option("--quiet", is_flag=True, help="No progress bar, stage display or per-case "
                     "lines (errors are still reported).")(f)  # fmt: skip
    f = click.option("--prefetch", type=click.IntRange(min=0), default=1, show_default=True,
                     help="Cases loaded ahead while one is explained (and the previous one "
                     "written); 0 runs the cases one after the other.")(f)  # fmt: skip
    return f


class _Progress:
    """The command line's progress: a per-case bar (tqdm, on stderr, when that is a terminal)
    that shows the stage each case is in (load, preprocess, explain, back to scan, each
    writer), and one line per case with its stage times; nothing with ``quiet``."""

    def __init__(self, quiet: bool, **bar_options) -> None:
        from medcam.progress import BarReporter

        self.quiet, self.bar_options, self.bar = quiet, bar_options, None
        self.reporter = None if quiet else BarReporter(lambda: self.bar)

    def __call__(self, iterable):
        if self.quiet:
            return iterable
        from tqdm import tqdm

        # no bar when stderr is not a terminal (a log file, a batch job): the per-case lines say
        # it all there, without a carriage-return redraw for every stage
        self.bar = tqdm(iterable, **{"disable": None, **self.bar_options})
        return self.bar

    def log(self, text: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(text)

    def reporting(self):
        from medcam.progress import reporting

        return reporting(self.reporter)


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


@contextlib.contextmanager
def _trusted_bundles():
    """``medcam --trusted-bundles DIRS`` for every bundle the command loads: set as
    ``MEDCAM_TRUSTED_BUNDLES`` (read by :func:`medcam.bundle.check_trusted`) while it runs."""
    from medcam.bundle import TRUST_ENV

    ctx = click.get_current_context(silent=True)
    value = ctx.find_root().params.get("trusted_bundles") if ctx else None
    before = os.environ.get(TRUST_ENV)
    if value is not None:
        os.environ[TRUST_ENV] = value
    try:
        yield
    finally:
        if value is not None:
            if before is None:
                os.environ.pop(TRUST_ENV, None)
            else:
                os.environ[TRUST_ENV] = before


@contextlib.contextmanager
def _removed_if_left_empty(folder: Path):
    """A run that fails removes the output folder it made, if nothing was written in it."""
    made = not folder.exists()
    try:
        yield
    except BaseException:
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _run(fn):
    """Call ``fn``; any failure becomes one line on stderr and a non-zero exit status.

    A :class:`MedcamError` (bad input, configuration, an output that cannot be written) exits
    with 2; anything else (a bug, or a case medcam does not handle yet) with 1. ``medcam
    --debug`` (or ``MEDCAM_DEBUG=1``) shows the traceback instead.
    """
    try:
        with _trusted_bundles():
            return fn()
    except KeyboardInterrupt:
        click.echo("medcam: interrupted", err=True)
        sys.exit(130)
    except MedcamError as err:
        if _debug():
            raise
        click.echo(f"medcam: error: {err}", err=True)
        sys.exit(2)
    except OSError as err:
        if _debug():
            raise
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        click.echo(f"medcam: error: {err.strerror or err}{where}. Check the path, free space "
                   "and permissions; rerun with --debug for the traceback.", err=True)  # fmt: skip
        sys.exit(2)
    except Exception as err:
        if _debug():
            raise
        click.echo(f"medcam: error: unexpected {type(err).__name__}: {err}. This is a bug or a "
                   "case medcam does not handle yet: rerun with --debug for the traceback and "
                   "report it.", err=True)  # fmt: skip
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medcam-monai")
@click.option("--debug", is_flag=True, envvar="MEDCAM_DEBUG",
              help="Show the full traceback of an error (also MEDCAM_DEBUG=1).")  # fmt: skip
@click.option("--trusted-bundles", metavar="DIRS", envvar="MEDCAM_TRUSTED_BUNDLES",
              help="Load --bundle only from inside these folders (separated by "
              f"'{os.pathsep}'; also MEDCAM_TRUSTED_BUNDLES). A bundle's config runs Python "
              "code: a bundle elsewhere is refused before it is read.")  # fmt: skip
def main(debug: bool, trusted_bundles: str | None) -> None:
    """Explain 2D/3D medical-imaging CNNs; heatmaps back in the original scan space."""


def _pacs_options(f):
    f = click.option("--move-port", type=int, default=None,
                     help="With --retrieve move: the local port the PACS sends to.")(f)  # fmt: skip
    f = click.option("--retrieve", type=click.Choice(["get", "move"]), default="get",
                     show_default=True, help="DIMSE: fetch with C-GET or C-MOVE.")(f)  # fmt: skip
    f = click.option("--ae-title", default="MEDCAM", show_default=True,
                     help="medcam's own DICOM AE title (DIMSE).")(f)  # fmt: skip
    f = click.option("--store-to", metavar="ADDRESS", help="Store the DICOM results here instead: "
                     "dicomweb+http(s)://..., dimse://AET@host:port or a folder.")(f)  # fmt: skip
    f = click.option("--store", is_flag=True, help="Store the DICOM results (PM/SEG/SC) back into "
                     "the source study on the same server.")(f)  # fmt: skip
    f = click.option("--series-description", metavar="REGEX",
                     help="Only series whose SeriesDescription matches.")(f)  # fmt: skip
    f = click.option("--modality", "modalities", multiple=True,
                     help="Only series of this modality (repeat for several).")(f)  # fmt: skip
    f = click.option("--series", "series_uids", multiple=True,
                     help="Only this SeriesInstanceUID (repeat for several).")(f)  # fmt: skip
    f = click.option("--study", help="StudyInstanceUID to explain (server inputs).")(f)
    return f


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder (optional for a server input with --store).")  # fmt: skip
@_model_options
@click.option("--layer", "layers", multiple=True, default=["auto"], show_default=True,
              help="Target layer name (repeat for several), auto (the default rule: see "
              "`medcam layers`) or last (the deepest feature layer alone).")  # fmt: skip
@click.option("--method", default="auto", show_default=True,
              help="auto (Grad-CAM for classifiers, HiResCAM for flatten + linear heads, "
              "LayerCAM for segmenters), gradcam, gradcam++, hirescam, xgradcam, layercam, "
              "cam.")  # fmt: skip
@click.option("--target", default="pred", show_default=True,
              help="pred, all, a class index, 1,2 or seg:1 (segmentation class).")  # fmt: skip
@click.option("--format", "formats", default=None, help=FORMATS_HELP + " Default: nifti,png,json; "
              "dicom-pm,dicom-seg,dicom-sc when storing to a server.")  # fmt: skip
@click.option("--normalize", type=click.Choice(["none", "minmax", "percentile"]), default="none",
              show_default=True)  # fmt: skip
@click.option("--fusion", type=click.Choice(["mean", "product"]), default=None,
              help="Fuse several --layer maps.")  # fmt: skip
@click.option(
    "--name-from-input",
    is_flag=True,
    help="Name outputs after the input (may expose identifiers); default: a hash.",
)
@_calibration_option
@_window_options
@_run_options
@_pacs_options
def explain(inputs, out, bundle, model_spec, weights, preprocess, device, layers, method, target,
            formats, normalize, fusion, name_from_input, calibration, roi_size, sw_batch_size,
            overlap, prefetch, quiet, study, series_uids, modalities, series_description, store,
            store_to, ae_title, retrieve, move_port) -> None:  # fmt: skip
    """Explain INPUT... (a scan file, a DICOM series folder, or a folder of cases), or a study
    on a DICOM server: dicomweb+http(s)://host:port/dicom-web or dimse://AET@host:port with
    --study UID (see docs/pacs.md; credentials come from MEDCAM_DICOMWEB_* variables)."""
    from medcam.pacs import is_remote
    from medcam.runner import explain_inputs, load_model, parse_target, parse_window

    def work():
        layers_, method_, fusion_, chosen_by = _calibrated(calibration, layers, method, fusion)
        remote = [i for i in inputs if is_remote(i)]
        if remote:
            _explain_remote(inputs, out, dict(
                bundle=bundle, model=model_spec, weights=weights, preprocess=preprocess,
                device=device), layers_, method_, target, formats, normalize, fusion_,
                parse_window(roi_size, sw_batch_size, overlap), study, series_uids, modalities,
                series_description, store, store_to, ae_title, retrieve, move_port,
                chosen_by, calibration)  # fmt: skip
            return
        if study or series_uids or modalities or series_description or store or store_to:
            raise MedcamError("--study, --series, --modality, --series-description, --store and "
                              "--store-to are for server inputs (dicomweb+http://..., "
                              "dimse://...).")  # fmt: skip
        if out is None:
            raise MedcamError("Give the output folder: --out DIR.")
        spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                          preprocess=preprocess, device=device)  # fmt: skip
        _same_model(calibration, spec)
        layer_arg = list(layers_) if list(layers_) != ["auto"] else "auto"
        fmt = formats or "nifti,png,json"
        progress = _Progress(quiet, desc="cases", unit="case")
        with progress.reporting(), _removed_if_left_empty(Path(out)):
            explain_inputs(spec, inputs, out, layers=layer_arg, method=method_,
                           target=parse_target(target),
                           formats=[f.strip() for f in fmt.split(",")], normalize=normalize,
                           fusion=fusion_, name_from_input=name_from_input, chosen_by=chosen_by,
                           window=parse_window(roi_size, sw_batch_size, overlap),
                           progress=progress, log=progress.log, prefetch=prefetch)  # fmt: skip

    _run(work)


def _pacs_formats(formats: str | None, storing: bool, out) -> list[str]:
    from medcam.pipeline import PACS_FORMATS
    from medcam.writers.registry import get_format

    if formats is None:
        return list(PACS_FORMATS) if storing else ["nifti", "png", "json"]
    chosen = [f.strip() for f in formats.split(",") if f.strip()]
    local = [f for f in chosen if get_format(f).needs == "any"]
    if storing and len(local) == len(chosen):
        raise MedcamError(f"--store sends DICOM results, but --format {formats} has none; add "
                          "dicom-pm, dicom-seg or dicom-sc.")  # fmt: skip
    if local and out is None:
        raise MedcamError(f"{', '.join(local)} would only be written locally: give --out DIR or "
                          "drop them from --format.")  # fmt: skip
    return chosen


def _settings(layers, method, target, formats, normalize, fusion, window, chosen_by=None):
    from medcam.pipeline import ExplainSettings
    from medcam.runner import parse_target

    layer_arg = list(layers) if list(layers) != ["auto"] else "auto"
    return ExplainSettings(layers=layer_arg, method=method, target=parse_target(target),
                           formats=formats, normalize=normalize, fusion=fusion,
                           window=window, chosen_by=chosen_by)  # fmt: skip


def _calibrated(calibration, layers, method, fusion):
    """``(layers, method, fusion, chosen_by)``: from ``--calibration`` when given."""
    if not calibration:
        return layers, method, fusion, None
    if list(layers) != ["auto"] or method != "auto" or fusion:
        raise MedcamError("Give --calibration or --layer / --method / --fusion, not both: the "
                          "calibration names the layers, method and fusion.")  # fmt: skip
    from medcam.calibrate import load_calibration

    c = load_calibration(calibration)
    layers = ("auto",) if c["layers"] == "auto" else c["layers"]
    return layers, c["method"], c["fusion"], c["chosen_by"]


def _same_model(calibration, spec) -> None:
    """A ``--calibration`` made for other weights is refused once the model is loaded."""
    if calibration:
        from medcam.calibrate import load_calibration

        load_calibration(calibration, spec.network)


def _explain_remote(inputs, out, model_args, layers, method, target, formats, normalize, fusion,
                    window, study, series_uids, modalities, series_description, store, store_to,
                    ae_title, retrieve, move_port, chosen_by=None,
                    calibration=None) -> None:  # fmt: skip
    """``medcam explain dicomweb+http://... --study UID``: fetch, explain, store back."""
    from medcam.pipeline import Pipeline, explain_study
    from medcam.runner import load_model
    from medcam.sinks import open_sink
    from medcam.sources import SeriesFilter, open_source

    if len(inputs) != 1:
        raise MedcamError("Give one server address per run (and the study with --study).")
    if not study:
        raise MedcamError("Give the study to explain: --study StudyInstanceUID.")
    if store and store_to:
        raise MedcamError("Give --store (back to the source) or --store-to ADDRESS, not both.")
    storing = bool(store or store_to)
    if not storing and out is None:
        raise MedcamError("Nothing would be kept: give --store (results back into the study), "
                          "--store-to ADDRESS or --out DIR.")  # fmt: skip
    chosen = _pacs_formats(formats, storing, out)
    options = {"calling_ae": ae_title, "retrieve": retrieve, "move_port": move_port}
    series_filter = SeriesFilter(series_uids, modalities, series_description)
    source = open_source(inputs[0], **options)
    sinks = [open_sink(store_to or inputs[0], **options)] if storing else []
    source.check()  # server, credentials, AE title: before the model is loaded
    for sink in sinks:
        sink.check()
    spec = load_model(**model_args)
    _same_model(calibration, spec)
    settings = _settings(layers, method, target, chosen, normalize, fusion, window, chosen_by)
    pipeline = Pipeline(spec, settings, sinks, log=click.echo)
    records = explain_study(source, study, pipeline, out=out, series_filter=series_filter)
    done = sum(r["status"] == "done" for r in records)
    click.echo(f"{done} series explained, {len(records) - done} skipped"
               + (f"; results stored to {sinks[0].address}" if sinks else "")
               + (f"; case folders in {out}" if out else ""))  # fmt: skip


@main.command()
@click.option(
    "--store-to",
    required=True,
    metavar="ADDRESS",
    help="Where results go: dicomweb+http(s)://host:port/dicom-web, dimse://AET@host:port or a "
    "folder.",
)
@click.option("--ae-title", default="MEDCAM", show_default=True, help="This node's AE title.")
@click.option("--port", type=int, default=11112, show_default=True, help="DICOM port to listen on.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--allow-ae", "allowed", multiple=True,
              help="Calling AE title allowed to send (repeat; default: any).")  # fmt: skip
@click.option("--state", default="medcam-node", show_default=True,
              type=click.Path(file_okay=False), help="Journal, received series and results "
              "not yet delivered (keep it on a local disk).")  # fmt: skip
@click.option("--quiet-period", type=float, default=10.0, show_default=True,
              help="Seconds without a new instance after which a series is complete.")  # fmt: skip
@click.option("--max-series", type=int, default=16, show_default=True,
              help="Series waiting or running at once; more are refused.")  # fmt: skip
@click.option("--max-attempts", type=int, default=10, show_default=True,
              help="Delivery attempts per series before it is marked failed.")  # fmt: skip
@click.option("--keep", is_flag=True, help="Keep received series and results after delivery.")
@click.option("--status", "show_status", is_flag=True,
              help="Print the journal's job counts and failures, then exit.")  # fmt: skip
@_model_options
@click.option("--layer", "layers", multiple=True, default=["auto"], show_default=True)
@click.option("--method", default="auto", show_default=True)
@click.option("--target", default="pred", show_default=True)
@click.option("--format", "formats", default="dicom-pm,dicom-seg,dicom-sc", show_default=True,
              help=FORMATS_HELP)  # fmt: skip
@click.option("--normalize", type=click.Choice(["none", "minmax", "percentile"]), default="none")
@click.option("--fusion", type=click.Choice(["mean", "product"]), default=None)
@_calibration_option
@_window_options
def listen(store_to, ae_title, port, bind, allowed, state, quiet_period, max_series,
           max_attempts, keep, show_status, bundle, model_spec, weights, preprocess, device,
           layers, method, target, formats, normalize, fusion, calibration, roi_size,
           sw_batch_size, overlap) -> None:  # fmt: skip
    """Run as an AI node: receive series by C-STORE, explain each complete series, store the
    results (see docs/pacs.md)."""
    import datetime

    from medcam.listen import Journal, Listener
    from medcam.pipeline import Pipeline
    from medcam.runner import load_model, parse_window
    from medcam.sinks import open_sink

    def log(message: str) -> None:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        click.echo(f"{stamp} {message}", err=True)

    def work():
        if show_status:
            journal = Journal(Path(state) / "journal.sqlite3", create=False)
            counts = journal.counts()
            click.echo(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs")
            for job in journal.jobs():
                if job["state"] == "failed":
                    click.echo(f"  failed: series ...{job['series_uid'][-12:]} (job {job['key']}): "
                               f"{job['error']}")  # fmt: skip
            return
        layers_, method_, fusion_, chosen_by = _calibrated(calibration, layers, method, fusion)
        chosen = [f.strip() for f in formats.split(",") if f.strip()]
        sink = open_sink(store_to, calling_ae=ae_title)
        sink.check()  # destination and credentials before the model is loaded
        spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                          preprocess=preprocess, device=device)  # fmt: skip
        _same_model(calibration, spec)
        settings = _settings(layers_, method_, target, chosen, normalize, fusion_,
                             parse_window(roi_size, sw_batch_size, overlap), chosen_by)  # fmt: skip
        pipeline = Pipeline(spec, settings, [sink], log=log)
        node = Listener(pipeline, state, ae_title=ae_title, port=port, host=bind,
                        quiet_period=quiet_period, max_series=max_series, allowed_callers=allowed,
                        max_attempts=max_attempts, keep=keep, log=log)  # fmt: skip
        node.serve_forever()

    _run(work)


@main.command()
@_model_options
@click.option("--input-size", help="Model input spatial size, e.g. 96,96,96 (default: from the "
              "bundle's metadata).")  # fmt: skip
@click.option("--in-channels", type=int, default=None, help="Input channels (default 1).")
@click.option("--all", "show_all", is_flag=True, help="Also list layers without spatial output.")
@click.option("--calibrate", "cases_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV with columns scan, mask (a label image or DICOM SEG on the scan's "
              "grid marking the evidence): explain these labelled cases at every layer and "
              "method and say which points at the evidence (see docs/engine.md).")  # fmt: skip
@click.option(
    "--target",
    default="pred",
    show_default=True,
    help="With --calibrate: the class explained (pred, a class index, seg:1).",
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False),
    help="With --calibrate: write the choice and the whole table to this JSON file "
    "(then: medcam explain --calibration FILE).",
)
@click.option("--mask-label", "label", type=int, default=None,
              help="With --calibrate: the mask value that marks the evidence (for label images "
              "holding several structures; default: the nonzero voxels of one-label "
              "masks).")  # fmt: skip
def layers(bundle, model_spec, weights, preprocess, device, input_size, in_channels, show_all,
           cases_csv, target, save, label):  # fmt: skip
    """List candidate target layers with their feature-grid shapes, and say which layers the
    default (--layer auto) explains and why; with --calibrate, choose them from labelled
    cases."""
    import torch

    if cases_csv:
        if input_size or in_channels or show_all:
            raise click.UsageError("--calibrate takes the input size from the preprocessing; "
                                   "drop --input-size, --in-channels and --all.")  # fmt: skip
        return _calibrate(bundle, model_spec, weights, preprocess, device, cases_csv, target, save,
                          label)  # fmt: skip
    if save or label is not None:
        raise click.UsageError("--save and --mask-label go with --calibrate.")

    from medcam.engine.auto import auto_choice, auto_method
    from medcam.engine.core import Explainer
    from medcam.engine.layers import check_hookable, model_device, trace_layers
    from medcam.errors import LayerError
    from medcam.runner import load_model, parse_size

    def work():
        spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                          preprocess=preprocess, device=device)  # fmt: skip
        if input_size:
            shape = (in_channels or 1, *parse_size(input_size))
        elif spec.input_shape:
            shape = (in_channels or spec.input_shape[0], *spec.input_shape[1:])
        else:
            raise MedcamError("Give --input-size (e.g. 96,96,96); the model does not say it.")
        x = torch.zeros(1, *shape, device=device)
        check_hookable(spec.network)
        x = x.to(model_device(spec.network, x))
        infos, out = trace_layers(spec.network, x)
        out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        try:
            choice = auto_choice(infos, shape[1:], out_shape)
        except LayerError as err:
            choice, why = None, str(err)
        chosen = choice.layers if choice else []
        click.echo(f"{'layer':60s} {'type':24s} output shape")
        for info in infos:
            target = info.is_candidate or info.is_token_layer
            if target or show_all:
                mark = "" if target else "  (not a target)"
                if info.layout in ("tokens", "channels_last") and target:
                    mark = f"  ({info.layout}, grid {info.grid})"
                mark += "  <- default" if info.name in chosen else ""
                click.echo(f"{info.name:60s} {info.type:24s} {info.output_shape}{mark}")
        if choice is None:
            click.echo(f"\ndefault (--layer auto): none. {why}")
            return
        fused = f", {choice.fusion} fusion" if choice.fusion else ""
        click.echo(f"\ndefault (--layer auto) for input {shape}: {' + '.join(chosen)}{fused}")
        click.echo(f"  why: {choice.rule}")
        if out_shape is None:
            click.echo("  method (--method auto): the model returns several outputs; explain "
                       "one of them (a factory whose model returns the logits)")  # fmt: skip
        else:
            name, why = auto_method(out_shape, spatial_rank=len(shape) - 1)
            if name != "layercam":  # not a segmentation: how the head reads maps matters, so
                first = Explainer(spec.network, chosen, "auto", fusion=choice.fusion)  # ask
                why = first(x, lambda y: y.flatten(1)[:, :1]).metadata()["method_chosen_by"]
            click.echo(f"  method (--method auto): {why.removeprefix('auto: ')}")
        click.echo("  (--layer last explains the deepest feature layer alone, as before)")

    _run(work)


def _read_cases(path: str) -> list[tuple[Path, Path, int]]:
    """``scan, mask`` rows of a CSV (comma, semicolon or tab; Excel's UTF-8 BOM; header names
    in any case) with their line numbers, relative paths taken from the CSV's folder."""
    import csv

    base = Path(path).parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise MedcamError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save "
                          "it as CSV UTF-8 (Excel: 'CSV UTF-8').") from err  # fmt: skip
    if "\x00" in text:
        raise MedcamError(f"{path} holds NUL bytes: it is not a CSV text file.")
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = max(",;\t", key=first.count)
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader, [])]
    if "scan" not in header or "mask" not in header:
        raise MedcamError(f"{path}: needs a header with columns scan, mask (found: "
                          f"{', '.join(header) or 'nothing'}) and one row per case.")  # fmt: skip
    cases, seen = [], {}
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        line = reader.line_num
        pair = []
        for key in ("scan", "mask"):
            k = header.index(key)
            cell = row[k].strip() if k < len(row) else ""
            if not cell:
                raise MedcamError(f"{path}, line {line}: the {key} cell is empty.")
            p = Path(cell) if Path(cell).is_absolute() else base / cell
            if not p.exists():
                raise MedcamError(f"{path}, line {line}: {key} {str(p)!r} does not exist.")
            pair.append(p)
        key = (pair[0].resolve(), pair[1].resolve())
        if key in seen:
            raise MedcamError(f"{path}, line {line} repeats line {seen[key]}.")
        seen[key] = line
        cases.append((pair[0], pair[1], line))
    if not cases:
        raise MedcamError(f"{path}: no cases (one row per case under the scan, mask header).")
    return cases


def _calibrate(bundle, model_spec, weights, preprocess, device, cases_csv, target, save,
               label) -> None:  # fmt: skip
    import json

    from medcam.calibrate import calibrate_scans
    from medcam.runner import load_model, parse_target

    def work():
        cases = _read_cases(cases_csv)
        chosen_target = parse_target(target)  # checked before the model loads
        if save and not Path(save).resolve().parent.is_dir():
            raise MedcamError(f"--save {save}: the folder {Path(save).parent} does not exist.")
        spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                          preprocess=preprocess, device=device)  # fmt: skip
        if spec.inferer is not None:
            click.echo("note: calibration explains the whole preprocessed input in one pass, "
                       "not in the bundle's sliding windows", err=True)  # fmt: skip
        cal = calibrate_scans(spec.network, [c[0] for c in cases], [c[1] for c in cases],
                              chosen_target, preprocess=spec.preprocess, label=label,
                              expect=spec.expect,
                              names=[f"{cases_csv}, line {c[2]}" for c in cases])  # fmt: skip
        click.echo(f"{'pointing game':>13s} {'energy':>7s}  candidate")
        for row in cal.table[:10]:
            fused = f" ({row['fusion']})" if row["fusion"] else ""
            click.echo(f"{row['pointing_game']:13.2f} {row['energy']:7.3f}  {row['method']} @ "
                       f"{' + '.join(row['layers'])}{fused}  [{row['how']}]")  # fmt: skip
        click.echo(f"\n{cal.describe()}")
        if cal.chosen != cal.default:
            click.echo(f"use: medcam explain ... {cal.chosen.flags()}")
        else:
            click.echo("use: the default (--layer auto --method auto)")
        if save:
            tmp = Path(save).with_name(f".{Path(save).name}.tmp")
            record = {**cal.record(), "target": target, "mask_label": label,
                      "cases": str(cases_csv)}  # fmt: skip
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, save)
            click.echo(f"saved {save}")

    _run(work)


@main.command()
@click.argument("visits", nargs=-1, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False),
    help="CSV with columns scan, heatmap (optional), date (optional), label (optional).",
)
@click.option("--dates", help="Comma-separated dates, one per VISIT, YYYY-MM-DD or YYYYMMDD "
              "(default: DICOM StudyDate).")  # fmt: skip
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
    help="Activation threshold in heatmap units (default: --threshold-fraction x the maximum "
    "over all visits).",
)
@click.option("--threshold-fraction", type=float, default=0.5, show_default=True,
              help="Default threshold as a fraction of the maximum over all visits.")  # fmt: skip
@click.option("--format", "formats", default=None,
              help="Comma-separated outputs: nifti, dicom-pm, png (difference maps), dicom-sr "
              "(SEG + TID 1500 SR per visit), csv, json, html. Default: all that apply (DICOM "
              "ones for DICOM visits).")  # fmt: skip
@click.option("--strict", is_flag=True,
              help="Refuse (exit 2, nothing written) when a registration or threshold is "
              "outside the stated limits, instead of flagging it.")  # fmt: skip
@click.option("--mr", is_flag=True, help="MR (no CT body threshold; Otsu mask instead).")
def compare(visits, out, manifest, dates, bundle, model_spec, weights, preprocess, device, layers,
            method, target, registration, threshold, threshold_fraction, formats, strict,
            mr) -> None:  # fmt: skip
    """Compare one patient's heatmaps across VISITS (scan files/folders) or a --manifest."""
    from medcam.io.output import OutputDir
    from medcam.longitudinal import compare as run_compare
    from medcam.longitudinal.report import finding_summary, summary_findings, visit_summary
    from medcam.longitudinal.timepoint import parse_date
    from medcam.runner import load_model, load_timepoints, parse_target, read_manifest

    def work():
        if bool(manifest) == bool(visits):
            raise MedcamError("Give the visits as arguments or as --manifest, not both or none.")
        fmt = None if formats is None else [f.strip() for f in formats.split(",") if f.strip()]
        if manifest:
            entries = read_manifest(manifest)
        else:
            date_list = [d.strip() for d in dates.split(",")] if dates else [None] * len(visits)
            if len(date_list) != len(visits):
                raise MedcamError(f"{len(date_list)} --dates for {len(visits)} visits.")
            for v, d in zip(visits, date_list, strict=True):
                if d is not None:
                    parse_date(d, Path(v).name)  # a bad date fails before any model runs
            entries = [{"scan": v, "date": d} for v, d in zip(visits, date_list, strict=True)]
        OutputDir(out)  # a folder that cannot be written fails before any model runs
        spec = None
        if bundle or model_spec:
            spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                              preprocess=preprocess, device=device)  # fmt: skip
        layer_arg = list(layers) if list(layers) != ["auto"] else "auto"
        tps = load_timepoints(entries, spec, layers=layer_arg, method=method,
                              target=parse_target(target))  # fmt: skip
        result = run_compare(tps, registration=registration, threshold=threshold,
                             threshold_fraction=threshold_fraction, out=out, formats=fmt,
                             strict=strict, body_threshold=None if mr else -500.0)  # fmt: skip
        click.echo(f"threshold: {result.threshold_rule}")
        for row in result.rows:
            click.echo(visit_summary(row))
        shown = summary_findings(result)
        for finding in shown:
            click.echo(finding_summary(finding, result))
        if len(shown) < len(result.findings):
            click.echo(f"{len(result.findings) - len(shown)} smaller finding(s): see the report")
        if not result.findings:
            click.echo("no finding above the threshold at any visit")
        if result.flags:
            click.echo(f"{len(result.flags)} flag(s): check the report before using these numbers")
        if result.outputs.get("html"):
            click.echo(f"report: {result.outputs['html'][0]}")

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
@_calibration_option
@_window_options
@_run_options
def cohort_run(manifest, out, bundle, model_spec, weights, preprocess, device, layers, method,
               target, formats, normalize, fusion, shard, calibration, roi_size, sw_batch_size,
               overlap, prefetch, quiet) -> None:  # fmt: skip
    """Explain every case of MANIFEST this rank owns; skip cases already done."""
    from medcam.cohort import gather_and_index, read_cohort_manifest, resolve_shard, run_cohort
    from medcam.runner import cohort_processor, load_model, parse_window

    def work():
        cases = read_cohort_manifest(manifest)  # every manifest problem before any work
        rank, world = resolve_shard(shard)
        layers_, method_, fusion_, chosen_by = _calibrated(calibration, layers, method, fusion)
        fmt = [f.strip() for f in formats.split(",")]
        layer_arg = list(layers_) if list(layers_) != ["auto"] else "auto"
        spec = load_model(bundle=bundle, model=model_spec, weights=weights,
                          preprocess=preprocess, device=device)  # fmt: skip
        _same_model(calibration, spec)
        window = parse_window(roi_size, sw_batch_size, overlap)
        process = cohort_processor(spec, layers=layer_arg, method=method_, target=target,
                                   formats=fmt, normalize=normalize, fusion=fusion_,
                                   window=window, chosen_by=chosen_by)  # fmt: skip
        config = {
            "model": spec.source, "weights": _file_hash(weights), "bundle": bundle,
            "preprocess": preprocess, "layers": layer_arg, "method": method_, "target": target,
            "formats": fmt, "normalize": normalize, "fusion": fusion_, "window": window,
            **({"chosen_by": chosen_by} if chosen_by else {}),
        }  # fmt: skip
        progress = _Progress(quiet, desc=f"rank {rank}/{world}", position=rank, unit="case")
        with progress.reporting():
            counts = run_cohort(cases, out, process, config=config, rank=rank, world=world,
                                progress=progress, log=_stderr, prefetch=prefetch)  # fmt: skip
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


def _stderr(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


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
