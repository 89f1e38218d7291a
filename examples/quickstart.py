"""Quick start: train a tiny 3D CNN on synthetic volumes, then see where it looked.

Runs offline on a CPU in well under a minute::

    python examples/quickstart.py --out quickstart-out

A class-1 volume holds a bright sphere at a random place in noise; class 0 holds none. After a
few seconds of training the network finds the spheres, and Grad-CAM (plus a two-layer fusion)
should peak on the sphere. The script prints the chosen layer, its feature-grid shape, the
distance from the heatmap peak to the sphere centre, and writes a tri-planar figure.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

import medcam

SIZE = 32


def make_batch(
    n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 1, 32, 32, 32) volumes, labels, sphere centres (voxels; -1 where no sphere)."""
    x = torch.randn(n, 1, SIZE, SIZE, SIZE, generator=generator) * 0.5
    labels = torch.randint(0, 2, (n,), generator=generator)
    centres = torch.full((n, 3), -1.0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(SIZE)] * 3, indexing="ij")).float()
    for i in range(n):
        if labels[i] == 1:
            c = torch.randint(6, SIZE - 6, (3,), generator=generator).float()
            centres[i] = c
            dist = (grid - c.view(3, 1, 1, 1)).norm(dim=0)
            x[i, 0] += 2.0 * (dist <= 4.5).float()
    return x, labels, centres


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
        nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 2),
    )  # fmt: skip


def train(model: nn.Module, steps: int = 100) -> float:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x, y, _ = make_batch(16, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, _ = make_batch(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def save_figure(volume, heatmap, centre, title: str, label: str, path: Path) -> None:
    c = [int(v) for v in centre]
    views = [
        ("axial", volume[c[0]], heatmap[c[0]]),
        ("coronal", volume[:, c[1]], heatmap[:, c[1]]),
        ("sagittal", volume[:, :, c[2]], heatmap[:, :, c[2]]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, img, hm) in zip(axes, views, strict=True):
        ax.imshow(img, cmap="gray")
        im = ax.imshow(hm, cmap="jet", alpha=0.45, vmin=0, vmax=float(heatmap.max()) or 1.0)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("quickstart-out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = make_model()
    accuracy = train(model)
    print(
        f"trained a {sum(p.numel() for p in model.parameters())}-parameter 3D CNN in "
        f"{time.perf_counter() - t0:.1f} s; held-out accuracy {accuracy:.0%}"
    )

    x, labels, centres = make_batch(8, torch.Generator().manual_seed(2))
    positives = labels == 1
    x, centres = x[positives], centres[positives]
    print(
        "layers with spatial output:",
        ", ".join(
            f"{i.name} {i.feature_shape}"
            for i in medcam.list_layers(model, x[:1])
            if i.is_candidate
        ),
    )

    for label, kwargs in [
        ("Grad-CAM, auto layer", {}),
        ("Grad-CAM, fusion of two layers", {"layers": ["4", "7"], "fusion": "product"}),
    ]:
        result = medcam.explain(model, x, 1, **kwargs)
        heat = result.heatmap[:, 0]
        peaks = [torch.unravel_index(h.argmax(), h.shape) for h in heat]
        errors = [
            math.dist([float(p) for p in peak], c.tolist())
            for peak, c in zip(peaks, centres, strict=True)
        ]
        shapes = ", ".join(f"{k} {v}" for k, v in result.feature_shapes.items())
        print(
            f"{label}: layers {shapes}; peak-to-sphere distance (voxels) "
            f"median {sorted(errors)[len(errors) // 2]:.1f}, max {max(errors):.1f}"
        )
    path = args.out / "quickstart_gradcam.png"
    save_figure(
        x[0, 0].numpy(),
        heat[0].numpy(),
        centres[0],
        f"class 1, {result.method}, layers {' + '.join(result.layers)}",
        f"{result.fusion} of peak-scaled maps",
        path,
    )
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
