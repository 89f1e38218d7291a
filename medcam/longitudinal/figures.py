"""Pictures for the longitudinal report: registered visits, differences, registration check,
findings over time and trends. Each returns PNG bytes.

Every image view is in radiological convention (patient right on screen left, anterior and
superior up) and carries orientation letters; heatmaps share one colour scale across visits
(0 to the maximum over all visits), with the activation threshold outlined and marked on the
colour bar.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = [
    "difference_png",
    "findings_png",
    "registration_png",
    "trend_png",
    "views",
    "visits_png",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PLANES = ("axial", "coronal", "sagittal")
# screen edges (left, right, top, bottom) of each plane in radiological display
MARKERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
CT_WINDOW = (-160.0, 240.0)  # soft tissue: level 40, width 400 HU


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.08)
    _plt().close(fig)
    return buf.getvalue()


def views(volume: np.ndarray, affine_lps: np.ndarray, index) -> dict[str, tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal slices of ``volume (X, Y, Z)`` through voxel ``index``, in
    radiological display orientation (see :data:`MARKERS`), with their pixel aspect ratios."""
    from medcam.writers.figures import radiological_views

    return radiological_views(np.asarray(volume), LPS_TO_RAS @ affine_lps, index)


def _window(image: np.ndarray, window) -> np.ndarray:
    lo, hi = window
    return np.clip((np.asarray(image, np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def display_window(result) -> tuple[float, float]:
    """CT soft-tissue window for CT, else the baseline's 1st-99th percentile."""
    base = result.baseline
    modality = str(base.provenance.get("modality") or "")
    if modality == "CT" or (not modality and float(np.percentile(base.image, 1)) < -500):
        return CT_WINDOW
    lo, hi = (float(v) for v in np.percentile(base.image, [1, 99]))
    return lo, hi if hi > lo else lo + 1.0


def registered_images(result) -> list[np.ndarray]:
    """Each visit's image on the baseline grid (the baseline itself first)."""
    import SimpleITK as sitk

    from medcam.longitudinal.registration import from_sitk, to_sitk

    base = result.baseline
    reference = to_sitk(np.zeros(base.image.shape, np.float32), base.affine_lps)
    out = [base.image]
    for tp, reg in zip(result.timepoints[1:], result.registrations, strict=True):
        moved = sitk.Resample(to_sitk(tp.image, tp.affine_lps), reference, reg.transform,
                              sitk.sitkLinear, float(np.min(tp.image)))  # fmt: skip
        out.append(from_sitk(moved))
    return out


def _markers(ax, plane: str) -> None:
    import matplotlib.patheffects as pe

    left, right, top, bottom = MARKERS[plane]
    style = {"color": "white", "fontsize": 9, "fontweight": "bold",
             "path_effects": [pe.withStroke(linewidth=2, foreground="black")]}  # fmt: skip
    ax.text(0.02, 0.5, left, transform=ax.transAxes, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, transform=ax.transAxes, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, transform=ax.transAxes, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, transform=ax.transAxes, ha="center", va="bottom", **style)


def _heat_colorbar(fig, axes, vmax: float, threshold: float | None, label: str) -> None:
    import matplotlib

    plt = _plt()
    mappable = plt.cm.ScalarMappable(matplotlib.colors.Normalize(0, vmax), cmap="jet")
    bar = fig.colorbar(mappable, ax=axes, shrink=0.8, fraction=0.03, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if threshold is not None and 0 < threshold <= vmax:
        bar.ax.axhline(threshold, color="white", linewidth=2)
        bar.ax.axhline(threshold, color="black", linewidth=1, linestyle="--")


def visits_png(result, images: list[np.ndarray]) -> bytes:
    """One row per visit: registered image + heatmap, three planes through the maximum over
    all visits, threshold outlined, shared colour bar."""
    from medcam.writers.figures import blend_rgb

    plt = _plt()
    base, idx, thr = result.baseline, result.display_index, result.threshold
    vmax = max(float(m.max()) for m in result.on_baseline) or 1.0
    win = display_window(result)
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(10.5, 2.9 * n + 0.5), squeeze=False)
    for r, (img, heat, row) in enumerate(zip(images, result.on_baseline, result.rows,
                                             strict=True)):  # fmt: skip
        gv, hv = views(_window(img, win), base.affine_lps, idx), views(heat, base.affine_lps, idx)
        for c, plane in enumerate(PLANES):
            ax = axes[r, c]
            gray, aspect = gv[plane]
            h = hv[plane][0]
            ax.imshow(blend_rgb(gray, h, vmax, 0.6), aspect=aspect, interpolation="nearest")
            if thr is not None and (h >= thr).any() and (h < thr).any():
                ax.contour(h >= thr, levels=[0.5], colors="white", linewidths=0.8)
            _markers(ax, plane)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                what = f"{row['volume_ml']:.2f} mL" if row["volume_ml"] > 0 else "no activation"
                tag = "baseline" if r == 0 else f"day {row['days']}"
                ax.set_ylabel(f"{row['visit']}\n({tag})\n{what}", fontsize=9)
            if r == 0:
                ax.set_title(plane, fontsize=9)
    _heat_colorbar(fig, axes, vmax, thr, "heatmap value (dashed: threshold)")
    return _png(fig)


def difference_png(result, images: list[np.ndarray], follow_up: int | None = None) -> bytes:
    """Follow-up minus baseline heatmap on the baseline image (red: more, blue: less), one row
    per follow-up (or only ``follow_up``, 1-based), three planes through the display point."""
    import matplotlib

    plt = _plt()
    base, idx = result.baseline, result.display_index
    diffs = result.difference_maps
    rows = range(len(diffs)) if follow_up is None else [follow_up - 1]
    lim = max(float(np.abs(d).max()) for d in diffs) or 1.0
    gray = views(_window(images[0], display_window(result)), base.affine_lps, idx)
    cmap = matplotlib.colormaps["RdBu_r"]
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 2.9 * len(rows) + 0.5), squeeze=False)
    for r, k in enumerate(rows):
        dv = views(diffs[k], base.affine_lps, idx)
        for c, plane in enumerate(PLANES):
            ax = axes[r, c]
            g, aspect = gray[plane]
            d = dv[plane][0]
            alpha = np.clip(np.abs(d) / lim, 0, 1)[..., None] * 0.85
            rgb = (1 - alpha) * g[..., None] + alpha * cmap(0.5 + 0.5 * d / lim)[..., :3]
            ax.imshow(rgb, aspect=aspect, interpolation="nearest")
            _markers(ax, plane)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                row = result.rows[k + 1]
                ax.set_ylabel(f"{row['visit']}\nminus baseline", fontsize=9)
            if r == 0:
                ax.set_title(plane, fontsize=9)
    mappable = plt.cm.ScalarMappable(matplotlib.colors.Normalize(-lim, lim), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes, shrink=0.8, fraction=0.03, pad=0.02)
    bar.set_label("heatmap change (red: more, blue: less)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return _png(fig)


def registration_png(result, images: list[np.ndarray], tile_mm: float = 30.0) -> bytes:
    """Checkerboard of the baseline and each registered follow-up (tiles of ``tile_mm``), with
    the baseline's body outline in yellow: edges that continue across tiles and follow the
    outline mean a good alignment; steps at tile borders a bad one."""
    plt = _plt()
    base, idx = result.baseline, result.display_index
    win = display_window(result)
    spacing = np.sqrt((base.affine_lps[:3, :3] ** 2).sum(axis=0))
    grids = np.meshgrid(*[np.arange(n) * s // tile_mm for n, s in zip(base.image.shape, spacing,
                                                                      strict=True)],
                        indexing="ij")  # fmt: skip
    board = (sum(g.astype(int) for g in grids) % 2).astype(bool)
    n = len(images) - 1
    fig, axes = plt.subplots(n, 3, figsize=(10.5, 2.9 * n + 0.3), squeeze=False)
    b = _window(images[0], win)
    level = -500.0 if win == CT_WINDOW else win[0] + 0.1 * (win[1] - win[0])
    outline = views((images[0] > level).astype(np.uint8), base.affine_lps, idx)
    for r in range(n):
        f = _window(images[r + 1], win)
        checker = np.where(board, b, f)
        cv = views(checker, base.affine_lps, idx)
        reg, row = result.registrations[r], result.rows[r + 1]
        for c, plane in enumerate(PLANES):
            ax = axes[r, c]
            img, aspect = cv[plane]
            ax.imshow(img, cmap="gray", aspect=aspect, vmin=0, vmax=1, interpolation="nearest")
            edge = outline[plane][0]
            if edge.any() and not edge.all():  # the baseline's body outline, in yellow
                ax.contour(edge, levels=[0.5], colors="yellow", linewidths=0.7)
            _markers(ax, plane)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                flagged = any(f.visit == row["visit"] and f.kind == "registration"
                              for f in result.flags)  # fmt: skip
                verdict = "FLAGGED" if flagged else "ok"
                ax.set_ylabel(f"{row['visit']}\nvs baseline\n{reg.kind}: {verdict}", fontsize=9)
            if r == 0:
                ax.set_title(f"{plane} (checkerboard)", fontsize=9)
    return _png(fig)


def findings_png(
    result, images: list[np.ndarray], half_mm: float = 45.0, max_rows: int = 8
) -> bytes | None:
    """One row per finding (the ``max_rows`` largest), one column per visit: axial crop
    (``2 * half_mm``) through the finding's centroid on the registered images; ``None`` when
    there is no finding."""
    from medcam.writers.figures import blend_rgb

    if not result.findings:
        return None

    def biggest(f) -> float:
        return max(v.volume_ml or 0.0 for v in f.visits)

    largest = sorted(result.findings, key=lambda f: -biggest(f))[:max_rows]
    shown = sorted(largest, key=lambda f: f.number)
    plt = _plt()
    base = result.baseline
    vmax = max(float(m.max()) for m in result.on_baseline) or 1.0
    win = display_window(result)
    inv = np.linalg.inv(base.affine_lps)
    zoom = _display_zooms(base.affine_lps)
    nf, nv = len(shown), len(images)
    size = (1.9 * nv + 1.2, 2.0 * nf + 0.4)
    fig, axes = plt.subplots(nf, nv, figsize=size, squeeze=False, layout="constrained")
    for r, f in enumerate(shown):
        where = next(fv.centroid_lps for fv in f.visits if fv.centroid_lps is not None)
        idx = np.clip(np.rint((inv @ np.append(where, 1.0))[:3]).astype(int), 0,
                      np.array(base.image.shape) - 1)  # fmt: skip
        for c, (img, heat, fv) in enumerate(zip(images, result.on_baseline, f.visits,
                                                strict=True)):  # fmt: skip
            ax = axes[r, c]
            gray, aspect = views(_window(img, win), base.affine_lps, idx)["axial"]
            h = views(heat, base.affine_lps, idx)["axial"][0]
            # crop around the finding: axial display rows = A->P, columns = R->L
            centre = _display_xy(idx, base)
            half = (int(half_mm / zoom[1]), int(half_mm / zoom[0]))
            rs = slice(max(centre[0] - half[0], 0), centre[0] + half[0] + 1)
            cs = slice(max(centre[1] - half[1], 0), centre[1] + half[1] + 1)
            ax.imshow(blend_rgb(gray[rs, cs], h[rs, cs], vmax, 0.6), aspect=aspect,
                      interpolation="nearest")  # fmt: skip
            thr = result.threshold
            hc = h[rs, cs]
            if thr is not None and (hc >= thr).any() and (hc < thr).any():
                ax.contour(hc >= thr, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            vol = "" if fv.volume_ml is None else f"{fv.volume_ml:.2f} mL"
            ax.set_title(f"{fv.status}\n{vol}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f.name, fontsize=9)
            if r == nf - 1:
                ax.set_xlabel(result.rows[c]["visit"], fontsize=8)
    more = len(result.findings) - nf
    extra = f"; {more} smaller finding(s) in the table only" if more > 0 else ""
    fig.suptitle(f"findings over time (axial, registered; patient right on the left){extra}",
                 fontsize=9)  # fmt: skip
    return _png(fig)


def _display_zooms(affine_lps: np.ndarray) -> np.ndarray:
    """Voxel sizes along the displayed R-L, A-P and S-I axes (closest canonical axes)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(LPS_TO_RAS @ affine_lps)
    spacing = np.sqrt((affine_lps[:3, :3] ** 2).sum(axis=0))
    out = np.zeros(3)
    for src, (dst, _) in enumerate(ornt.astype(int)):
        out[dst] = spacing[src]
    return out


def _display_xy(index, base) -> tuple[int, int]:
    """(row, column) of voxel ``index`` in the axial view returned by :func:`views`."""
    marker = np.zeros(base.image.shape, np.uint8)
    marker[tuple(index)] = 1
    axial = views(marker, base.affine_lps, index)["axial"][0]
    r, c = np.argwhere(axial)[0]
    return int(r), int(c)


def trend_png(result) -> bytes:
    """Activated volume of each finding (and in total) vs days; model probability when known."""
    plt = _plt()
    days = [r["days"] for r in result.rows]
    probs = [r.get("probability") for r in result.rows]
    has_prob = any(p is not None for p in probs)
    fig, axes = plt.subplots(1, 2 if has_prob else 1, figsize=(10 if has_prob else 7, 3.2),
                             squeeze=False)  # fmt: skip
    ax = axes[0, 0]
    ax.plot(days, [r["volume_ml"] for r in result.rows], "o-", color="black", label="total")
    for f in result.findings:
        pts = [(d, fv.volume_ml) for d, fv in zip(days, f.visits, strict=True)
               if fv.volume_ml is not None]  # fmt: skip
        if pts:
            ax.plot(*zip(*pts, strict=True), "o--", label=f.name)
    ax.set_xlabel("days since baseline", fontsize=8)
    ax.set_ylabel("activated volume (mL)", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2)
    ax.tick_params(labelsize=7)
    if has_prob:
        ax2 = axes[0, 1]
        pts = [(d, p) for d, p in zip(days, probs, strict=True) if p is not None]
        ax2.plot(*zip(*pts, strict=True), "o-", color="tab:red")
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("days since baseline", fontsize=8)
        ax2.set_ylabel("model probability", fontsize=8)
        ax2.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)
