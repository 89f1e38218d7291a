"""Longitudinal outputs: difference maps, transforms, tables, pictures, a self-contained HTML
report, and (``dicom-sr``) a SEG + TID 1500 measurement report per DICOM visit."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcam.errors import InputError
from medcam.io.output import OutputDir, safe_name
from medcam.longitudinal.findings import SMALL
from medcam.longitudinal.metrics import METRIC_DESCRIPTIONS

__all__ = [
    "CAVEAT",
    "FORMATS",
    "check_formats",
    "finding_summary",
    "json_record",
    "summary_findings",
    "visit_summary",
    "write_report",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
FORMATS = ("nifti", "dicom-pm", "png", "dicom-sr", "csv", "json", "html")
DICOM_FORMATS = ("dicom-pm", "dicom-sr")
SUMMARY_FINDINGS = 6  # the summary names the largest findings; the table lists all
CAVEAT = (
    "The heatmap shows where the model found evidence for its output. A change in the heatmap "
    "is a change in the model's explanation, not necessarily a change in the disease: it also "
    "follows from differences in acquisition (contrast phase, dose, reconstruction, field of "
    "view), positioning and registration, and from the model's own sensitivity. Volumes are of "
    "heatmap above a threshold, not lesion volumes. Read it beside the images and the "
    "radiology report; it is not a diagnosis."
)
# (key, header with units, formatter) of the compact per-visit table
VISIT_COLUMNS = (
    ("visit", "Visit", str),
    ("date", "Date", str),
    ("days", "Day", str),
    ("volume_ml", "Activated volume (mL)", lambda v: "no activation" if not v else f"{v:.2f}"),
    ("volume_change_pct", "Change vs baseline", lambda v: _pct_text(v)),
    ("volume_change_pct_prev", "Change vs previous", lambda v: _pct_text(v)),
    ("findings", "Findings", str),
    ("probability", "Model probability", lambda v: f"{v:.2f}"),
)


def _signed(v: float, fmt: str = "{:+.0f}") -> str:
    """``fmt`` of ``v`` with a typographic minus, and no "-0"."""
    text = fmt.format(v + 0.0)
    if text.lstrip("+-").strip("0. %").strip() == "":
        text = text.replace("-", "+")
    return text.replace("-", "\u2212")


def _pct_text(v: float | None) -> str:
    return "—" if v is None else _signed(v, "{:+.0f} %")


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return fmt.format(v)


def check_formats(formats: Sequence[str], timepoints) -> None:
    """Refuse unknown formats, and DICOM formats for visits that are not DICOM series."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise InputError(f"Unknown longitudinal output format(s) {unknown}; use {list(FORMATS)}.")
    base = timepoints[0]
    if "dicom-pm" in formats and not _is_dicom(base):
        raise InputError(
            f"dicom-pm writes the difference map on the baseline's DICOM series, but the baseline "
            f"({base.label}) is not a DICOM series; use nifti and png."
        )
    if "dicom-sr" in formats and not any(_is_dicom(tp) for tp in timepoints):
        raise InputError("dicom-sr needs DICOM visits (a SEG and SR are written on each series).")


def _is_dicom(tp) -> bool:
    scan = tp.scan
    return scan is not None and scan.kind == "dicom-series" and scan.has_frame_of_reference


def default_formats(timepoints) -> list[str]:
    fmts = ["nifti", "png", "csv", "json", "html"]
    if _is_dicom(timepoints[0]):
        fmts.insert(1, "dicom-pm")
    if any(_is_dicom(tp) for tp in timepoints):
        fmts.append("dicom-sr")
    return fmts


# --------------------------------------------------------------------------- summaries


def finding_summary(finding, result) -> str:
    """One sentence a clinician reads: volume now, change vs baseline and previous, trend."""
    rows = result.rows
    visits = finding.visits
    last = len(visits) - 1
    fv = visits[last]
    date = rows[last]["date"]
    name = finding.name
    notes = "; ".join(v.note for v in visits if v.borderline and v.note)
    tail = f" (borderline: {notes})" if notes else ""
    previous = [(i, v) for i, v in enumerate(visits[:last]) if v.volume_ml]
    if fv.status == "merged":
        return f"{name}: merged into Finding {fv.merged_into} on {date}.{tail}"
    if fv.status == SMALL:
        return (f"{name}: on {date} only specks under the tracking size remain where it was "
                f"(about {fv.volume_ml:.2f} mL).{tail}")  # fmt: skip
    if fv.status == "not imaged":
        before = f"; last {previous[-1][1].volume_ml:.2f} mL on {rows[previous[-1][0]]['date']}"
        return (f"{name}: not imaged on {date} (outside the field of view: not assessable)"
                f"{before if previous else ''}.{tail}")  # fmt: skip
    if fv.status == "resolved":
        gone = next((i for i in range(last, 0, -1) if visits[i - 1].status != "resolved"), last)
        was = (f"; {previous[-1][1].volume_ml:.2f} mL on {rows[previous[-1][0]]['date']}"
               if previous else "")  # fmt: skip
        return (f"{name}: resolved on {rows[gone]['date']} (no activation above the threshold"
                f"{was}).{tail}")  # fmt: skip
    parts = []
    first = finding.first_visit
    if first == 0:
        parts.append(f"{name}: {visits[0].volume_ml:.2f} mL at baseline → {fv.volume_ml:.2f} mL "
                     f"on {date}")  # fmt: skip
        changes = [f"{_pct_text(fv.change_pct_baseline)} vs baseline"
                   if fv.change_pct_baseline is not None else None]  # fmt: skip
    else:
        parts.append(f"{name}: new on {rows[first]['date']} ({visits[first].volume_ml:.2f} mL, "
                     f"not seen at baseline); {fv.volume_ml:.2f} mL on {date}")  # fmt: skip
        changes = []
    if last > 0 and first < last:
        changes.append(
            f"{_pct_text(fv.change_pct_previous)} vs previous visit"
            if fv.change_pct_previous is not None
            else "absent at the previous visit"
        )
    changes = [c for c in changes if c]
    text = parts[0] + (f" ({', '.join(changes)})" if changes else "")
    if fv.status == "reappeared":
        text += ", reappeared after a visit without it"
    if fv.parts > 1:
        text += f", now in {fv.parts} parts"
    if finding.trend_ml_per_30d is not None and first < last:
        trend = _signed(finding.trend_ml_per_30d, "{:+.2f}")
        if finding.trend_note.startswith("not monotone"):
            text += f"; overall trend {trend} mL per 30 days ({finding.trend_note})"
        else:
            text += f"; trend {trend} mL per 30 days"
    elif first < last:
        text += f"; {finding.trend_note}"
    return text + f".{tail}"


def visit_summary(row: dict[str, Any]) -> str:
    """One line per visit for the command line."""
    vol = "no activation" if not row["volume_ml"] else f"activated {row['volume_ml']:.2f} mL"
    bits = [f"{row['date']} (day {row['days']:4d}): {vol}"]
    if row.get("volume_change_pct") is not None:
        bits.append(f"{row['volume_change_pct']:+.1f} % vs baseline")
    if row.get("centroid_shift_mm") is not None:
        bits.append(f"centroid shift {row['centroid_shift_mm']:.1f} mm")
    if row.get("dice") is not None:
        bits.append(f"Dice {row['dice']:.2f}")
    if row.get("registration_similarity") is not None:
        bits.append(f"registration similarity {row['registration_similarity']:.2f}")
    text = ", ".join(bits)
    if row.get("flags"):
        text += "  [FLAGGED: " + "; ".join(row["flags"]) + "]"
    return text


# --------------------------------------------------------------------------- JSON / CSV


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None, arrays to lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (int, str)):
        return value
    return str(value)


def json_record(result) -> dict[str, Any]:
    """Everything in the report, as strict JSON (``null`` where a number does not exist)."""
    from medcam import __version__

    findings = []
    for f in result.findings:
        visits = []
        for row, fv in zip(result.rows, f.visits, strict=True):
            visits.append({"visit": row["visit"], "date": row["date"], "status": fv.status,
                           "volume_ml": fv.volume_ml,
                           "change_pct_baseline": fv.change_pct_baseline,
                           "change_pct_previous": fv.change_pct_previous,
                           "centroid_lps": fv.centroid_lps, "shift_mm": fv.shift_mm,
                           "peak": fv.peak, "parts": fv.parts, "merged_into": fv.merged_into,
                           "borderline": fv.borderline, "note": fv.note})  # fmt: skip
        findings.append({"number": f.number, "uid": f.uid, "first_visit": f.first_visit,
                         "trend_ml_per_30d": f.trend_ml_per_30d, "trend_note": f.trend_note,
                         "summary": finding_summary(f, result), "visits": visits})  # fmt: skip
    record = {
        "medcam_version": __version__,
        "caveat": CAVEAT,
        "threshold": result.threshold,
        "threshold_rule": result.threshold_rule,
        "registration": {
            "kind": result.registration_kind,
            "metric": result.registrations[0].metric if result.registrations else None,
        },
        "limits": result.limits.as_dict(),
        "flags": [{"visit": f.visit, "kind": f.kind, "message": f.message} for f in result.flags],
        "rows": result.rows,
        "findings": findings,
        "trends": result.trends,
        "provenance": result.baseline.provenance,
        "metrics": METRIC_DESCRIPTIONS,
    }
    return _clean(record)


CSV_COLUMNS = (
    ("visit", "Visit"), ("date", "Date"), ("days", "Days since baseline"),
    ("probability", "Model probability"), ("volume_ml", "Activated volume (mL)"),
    ("volume_change_pct", "Volume change vs baseline (%)"),
    ("volume_change_pct_prev", "Volume change vs previous (%)"), ("findings", "Findings"),
    ("centroid_shift_mm", "Centroid shift vs baseline (mm)"),
    ("centroid_shift_mm_prev", "Centroid shift vs previous (mm)"),
    ("peak_shift_mm", "Peak shift vs baseline (mm)"), ("dice", "Dice vs baseline"),
    ("iou", "IoU vs baseline"), ("dice_prev", "Dice vs previous"),
    ("pearson", "Pearson r in body"), ("spearman", "Spearman r in body"),
    ("heat_sum", "Heat sum (value x mL)"), ("threshold_sensitivity", "Threshold sensitivity"),
    ("registration", "Registration"), ("registration_similarity", "Registration similarity"),
    ("registration_disagreement_mm", "Rigid-affine disagreement (mm)"),
    ("registration_scale", "Affine scale"),
    ("registration_inverse_consistency_mm", "Inverse consistency (mm)"),
    ("registration_coverage", "Baseline body covered (fraction)"), ("flags", "Flags"),
)  # fmt: skip


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return " | ".join(str(x) for x in v)
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------- HTML


def _img(data: bytes | list | None, alt: str) -> str:
    if data is None:
        return ""
    if isinstance(data, list):
        return "".join(_img(d, alt) for d in data)
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}">')  # fmt: skip


STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;font-size:15px;
 line-height:1.45;color:#1b1b1b;margin:0;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:20px 24px;background:#fff}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#555;margin:0 0 12px}
.caveat{background:#fff8e1;border-left:5px solid #f2a900;padding:10px 14px;margin:12px 0}
.flags{background:#fdecea;border-left:5px solid #c62828;padding:10px 14px;margin:12px 0}
.ok{background:#e8f5e9;border-left:5px solid #2e7d32;padding:10px 14px;margin:12px 0}
ul{margin:6px 0;padding-left:22px}li{margin:3px 0}
table{border-collapse:collapse;width:100%;font-size:13px;margin:6px 0}
th,td{border:1px solid #d6d6d6;padding:4px 6px;text-align:right;vertical-align:top}
th{background:#f0f0f0;font-weight:600}td:first-child,th:first-child{text-align:left}
td.flag{color:#c62828;font-weight:600}
img{max-width:100%;height:auto;display:block;margin:6px 0}
dl{font-size:13px}dt{font-weight:600;margin-top:6px}dd{margin-left:16px}
.small{font-size:13px;color:#444}code{overflow-wrap:anywhere}
"""


def _visit_table(result) -> str:
    has_prob = any(r.get("probability") is not None for r in result.rows)
    named = any(r["visit"] != r["date"] for r in result.rows)
    cols = [c for c in VISIT_COLUMNS
            if (c[0] != "probability" or has_prob) and (c[0] != "visit" or named)]  # fmt: skip
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols) + "<th>Flags</th>"
    body = []
    for i, r in enumerate(result.rows):
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            text = "—" if v is None else fmt(v)
            if i == 0 and key in ("volume_change_pct", "volume_change_pct_prev"):
                text = "baseline" if key == "volume_change_pct" else "—"
            cells.append(f"<td>{html.escape(text)}</td>")
        n = len(r["flags"])
        cells.append(f'<td class="flag">{n} (see above)</td>' if n else "<td>none</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _registration_table(result) -> str:
    lim = result.limits
    head = ("<tr><th>Follow-up</th><th>Method</th>"
            f"<th>Similarity (≥ {lim.min_similarity:g})</th>"
            f"<th>Rigid vs affine at activation (≤ {lim.max_disagreement_mm:g} mm)</th>"
            f"<th>Scale (≤ ±{lim.max_scale_pct:g} %)</th>"
            f"<th>Inverse consistency (≤ {lim.max_inverse_consistency_mm:g} mm)</th>"
            "<th>Verdict</th></tr>")  # fmt: skip
    body = []
    for r in result.rows[1:]:
        scale = r.get("registration_scale")
        reg_flags = [f for f in result.flags if f.visit == r["visit"] and f.kind == "registration"]
        verdict = '<td class="flag">flagged</td>' if reg_flags else "<td>within limits</td>"
        body.append(
            f"<tr><td>{html.escape(r['visit'])}</td><td>{html.escape(str(r['registration']))}</td>"
            f"<td>{_num(r.get('registration_similarity'))}</td>"
            f"<td>{_num(r.get('registration_disagreement_mm'), '{:.1f}')}</td>"
            f"<td>{'—' if scale is None else _signed(100 * (scale - 1), '{:+.1f} %')}</td>"
            f"<td>{_ic_text(r.get('registration_inverse_consistency_mm'))}</td>"
            f"{verdict}</tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _ic_text(v: float | None) -> str:
    if v is None:
        return "—"
    return "0 (exact inverse)" if v < 1e-6 else f"{v:.2f}"


def _findings_table(result) -> str:
    if not result.findings:
        return "<p>No finding: no visit has an activated region above the threshold.</p>"
    head = "<th>Finding</th>" + "".join(
        f"<th>{html.escape(r['visit'])}<br><span class='small'>day {r['days']}</span></th>"
        for r in result.rows
    ) + "<th>Now vs baseline</th><th>Trend (mL / 30 d)</th>"  # fmt: skip
    body = []
    for f in result.findings:
        cells = [f"<td>{f.number}</td>"]
        for fv in f.visits:
            shift = ""
            if fv.status in ("present", "new", "reappeared"):
                text = f"{fv.volume_ml:.2f} mL" + ("" if fv.status == "present" else
                                                   f" ({fv.status})")  # fmt: skip
                if fv.shift_mm is not None and fv.status != "new" and fv is not f.visits[0]:
                    shift = f"<br><span class='small'>moved {fv.shift_mm:.1f} mm</span>"
            elif fv.status == "merged":
                text = f"merged into {fv.merged_into}"
            elif fv.status == "not yet seen":
                text = "—"
            elif fv.status == SMALL:
                text = f"specks, {fv.volume_ml:.2f} mL"
            else:
                text = fv.status
            cls = ' class="flag"' if fv.borderline or fv.status == "not imaged" else ""
            cells.append(f"<td{cls}>{html.escape(text)}{shift}</td>")
        last = f.visits[-1]
        now = ("new" if f.first_visit > 0 and last.volume_ml else
               _pct_text(last.change_pct_baseline))  # fmt: skip
        cells.append(f"<td>{html.escape(now)}</td>")
        trend = "—" if f.trend_ml_per_30d is None else _signed(f.trend_ml_per_30d, "{:+.2f}")
        cells.append(f"<td>{html.escape(trend)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _settings(result) -> str:
    from medcam import __version__

    prov = result.baseline.provenance
    model = prov.get("model")
    items = [
        ("Model (weights SHA-256)", (str(model)[:16] + "…") if model else "not recorded"),
        ("Target layer(s)", ", ".join(prov.get("layers") or []) or "not recorded"),
        ("Method", prov.get("method") or "not recorded"),
        ("Target", str(prov.get("target")) if prov.get("target") is not None else "not recorded"),
        ("Normalisation", prov.get("normalization") or "none recorded"),
        ("Activation threshold", result.threshold_rule),
        (
            "Registration",
            f"{result.registration_kind} to the baseline"
            + (f" ({result.registrations[0].metric})" if result.registrations else ""),
        ),
        ("medcam", __version__),
    ]
    return "<table>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td style='text-align:left'><code>{html.escape(str(v))}"
        "</code></td></tr>" for k, v in items) + "</table>"  # fmt: skip


def _largest(finding) -> float:
    return max(v.volume_ml or 0.0 for v in finding.visits)


def summary_findings(result, limit: int = SUMMARY_FINDINGS) -> list:
    """The findings the summary names: the ``limit`` largest (over all visits), by number."""
    largest = sorted(result.findings, key=lambda f: (-_largest(f), f.number))[:limit]
    return sorted(largest, key=lambda f: f.number)


def _html(result, pictures: dict[str, bytes | None]) -> str:
    rows = result.rows
    prov = result.baseline.provenance
    patient = prov.get("patient") or "not recorded"
    if result.flags:
        flag_html = ('<div class="flags"><b>Check before use</b> — these numbers may be wrong:'
                     "<ul>" + "".join(f"<li><b>{html.escape(f.visit)}</b> ({f.kind}): "
                                      f"{html.escape(f.message)}</li>" for f in result.flags)
                     + "</ul></div>")  # fmt: skip
    else:
        flag_html = ('<div class="ok">Registration and threshold checks are within the stated '
                     "limits for every visit.</div>")  # fmt: skip
    shown = summary_findings(result)
    summary = "".join(f"<li>{html.escape(finding_summary(f, result))}</li>" for f in shown)
    if len(shown) < len(result.findings):
        more = len(result.findings) - len(shown)
        summary += (f"<li>{more} smaller finding(s) (never above "
                    f"{max(_largest(f) for f in result.findings if f not in shown):.2f} mL): "
                    "see the table below.</li>")  # fmt: skip
    total = rows[-1]
    total_line = (
        f"Total activated volume {total['volume_ml']:.2f} mL on {total['date']}"
        + (f" ({_pct_text(total['volume_change_pct'])} vs baseline)"
           if total.get("volume_change_pct") is not None else "")
        + f"; threshold {result.threshold_rule}."
        if result.threshold is not None else "No visit has any positive heat: nothing to measure."
    )  # fmt: skip
    glossary = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                       for k, v in METRIC_DESCRIPTIONS.items())  # fmt: skip
    sections = [
        (
            "Activation over time",
            pictures.get("visits"),
            "Each visit registered to the baseline; axial, coronal and sagittal slices through the "
            "maximum over all visits. Same colour scale for every visit; white outline: activated "
            "region (heatmap ≥ threshold).",
        ),
        ("Findings", pictures.get("findings"), "Axial crops through each finding."),
        (
            "Difference",
            pictures.get("difference"),
            "Follow-up minus baseline heatmap on the baseline image: red = more, blue = less.",
        ),
        (
            "Registration check",
            pictures.get("registration"),
            "Checkerboard of the baseline and the registered follow-up: anatomy must continue "
            "smoothly across tile borders; steps mean misalignment.",
        ),
        ("Trend", pictures.get("trend"), "Activated volume per finding and in total."),
    ]
    figs = "".join(f"<h2>{t}</h2><p class='small'>{html.escape(d)}</p>{_img(p, t)}"
                   for t, p, d in sections if p is not None)  # fmt: skip
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>medcam follow-up report</title><style>{STYLE}</style></head><body><main>
<h1>Follow-up of the model's explanation (heatmap)</h1>
<p class="sub">Patient {html.escape(str(patient))} · {len(rows)} visits, {rows[0]["date"]} to
{rows[-1]["date"]} ({rows[-1]["days"]} days) · baseline {rows[0]["date"]}</p>
<div class="caveat"><b>Caveat.</b> {html.escape(CAVEAT)}</div>
{flag_html}
<h2>Summary</h2><ul>{summary or "<li>No finding above the threshold at any visit.</li>"}
<li>{html.escape(total_line)}</li></ul>
<h2>Findings by visit</h2>{_findings_table(result)}
<h2>Visits</h2>{_visit_table(result)}
<h2>Registration quality</h2>{_registration_table(result)}
{figs}
<h2>Settings</h2>{_settings(result)}
<details><summary>What each number measures</summary><dl>{glossary}</dl></details>
</main></body></html>"""


# --------------------------------------------------------------------------- writing


def _save_tfm(reg, path: Path) -> None:
    """ITK picks the transform writer by suffix: write ``<tmp>.tfm``, then move it to ``path``."""
    import os

    named = path.with_name(path.name + ".tfm")
    try:
        reg.save(named)
        os.replace(named, path)
    finally:
        named.unlink(missing_ok=True)


def write_report(result, out: str | Path, formats: Sequence[str] | None) -> dict[str, list[Path]]:
    """Write the chosen outputs of a :class:`LongitudinalResult` into ``out``.

    Always written: one ``registration_<visit>.tfm`` per registered follow-up (ITK transform,
    baseline -> follow-up points; 3D Slicer and SimpleITK read it).
    """
    from medcam.longitudinal import figures as F

    formats = list(formats) if formats is not None else default_formats(result.timepoints)
    check_formats(formats, result.timepoints)
    inputs = [p for tp in result.timepoints if tp.scan is not None for p in tp.scan.input_files]
    folder = OutputDir(out, inputs)
    written: dict[str, list[Path]] = {f: [] for f in [*formats, "tfm"]}
    base = result.baseline
    labels = result.labels
    for label, reg in zip(labels[1:], result.registrations, strict=True):
        if reg.kind != "none":
            written["tfm"].append(folder.write_file(f"registration_{safe_name(label)}.tfm",
                                                    lambda p, r=reg: _save_tfm(r, p)))  # fmt: skip
    pictures = {"visits", "difference", "registration", "findings", "trend"}
    need_pictures = "html" in formats or "png" in formats
    images = F.registered_images(result) if need_pictures else []
    diff_pngs = [F.difference_png(result, images, follow_up=k + 1)
                 for k in range(len(result.difference_maps))] if need_pictures else []  # fmt: skip
    for k, (label, diff) in enumerate(zip(labels[1:], result.difference_maps, strict=True)):
        name = safe_name(f"difference_{label}")
        if "nifti" in formats:
            from medcam.writers.nifti import heatmap_to_nifti, nifti_bytes

            img = heatmap_to_nifti(
                diff,
                LPS_TO_RAS @ base.affine_lps,
                intent_name="difference",
                description=f"medcam heatmap difference {label} - baseline",
            )
            data = nifti_bytes(img)
            written["nifti"].append(
                folder.write_file(f"{name}.nii.gz", lambda p, d=data: p.write_bytes(d))
            )
        if "dicom-pm" in formats:
            from medcam.longitudinal.sr import difference_parametric_map

            pm = difference_parametric_map(diff, result, label)
            written["dicom-pm"].append(
                folder.write_file(f"{name}_pm.dcm", lambda p, d=pm: d.save_as(p))
            )
        if "png" in formats:
            data = diff_pngs[k]
            written["png"].append(
                folder.write_file(f"{name}.png", lambda p, d=data: p.write_bytes(d))
            )
    if "dicom-sr" in formats:
        from medcam.longitudinal.sr import write_findings_dicom

        written["dicom-sr"] += write_findings_dicom(result, folder)
    if "csv" in formats:
        extra = sorted({k for r in result.rows for k in r if k.startswith("region_")})

        def write_csv(path: Path) -> None:
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow([h for _, h in CSV_COLUMNS] + extra)
                for r in result.rows:
                    w.writerow([_csv_value(r.get(k)) for k, _ in CSV_COLUMNS]
                               + [_csv_value(r.get(k)) for k in extra])  # fmt: skip

        written["csv"].append(folder.write_file("longitudinal.csv", write_csv))
    if "json" in formats:
        text = json.dumps(json_record(result), indent=2, allow_nan=False)
        written["json"].append(folder.write_file("longitudinal.json", lambda p: p.write_text(text)))
    if need_pictures:
        pics: dict[str, Any] = {
            "visits": F.visits_png(result, images),
            "difference": diff_pngs,
            "registration": F.registration_png(result, images),
            "findings": F.findings_png(result, images),
            "trend": F.trend_png(result),
        }
        assert set(pics) == pictures
        if "png" in formats:
            for key in ("visits", "registration", "findings", "trend"):
                if pics[key] is not None:
                    written["png"].append(folder.write_file(
                        f"{key}.png", lambda p, d=pics[key]: p.write_bytes(d)))  # fmt: skip
        if "html" in formats:
            page = _html(result, pics)
            written["html"].append(
                folder.write_file("report.html", lambda p: p.write_text(page, encoding="utf-8"))
            )
    return written
