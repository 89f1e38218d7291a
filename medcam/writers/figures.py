"""Pictures: heatmap blended over the image, 2D overlays, 3D tri-planar views and montages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcam.writers.registry import CaseOutput, register_format

__all__ = [
    "blend_rgb",
    "peak_index",
    "radiological_views",
    "save_figure_2d",
    "save_figure_3d",
    "window",
    "window_limits",
    "write_png",
]


#: Voxels sampled (at most) to choose a display window: percentiles of a regular subsample.
WINDOW_SAMPLES = 1 << 20


def window_limits(image: np.ndarray, percentiles=(1.0, 99.0)) -> tuple[float, float]:
    """The display window ``(lo, hi)``: the 1st and 99th percentiles of the image's intensities.

    Computed on every voxel of an image up to :data:`WINDOW_SAMPLES` voxels, else on a regular
    subsample of about that many (every s-th voxel along each axis), which gives the same
    window to within the intensity histogram's resolution at a small fraction of the cost:
    a 512 x 512 x 1,000 CT is not sorted to draw a picture.
    """
    image = np.asarray(image)
    step = 1
    if image.size > WINDOW_SAMPLES:
        step = int(np.ceil((image.size / WINDOW_SAMPLES) ** (1.0 / image.ndim)))
    sample = image[(slice(None, None, step),) * image.ndim]
    lo, hi = (float(v) for v in np.percentile(sample.astype(np.float32), percentiles))
    return lo, hi


def window(image: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map ``image`` to [0, 1]; default window: 1st to 99th percentile (:func:`window_limits`)."""
    image = np.asarray(image, dtype=np.float32)
    if lo is None or hi is None:
        lo, hi = window_limits(image)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def _colormap_lut(cmap: str) -> np.ndarray:
    """``(N, 3)`` float32 RGB table of a matplotlib colormap (its own look-up table)."""
    table = _LUTS.get(cmap)
    if table is None:
        import matplotlib

        colormap = matplotlib.colormaps[cmap]
        table = colormap(np.arange(colormap.N))[:, :3].astype(np.float32)  # the table's rows
        _LUTS[cmap] = table
    return table


_LUTS: dict[str, np.ndarray] = {}


def blend_rgb(
    gray01: np.ndarray, heat: np.ndarray, vmax: float, alpha: float = 0.4, cmap: str = "jet"
) -> np.ndarray:
    """RGB uint8 ``(..., 3)``: colormapped heat over a gray image, opacity ``alpha * heat/vmax``.

    Where the heat is zero the image shows unchanged, so the overlay never hides anatomy the
    model ignored. Colours are those of ``matplotlib.colormaps[cmap]`` (its table, indexed as
    matplotlib indexes it), blended in float32 one image at a time.
    """
    h = np.asarray(heat, np.float32) / np.float32(vmax if vmax > 0 else 1.0)
    np.clip(h, 0.0, 1.0, out=h)
    lut = _colormap_lut(cmap)
    index = (h * np.float32(lut.shape[0])).astype(np.intp)  # matplotlib: int(h * N), 1 -> N - 1
    np.minimum(index, lut.shape[0] - 1, out=index)
    gray = np.asarray(gray01, np.float32)[..., None]
    rgb = lut[index]  # (..., 3)
    rgb -= gray
    h *= np.float32(alpha * 255.0)  # opacity, scaled to 8 bits
    rgb *= h[..., None]
    rgb += gray * np.float32(255.0)  # 255 * ((1 - a) * gray + a * colour)
    np.rint(rgb, out=rgb)
    return rgb.astype(np.uint8)


def _canonical(volume: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Volume reordered to RAS+ axes (closest canonical), and its voxel sizes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine_ras)
    data = nib.orientations.apply_orientation(volume, ornt)
    zooms = np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))[ornt[:, 0].astype(int)]
    return data, zooms


def radiological_views(volume, affine_ras, point) -> dict[str, tuple[np.ndarray, float]]:
    """Axial, coronal and sagittal slices through voxel ``point`` in radiological display
    convention (patient right on screen left, anterior/superior up), with their aspect ratios.
    """
    data, z = _canonical(volume, affine_ras)
    ornt_point = _canonical_index(point, volume.shape, affine_ras)
    x, y, s = ornt_point
    return {
        "axial": (data[::-1, ::-1, s].T, z[1] / z[0]),
        "coronal": (data[::-1, y, ::-1].T, z[2] / z[0]),
        "sagittal": (data[x, ::-1, ::-1].T, z[2] / z[1]),
    }


def _canonical_index(point, shape, affine_ras) -> tuple[int, int, int]:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine_ras)
    out = [0, 0, 0]
    for src_axis, (dst_axis, flip) in enumerate(ornt.astype(int)):
        v = int(point[src_axis])
        out[dst_axis] = shape[src_axis] - 1 - v if flip < 0 else v
    return tuple(out)


def _colorbar(fig, vmax: float) -> None:
    import matplotlib
    import matplotlib.pyplot as plt

    mappable = plt.cm.ScalarMappable(matplotlib.colors.Normalize(0, vmax), cmap="jet")
    fig.colorbar(mappable, ax=fig.axes, shrink=0.6, label="heatmap (opacity grows with value)")


def peak_index(volume: np.ndarray) -> tuple[int, ...]:
    """Index of the maximum of ``volume``, read in its memory order (no reordering copy)."""
    a = np.asarray(volume)
    if not a.flags.c_contiguous and a.T.flags.c_contiguous:
        return tuple(int(v) for v in np.unravel_index(int(np.argmax(a.T)), a.T.shape))[::-1]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(a)), a.shape))


def save_figure_3d(
    volume: np.ndarray,
    heat: np.ndarray,
    affine_ras: np.ndarray,
    path: Path,
    *,
    title: str,
    alpha: float = 0.4,
    montage_slices: int = 12,
    vmax: float | None = None,
    limits: tuple[float, float] | None = None,
) -> None:
    """Tri-planar views through the heatmap peak (top) and an axial montage (bottom).

    Only the slices shown are cut out and windowed: the display window comes from
    :func:`window_limits` (``limits`` to give it), the colour scale from the map's maximum
    (``vmax``), so the cost does not grow with the volume beyond one pass for the peak.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lo, hi = limits if limits is not None else window_limits(volume)
    if vmax is None:
        vmax = float(heat.max())
    vmax = vmax if vmax > 0 else 1.0
    peak = peak_index(heat)
    views_img = radiological_views(volume, affine_ras, peak)
    views_heat = radiological_views(heat, affine_ras, peak)
    canon_heat, zooms = _canonical(heat, affine_ras)
    canon_img, _ = _canonical(volume, affine_ras)
    active = np.nonzero(canon_heat.max(axis=(0, 1)) > 0)[0]  # axial slices the map touches
    lo_s, hi_s = (int(active.min()), int(active.max())) if active.size else (0, heat.shape[2] - 1)
    picks = np.unique(np.linspace(lo_s, hi_s, montage_slices).round().astype(int))
    cols = 6
    rows = 1 + int(np.ceil(len(picks) / cols))
    fig = plt.figure(figsize=(2.2 * cols, 2.4 * rows + 0.6))
    grid = fig.add_gridspec(rows, cols)
    for i, name in enumerate(("axial", "coronal", "sagittal")):
        ax = fig.add_subplot(grid[0, 2 * i : 2 * i + 2])
        img, aspect = views_img[name]
        ax.imshow(blend_rgb(window(img, lo, hi), views_heat[name][0], vmax, alpha), aspect=aspect)
        ax.set_title(f"{name} (peak)", fontsize=9)
        ax.axis("off")
    for j, s in enumerate(picks):
        ax = fig.add_subplot(grid[1 + j // cols, j % cols])
        gray = window(canon_img[::-1, ::-1, s].T, lo, hi)
        rgb = blend_rgb(gray, canon_heat[::-1, ::-1, s].T, vmax, alpha)
        ax.imshow(rgb, aspect=zooms[1] / zooms[0])
        ax.set_title(f"axial {s}", fontsize=8)
        ax.axis("off")
    _colorbar(fig, vmax)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def save_figure_2d(
    image: np.ndarray, heat: np.ndarray, path: Path, *, title: str, alpha: float = 0.5
) -> None:
    """Image and image + heatmap side by side (arrays ``(X, Y)``, shown with rows down)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    gray = window(image)
    vmax = float(heat.max()) if heat.max() > 0 else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    axes[0].imshow(gray.T, cmap="gray")
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(blend_rgb(gray.T, heat.T, vmax, alpha))
    axes[1].set_title("heatmap", fontsize=9)
    for ax in axes:
        ax.axis("off")
    _colorbar(fig, vmax)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


@register_format("png", order=60, description="PNG figures: tri-planar views and axial montage")
def write_png(out: CaseOutput) -> list[Path]:
    """One ``<base>.png`` per map: the heatmap over the scan, titled with method, layer, grid."""
    paths = []
    alpha = float(out.options.get("alpha", 0.4))
    grids = "/".join("x".join(map(str, s)) for s in out.explanation.cam.feature_shapes.values())
    for k, label in enumerate(out.labels):
        title = f"{out.method} · {label} · layer {out.layer_text} · grid {grids}"
        h, vmax = out.heat[k], out.value_range(k)[1]

        def draw(path: Path, h=h, title=title, vmax=vmax) -> None:
            if h.ndim == 3:
                save_figure_3d(out.image, h, out.scan.affine_ras, path, title=title, alpha=alpha,
                               vmax=vmax, limits=out.window_limits())  # fmt: skip
            else:
                save_figure_2d(out.image, h, path, title=title, alpha=max(alpha, 0.5))

        paths.append(out.folder.write_file(f"{out.base(k)}.png", draw))
    return paths
