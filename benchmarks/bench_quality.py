"""Explanation quality on a synthetic 3D task with known object masks.

    python benchmarks/bench_quality.py            # ~6-10 min on 2 CPU cores (trains once, cached)

Task: 64^3 noisy volumes with three objects of equal volume and intensity; class 1 when one of
them is a cube, class 0 when all are spheres. The cube's mask is the ground truth of "where the
evidence is". A small 3D CNN is trained (seeded) to >= 95 % accuracy and its weights cached in
``results/quality_model.pt``. For every method (and two-layer fusions), on held-out class-1
volumes, the script reports the pointing game (strict and +-1 voxel), the energy pointing
game, the IoU of the top voxels, deletion / insertion AUC (heat order vs random order) and the
model-randomisation sanity check (Spearman between maps of the trained and a re-initialised
model), plus a random map and the input intensity as baselines. Results go to
``results/quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import medcam
from medcam import evaluate as ev

RESULTS = Path(__file__).parent / "results"
SIZE = 64
RADIUS = 6.0
SIDE = RADIUS * (4 * np.pi / 3) ** (1 / 3)  # cube of the sphere's volume


def make_volumes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 1, 64, 64, 64) volumes, labels, cube masks (all-false for class 0)."""
    rng = np.random.default_rng(seed)
    ax = np.arange(SIZE, dtype=np.float32)
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij")
    vols = rng.normal(0, 0.25, (n, 1, SIZE, SIZE, SIZE)).astype(np.float32)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    masks = np.zeros((n, SIZE, SIZE, SIZE), bool)
    for i in range(n):
        centres: list[np.ndarray] = []
        while len(centres) < 3:
            c = rng.uniform(10, SIZE - 10, 3)
            if all(np.linalg.norm(c - o) > 4 * RADIUS for o in centres):
                centres.append(c)
        for j, c in enumerate(centres):
            if labels[i] == 1 and j == 0:
                half = SIDE / 2
                obj = (
                    (np.abs(x - c[0]) <= half)
                    & (np.abs(y - c[1]) <= half)
                    & (np.abs(z - c[2]) <= half)
                )
                masks[i] = obj
            else:
                obj = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= RADIUS**2
            vols[i, 0][obj] += 1.0
    return torch.from_numpy(vols), torch.from_numpy(labels), torch.from_numpy(masks)


def make_model() -> nn.Module:
    def block(i, o):
        return [nn.Conv3d(i, o, 3, padding=1), nn.BatchNorm3d(o), nn.ReLU()]

    return nn.Sequential(
        nn.Conv3d(1, 8, 3, stride=2, padding=1), nn.BatchNorm3d(8), nn.ReLU(),  # 32^3
        *block(8, 16), nn.MaxPool3d(2),  # 16^3
        *block(16, 32), nn.MaxPool3d(2),  # 8^3 (layer 9 = the 16^3 ReLU before it)
        *block(32, 32),  # 8^3 (layer 13 = the last ReLU)
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 2),
    )  # fmt: skip


def train(path: Path, steps: int, log) -> nn.Module:
    torch.manual_seed(0)
    model = make_model()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        x, y, _ = make_volumes(8, seed=1000 + step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            log(f"  step {step}: loss {loss.item():.3f}")
    model.eval()
    torch.save(model.state_dict(), path)
    return model


def evaluate_maps(name, heat, x, masks, score_fn, n_curve, steps, rand_spearman=None) -> dict:
    row = {
        "method": name,
        "pointing_game": ev.pointing_game(heat, masks),
        "pointing_game_pm1": ev.pointing_game(heat, masks, tolerance=1),
        "energy_pointing_game": ev.energy_pointing_game(heat, masks),
        "top_iou": ev.top_iou(heat, masks),
    }
    dels, ins = [], []
    for i in range(n_curve):
        dels.append(ev.deletion_auc(score_fn, x[i], heat[i], steps=steps))
        ins.append(ev.insertion_auc(score_fn, x[i], heat[i], steps=steps))
    row["deletion_auc"] = float(np.mean(dels))
    row["insertion_auc"] = float(np.mean(ins))
    row["randomization_spearman"] = rand_spearman
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="training steps (if not cached)")
    parser.add_argument("--n-test", type=int, default=48)
    parser.add_argument("--n-curve", type=int, default=12, help="samples for deletion/insertion")
    parser.add_argument("--curve-steps", type=int, default=16)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = train(RESULTS / "quality_model.pt", args.steps, print)
    xt, yt, _ = make_volumes(200, seed=7)
    with torch.no_grad():
        acc = float(
            (torch.cat([model(xt[i : i + 20]).argmax(1) for i in range(0, 200, 20)]) == yt)
            .float()
            .mean()
        )
    print(f"held-out accuracy {acc:.1%} ({time.perf_counter() - t0:.0f} s)")
    x, y, masks = make_volumes(args.n_test * 2, seed=11)
    x, masks = x[y == 1][: args.n_test], masks[y == 1][: args.n_test]

    def score_fn(batch):
        return model(batch).softmax(1)[:, 1]

    configs = [(m, {"layers": "13", "method": m}) for m in
               ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "cam")]  # fmt: skip
    both = ["9", "13"]  # the 16^3 and the 8^3 layer
    configs += [
        ("gradcam 16^3 layer", {"layers": "9", "method": "gradcam"}),
        ("layercam 16^3 layer", {"layers": "9", "method": "layercam"}),
        ("gradcam fusion mean 16^3+8^3", {"layers": both, "method": "gradcam", "fusion": "mean"}),
        ("gradcam fusion product 16^3+8^3",
         {"layers": both, "method": "gradcam", "fusion": "product"}),
        ("layercam fusion product 16^3+8^3",
         {"layers": both, "method": "layercam", "fusion": "product"}),
    ]  # fmt: skip
    rows = []
    for name, kw in configs:
        heat = torch.cat(
            [
                medcam.explain(model, x[i : i + 8], 1, **kw).heatmap[:, 0]
                for i in range(0, len(x), 8)
            ]
        )
        rs = ev.randomization_spearman(model, x[:8], target=1, **kw)
        rows.append(
            evaluate_maps(
                name, heat, x, masks, score_fn, args.n_curve, args.curve_steps, float(np.mean(rs))
            )
        )
        print(f"{name}: {rows[-1]}", flush=True)
    rng = torch.Generator().manual_seed(0)
    rows.append(
        evaluate_maps(
            "baseline: random map",
            torch.rand(x[:, 0].shape, generator=rng),
            x,
            masks,
            score_fn,
            args.n_curve,
            args.curve_steps,
        )
    )
    rows.append(
        evaluate_maps(
            "baseline: input intensity",
            x[:, 0].clamp_min(0),
            x,
            masks,
            score_fn,
            args.n_curve,
            args.curve_steps,
        )
    )
    rand_del = [
        ev.deletion_auc(score_fn, x[i], x[i, 0], steps=args.curve_steps, order="random")
        for i in range(args.n_curve)
    ]
    rand_ins = [
        ev.insertion_auc(score_fn, x[i], x[i, 0], steps=args.curve_steps, order="random")
        for i in range(args.n_curve)
    ]
    report = {
        "task": f"{SIZE}^3, cube vs spheres (r={RADIUS}), noise 0.25, 3 objects",
        "model_parameters": int(sum(p.numel() for p in model.parameters())),
        "accuracy": acc,
        "n_test_class1": len(x),
        "n_curve": args.n_curve,
        "curve_steps": args.curve_steps,
        "random_order_deletion_auc": float(np.mean(rand_del)),
        "random_order_insertion_auc": float(np.mean(rand_ins)),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0),
        "torch": torch.__version__,
    }
    (RESULTS / "quality.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Explanation quality (synthetic 3D cube-vs-spheres task)",
        "",
        f"{report['task']}; CNN with {report['model_parameters']} parameters, held-out accuracy "
        f"{acc:.1%}; {len(x)} class-1 test volumes (pointing game, energy, IoU), {args.n_curve} "
        f"for deletion/insertion ({args.curve_steps} steps), 8 for the randomisation check. "
        "Random-order "
        f"deletion AUC {report['random_order_deletion_auc']:.3f}, insertion "
        f"{report['random_order_insertion_auc']:.3f}.",
        "",
        "| method | PG strict | PG ±1 | energy PG | top IoU | deletion AUC ↓ | insertion AUC ↑ "
        "| randomisation Spearman ↓ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rs = "" if r["randomization_spearman"] is None else f"{r['randomization_spearman']:.2f}"
        lines.append(
            f"| {r['method']} | {r['pointing_game']:.2f} | {r['pointing_game_pm1']:.2f} | "
            f"{r['energy_pointing_game']:.3f} | {r['top_iou']:.3f} | {r['deletion_auc']:.3f} | "
            f"{r['insertion_auc']:.3f} | {rs} |"
        )
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
