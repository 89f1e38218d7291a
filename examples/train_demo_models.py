"""Train the demo classifier and segmenter on synthetic volumes and save their weights.

    python examples/train_demo_models.py        # ~3-4 minutes on 2 CPU cores

Writes ``medcam/data/weights/demo_classifier.pt`` and ``demo_segmenter.pt`` (the demo and the
example bundles use them) and prints held-out accuracy / Dice. Seeded: reruns give the same
weights on the same torch build.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from medcam.data.demo import WEIGHTS, demo_classifier, demo_segmenter, model_space_batch


def train_classifier(steps: int = 600) -> nn.Module:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = demo_classifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        x, y, _ = model_space_batch(12, rng)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"  classifier step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    x, y, _ = model_space_batch(96, np.random.default_rng(1))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"classifier held-out accuracy: {acc:.1%}")
    return model


def train_segmenter(steps: int = 160) -> nn.Module:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    model = demo_segmenter()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    for step in range(steps):
        x, _, m = model_space_batch(6, rng, lesion_fraction=0.9)
        loss = loss_fn(model(x), m[:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 40 == 0:
            print(f"  segmenter step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    x, _, m = model_space_batch(24, np.random.default_rng(3), lesion_fraction=1.0)
    with torch.no_grad():
        pred = model(x).argmax(1).float()
    dice = (2 * (pred * m).sum() / (pred.sum() + m.sum())).item()
    print(f"segmenter held-out Dice: {dice:.3f}")
    return model


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clf = train_classifier()
    torch.save(clf.state_dict(), WEIGHTS / "demo_classifier.pt")
    seg = train_segmenter()
    torch.save(seg.state_dict(), WEIGHTS / "demo_segmenter.pt")
    print(f"done in {time.perf_counter() - t0:.0f} s; weights in {WEIGHTS}")


if __name__ == "__main__":
    main()
