"""Pictures: heatmap blended over the image, 2D overlays, 3D tri-planar views and montages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medcam.writers.registry import CaseOutput, register_format

__all__ = ["blend_rgb", "radiological_views", "save_figure_2d", "save_figure_3d", "write_png"]


def window(image: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map ``image`` to [0, 1]; default window: its 1st to 99th percentile."""
    image = np.asarray(image, dtype=np.float32)
    if lo is None or hi is None:
        lo, hi = (float(v) for v in np.percentile(image, [1, 99]))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def blend_rgb(
    gray01: np.ndarray, heat: np.ndarray, vmax: float, alpha: float = 0.4, cmap: str = "jet"
) -> np.ndarray:
    """RGB uint8 ``(..., 3)``: colormapped heat over a gray image, opacity ``alpha * heat/vmax``.

    Where the heat is zero the image shows unchanged, so the overlay never hides anatomy the
    model ignored.
    """
    import matplotlib

    h = np.clip(np.asarray(heat, np.float32) / (vmax if vmax > 0 else 1.0), 0.0, 1.0)
    color = matplotlib.colormaps[cmap](h)[..., :3]
    a = (alpha * h)[..., None]
    rgb = (1 - a) * gray01[..., None] + a * color
    return np.round(rgb * 255).astype(np.uint8)


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


def save_figure_3d(
    volume: np.ndarray,
    heat: np.ndarray,
    affine_ras: np.ndarray,
    path: Path,
    *,
    title: str,
    alpha: float = 0.4,
    montage_slices: int = 12,
) -> None:
    """Tri-planar views through the heatmap peak (top) and an axial montage (bottom)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    gray = window(volume)
    vmax = float(heat.max()) if heat.max() > 0 else 1.0
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    views_img = radiological_views(gray, affine_ras, peak)
    views_heat = radiological_views(heat, affine_ras, peak)
    canon_heat, zooms = _canonical(heat, affine_ras)
    canon_gray, _ = _canonical(gray, affine_ras)
    active = np.nonzero(canon_heat.reshape(-1, canon_heat.shape[2]).max(axis=0) > 0)[0]
    lo, hi = (int(active.min()), int(active.max())) if active.size else (0, heat.shape[2] - 1)
    picks = np.unique(np.linspace(lo, hi, montage_slices).round().astype(int))
    cols = 6
    rows = 1 + int(np.ceil(len(picks) / cols))
    fig = plt.figure(figsize=(2.2 * cols, 2.4 * rows + 0.6))
    grid = fig.add_gridspec(rows, cols)
    for i, name in enumerate(("axial", "coronal", "sagittal")):
        ax = fig.add_subplot(grid[0, 2 * i : 2 * i + 2])
        img, aspect = views_img[name]
        ax.imshow(blend_rgb(img, views_heat[name][0], vmax, alpha), aspect=aspect)
        ax.set_title(f"{name} (peak)", fontsize=9)
        ax.axis("off")
    for j, s in enumerate(picks):
        ax = fig.add_subplot(grid[1 + j // cols, j % cols])
        rgb = blend_rgb(canon_gray[::-1, ::-1, s].T, canon_heat[::-1, ::-1, s].T, vmax, alpha)
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
        h = out.heat[k]

        def draw(path: Path, h=h, title=title) -> None:
            if h.ndim == 3:
                save_figure_3d(out.image, h, out.scan.affine_ras, path, title=title, alpha=alpha)
            else:
                save_figure_2d(out.image, h, path, title=title, alpha=max(alpha, 0.5))

        paths.append(out.folder.write_file(f"{out.base(k)}.png", draw))
    return paths
