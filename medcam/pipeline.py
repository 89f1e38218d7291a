"""Wiring: a source, the explainer and sinks. The CLI and the listener only call these.

One series goes ``source.fetch`` -> :func:`medcam.load_scan` -> formats checked ->
:func:`medcam.explain_scan` -> :func:`medcam.write_outputs` (the case folder, one transaction)
-> each ``sink.send``. DICOM results get UIDs derived from the source instances, the model
weights and the settings (:func:`result_seed`), so sending a result again (a retry, a restarted
listener) stores nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medcam.errors import InputError, MedcamError, ModelError, OutputError, PacsError
from medcam.sinks.base import Sink, WrittenCase
from medcam.sources.base import SeriesFilter, SeriesRef, Source, is_medcam_result

__all__ = ["ExplainSettings", "Pipeline", "explain_study", "result_seed", "series_case_name"]

PACS_FORMATS = ("dicom-pm", "dicom-seg", "dicom-sc")


@dataclass
class ExplainSettings:
    """What to explain and write; everything here enters the result UIDs' seed."""

    layers: Any = "auto"
    method: str = "auto"
    target: Any = "pred"
    formats: Sequence[str] = PACS_FORMATS
    normalize: str = "none"
    fusion: str | None = None
    window: dict[str, Any] | None = None
    chosen_by: str | None = None  # why these layers / method ("calibrated on 8 labelled ...")
    seg_threshold: float = 0.5
    fractional_seg: bool = False
    alpha: float = 0.4
    series_number_base: int = 9000
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The settings as plain data, the same in every process (no object addresses)."""
        return _stable(asdict(self))


def _stable(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-able data that does not depend on the process (for the UID seed)."""
    import numpy as np
    import torch

    if depth > 8 or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _stable(v, depth + 1) for k, v in sorted(value.items(), key=str)}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_stable(v, depth + 1) for v in items]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        return {"array": digest, "shape": list(array.shape), "dtype": str(array.dtype)}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    fields = {k: v for k, v in vars(value).items() if not k.startswith("_")} if hasattr(
        value, "__dict__") else {"repr": repr(value)}  # fmt: skip
    return {"type": kind, **{k: _stable(v, depth + 1) for k, v in sorted(fields.items())}}


def result_seed(scan: Any, model_sha256: str, settings: ExplainSettings) -> str:
    """A hex digest of what determines a result: the source instances (SOP Instance UIDs, or the
    input's hash for non-DICOM sources), the model weights, the settings (except which formats
    are written) and medcam's version."""
    from medcam import __version__

    sources = sorted(str(ds.SOPInstanceUID) for ds in scan.datasets if "SOPInstanceUID" in ds)
    record = {
        "sources": sources or [scan.sha256],
        "model": model_sha256,
        # the formats written do not change any one object (each format has its own seed)
        "settings": {k: v for k, v in settings.record().items() if k != "formats"},
        "medcam": __version__,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _made_by_medcam(path: Path) -> bool:
    """Whether the first DICOM file of ``path`` (a file or a series folder) is a medcam result."""
    import pydicom

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files[:1]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Manufacturer"])
        except Exception:
            return False
        return is_medcam_result(str(ds.get("Manufacturer", "")), "")
    return False


def series_case_name(series_uid: str) -> str:
    """Case-folder name of a series from a server: a hash of its UID (no identifiers)."""
    return f"series-{hashlib.sha256(series_uid.encode()).hexdigest()[:12]}"


class Pipeline:
    """The explainer between a source and sinks.

    Parameters
    ----------
    spec:
        A :class:`medcam.runner.ModelSpec` (network + preprocessing).
    settings:
        :class:`ExplainSettings`.
    sinks:
        Where each case goes after it is written (may be empty: the case folder only).
    log:
        One line per event; lines hold no patient data (series are named by UID suffix).
    """

    def __init__(
        self,
        spec: Any,
        settings: ExplainSettings,
        sinks: Sequence[Sink] = (),
        *,
        log: Callable[[str], None] = print,
    ) -> None:
        from medcam.engine.core import Explainer
        from medcam.writers.registry import check_formats
        from medcam.writers.sidecar import model_identity

        check_formats(settings.formats)
        self.spec, self.settings, self.sinks, self.log = spec, settings, list(sinks), log
        self.explainer = Explainer(
            spec.network,
            settings.layers,
            settings.method,
            fusion=settings.fusion,
            chosen_by=settings.chosen_by,
        )
        self.model_sha256 = model_identity(spec.network)["state_dict_sha256"]

    def check(self) -> None:
        """Every sink reachable and accepting medcam, before any model runs."""
        for sink in self.sinks:
            sink.check()

    def explain(self, path: Path, outbox: Path, case: str) -> WrittenCase:
        """Load ``path``, explain it, write case ``outbox/<case>/`` (one transaction)."""
        from medcam.io.scan import load_scan
        from medcam.space import explain_scan
        from medcam.writers.outputs import write_outputs
        from medcam.writers.registry import check_formats

        s = self.settings
        if _made_by_medcam(Path(path)):
            raise InputError(
                "This series is a medcam result; it is not explained again (exclude "
                "Manufacturer = medcam from the routing rule or the series filter)."
            )
        scan = load_scan(path)
        check_formats(s.formats, scan)  # before the model runs
        try:
            ex = explain_scan(
                self.spec.network,
                scan,
                preprocess=self.spec.preprocess,
                target=s.target,
                normalize=s.normalize,
                explainer=self.explainer,
                **(s.window or {}),
            )
        except MedcamError:
            raise
        except Exception as err:  # the model or its preprocessing cannot take this scan
            raise ModelError(
                f"The model ({self.spec.source}) cannot take this {scan.kind} of shape "
                f"{scan.spatial_shape}: {type(err).__name__}: {err}"
            ) from err
        seed = result_seed(scan, self.model_sha256, s)
        written = write_outputs(
            ex,
            outbox,
            s.formats,
            model=self.spec.network,
            case=case,
            seg_threshold=s.seg_threshold,
            fractional_seg=s.fractional_seg,
            alpha=s.alpha,
            series_number_base=s.series_number_base,
            uid_seed=seed,
        )
        study = str(scan.datasets[0].get("StudyInstanceUID", "")) if scan.datasets else ""
        return WrittenCase(case, Path(outbox) / case, written, study)

    def deliver(self, case: WrittenCase) -> int:
        """Send ``case`` to every sink; returns the number of objects stored."""
        return sum(sink.send(case) for sink in self.sinks)

    def run_series(self, source: Source, ref: SeriesRef, outbox: Path, case: str) -> WrittenCase:
        """Fetch, explain, write and deliver one series."""
        with tempfile.TemporaryDirectory(prefix="medcam-fetch-") as work:
            path = source.fetch(ref, Path(work))
            written = self.explain(path, outbox, case)
        stored = self.deliver(written)
        if self.sinks:
            self.log(
                f"{ref.label}: {stored} result instances stored to "
                f"{', '.join(s.address for s in self.sinks)}"
            )
        return written


def explain_study(
    source: Source,
    study_uid: str,
    pipeline: Pipeline,
    *,
    out: str | Path | None = None,
    series_filter: SeriesFilter | None = None,
) -> list[dict[str, Any]]:
    """Explain the series of ``study_uid`` that ``series_filter`` chooses and the model takes.

    Everything that can be checked before a model runs is: the source and sinks answer and
    accept the credentials, the study exists, the requested series are in it. A series the model
    cannot take (a 2D scout for a 3D model, a format the series cannot carry) is skipped with its
    reason when the filter chose it; a series asked for by UID fails the run instead. A server
    problem (:class:`~medcam.errors.PacsError`) stops the run: nothing of the failing series is
    marked done, and a rerun stores the rest without duplicates.

    Returns one record per series: ``{"series", "case", "status", "detail", "outputs"}``.
    """
    series_filter = series_filter or SeriesFilter()
    source.check()
    pipeline.check()
    chosen, skipped = series_filter.select(source.series(study_uid))
    records = [
        {"series": ref.series_uid, "case": None, "status": "skipped", "detail": why, "outputs": []}
        for ref, why in skipped
    ]
    for ref, why in skipped:
        pipeline.log(f"skip {ref.label}: {why}")
    if not chosen:
        raise InputError(
            f"No series of study {study_uid} to explain ("
            + "; ".join(f"{r.label}: {w}" for r, w in skipped)
            + ")."
        )
    with tempfile.TemporaryDirectory(prefix="medcam-out-") as tmp:
        outbox = Path(out) if out is not None else Path(tmp)
        done = 0
        for ref in chosen:
            case = series_case_name(ref.series_uid)
            try:
                written = pipeline.run_series(source, ref, outbox, case)
            except (PacsError, OutputError):
                raise  # the server or the output folder: every further series would fail too
            except MedcamError as err:
                if series_filter.series_uids:
                    raise
                pipeline.log(f"skip {ref.label}: the model cannot take it: {err}")
                records.append(
                    {
                        "series": ref.series_uid,
                        "case": case,
                        "status": "skipped",
                        "detail": str(err),
                        "outputs": [],
                    }
                )
                continue
            done += 1
            files = [str(p) for paths in written.outputs.values() for p in paths]
            records.append(
                {
                    "series": ref.series_uid,
                    "case": case,
                    "status": "done",
                    "detail": "",
                    "outputs": files if out is not None else [],
                }
            )
        if not done:
            raise InputError(
                f"No series of study {study_uid} could be explained: "
                + "; ".join(f"...{r['series'][-12:]}: {r['detail']}" for r in records)
            )
    return records
