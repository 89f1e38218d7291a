"""Longitudinal outputs: difference maps, tables, plots and a self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medcam.io.output import OutputDir, safe_name
from medcam.longitudinal.metrics import METRIC_DESCRIPTIONS

__all__ = ["write_report"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
TABLE_COLUMNS = (
    "visit", "date", "days", "probability", "volume_ml", "volume_change_pct",
    "volume_change_pct_prev", "heat_sum", "centroid_shift_mm", "centroid_shift_mm_prev",
    "peak_shift_mm", "dice", "iou", "dice_prev", "pearson", "spearman", "registration",
    "registration_metric", "registration_round_trip_mm",
)  # fmt: skip


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.4g}"
    return str(v)


def _trend_png(result) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = [("volume_ml", "activated volume (mL)"), ("centroid_shift_mm", "centroid shift (mm)"),
            ("dice", "Dice vs baseline"), ("probability", "model probability")]  # fmt: skip
    days = [r["days"] for r in result.rows]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys, strict=True):
        values = [np.nan if r.get(key) is None else r[key] for r in result.rows]
        ax.plot(days, values, "o-", color="tab:red")
        slope = result.trends.get(key, {}).get("slope_per_day")
        if slope is not None and np.isfinite(slope):
            icpt = result.trends[key]["intercept"]
            ax.plot(days, [icpt + slope * d for d in days], "--", color="gray",
                    label=f"Theil-Sen {slope * 30:+.3g}/30 d")  # fmt: skip
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("days since baseline", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _panel_png(result) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from medcam.longitudinal.registration import to_sitk
    from medcam.writers.figures import blend_rgb, radiological_views, window

    base = result.baseline
    reference = to_sitk(np.zeros(base.image.shape, np.float32), base.affine_lps)
    images = [base.image]
    for tp, reg in zip(result.timepoints[1:], result.registrations, strict=True):
        moved = sitk.Resample(to_sitk(tp.image, tp.affine_lps), reference, reg.transform,
                              sitk.sitkLinear, float(tp.image.min()))  # fmt: skip
        images.append(np.transpose(sitk.GetArrayFromImage(moved), (2, 1, 0)))
    heat0 = result.on_baseline[0]
    centre = np.unravel_index(int(np.argmax(heat0)), heat0.shape)
    vmax = max(float(m.max()) for m in result.on_baseline) or 1.0
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6))
    for ax, img, heat, row in zip(np.atleast_1d(axes), images, result.on_baseline, result.rows,
                                  strict=True):  # fmt: skip
        gray, aspect = radiological_views(window(img), LPS_TO_RAS @ base.affine_lps, centre)[
            "axial"
        ]
        h, _ = radiological_views(heat, LPS_TO_RAS @ base.affine_lps, centre)["axial"]
        ax.imshow(blend_rgb(gray, h, vmax, 0.5), aspect=aspect)
        ax.set_title(f"{row['date']} (day {row['days']})\n{row['volume_ml']:.2f} mL", fontsize=8)
        ax.axis("off")
    fig.suptitle("heatmaps on the baseline grid (registered), axial slice through the "
                 "baseline peak", fontsize=9)  # fmt: skip
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _html(result, trend: bytes | None, panel: bytes | None) -> str:
    def img(data: bytes | None, alt: str) -> str:
        if data is None:
            return ""
        return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'

    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    cells = ["".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in TABLE_COLUMNS)
             for r in result.rows]  # fmt: skip
    body = "".join(f"<tr>{c}</tr>" for c in cells)
    trends = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v['slope_per_day'])}</td></tr>"
        for k, v in result.trends.items()
    )
    glossary = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
        for k, v in METRIC_DESCRIPTIONS.items()
    )
    prov = html.escape(json.dumps(result.baseline.provenance, default=str))
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "img{max-width:100%}dt{font-weight:bold}"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>medcam longitudinal report</title><style>{style}</style>
</head><body><h1>Longitudinal heatmap comparison</h1>
<p>{len(result.rows)} visits, baseline {result.rows[0]["date"]}; activation threshold
{result.threshold:.4g} (heatmap units, same for every visit); provenance: {prov}</p>
<h2>Per visit</h2><table><tr>{head}</tr>{body}</table>
<h2>Trends (Theil-Sen slope per day)</h2>
<table><tr><th>metric</th><th>slope/day</th></tr>{trends}</table>
<h2>Trend plot</h2>{img(trend, "trend plot")}
<h2>Visits</h2>{img(panel, "per-visit overlays")}
<h2>What each metric measures</h2><dl>{glossary}</dl>
</body></html>"""


def write_report(result, out: str | Path, formats: Sequence[str]) -> dict[str, list[Path]]:
    """Write the chosen outputs of a :class:`LongitudinalResult` into ``out``."""
    from medcam.writers.nifti import heatmap_to_nifti, nifti_bytes

    folder = OutputDir(out, [p for tp in result.timepoints if tp.scan is not None
                             for p in tp.scan.input_files])  # fmt: skip
    written: dict[str, list[Path]] = {f: [] for f in formats}
    base = result.baseline
    labels = [r["visit"] for r in result.rows[1:]]
    for label, diff in zip(labels, result.difference_maps, strict=True):
        name = safe_name(f"difference_{label}")
        if "nifti" in formats:
            img = heatmap_to_nifti(
                diff, LPS_TO_RAS @ base.affine_lps, intent_name="difference",
                description=f"medcam heatmap difference {label} - baseline",
            )  # fmt: skip
            data = nifti_bytes(img)
            written["nifti"].append(
                folder.write_file(f"{name}.nii.gz", lambda p, d=data: p.write_bytes(d))
            )
        if "dicom-pm" in formats and base.scan is not None and base.scan.kind == "dicom-series":
            from medcam.writers.dicom_common import DicomIdentity
            from medcam.writers.dicom_pm import build_parametric_map

            pm = build_parametric_map(
                diff, base.scan, method=str(base.provenance.get("method") or "gradcam"),
                label=f"difference {label}", identity=DicomIdentity.new(9500),
                description=f"medcam heatmap change {label} vs baseline",
            )  # fmt: skip
            written["dicom-pm"].append(
                folder.write_file(f"{name}_pm.dcm", lambda p, d=pm: d.save_as(p))
            )
    if "csv" in formats:
        extra = sorted({k for r in result.rows for k in r if k.startswith("region_")})

        def write_csv(path: Path) -> None:
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow([*TABLE_COLUMNS, *extra])
                for r in result.rows:
                    w.writerow([_fmt(r.get(c)) for c in (*TABLE_COLUMNS, *extra)])

        written["csv"].append(folder.write_file("longitudinal.csv", write_csv))
    if "json" in formats:
        record = {
            "threshold": result.threshold,
            "rows": result.rows,
            "trends": result.trends,
            "provenance": result.baseline.provenance,
            "metrics": METRIC_DESCRIPTIONS,
        }
        text = json.dumps(record, indent=2, default=str)
        written["json"].append(folder.write_file("longitudinal.json", lambda p: p.write_text(text)))
    trend = _trend_png(result) if {"png", "html"} & set(formats) else None
    panel = _panel_png(result) if {"png", "html"} & set(formats) else None
    if "png" in formats:
        written["png"].append(folder.write_file("trends.png", lambda p: p.write_bytes(trend)))
        written["png"].append(folder.write_file("visits.png", lambda p: p.write_bytes(panel)))
    if "html" in formats:
        page = _html(result, trend, panel)
        written["html"].append(folder.write_file("report.html", lambda p: p.write_text(page)))
    return written
