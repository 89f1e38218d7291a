"""Tasks, architectures and cached training for ``bench_quality.py``.

Every task is a synthetic 2D or 3D scene with a known mask of "where the evidence is"; every
model is a small MONAI or plain PyTorch network trained on one task, seeded, on the CPU, until
it is at least 99 % accurate (segmenters: Dice 0.90) on a validation set or after 3000 steps
(``train``). The weights are cached in ``results/quality_weights/`` (each well under 1 MB, with
a JSON record of the training and the test accuracy or Dice) and retrained only when missing
or with ``--retrain``; ``python quality_zoo.py arch:task ...`` trains some in one process.

Tuning set (used to choose the default layer rule) and held-out set (only evaluated):

- tasks: ``shape`` (a cube among spheres), ``texture`` (a striped sphere among speckled ones),
  ``anatomy`` (a lesion in a CT-like body, the bright spine as distractor), ``demo`` (the data
  of ``medcam demo``'s classifier); held out: ``shell`` (a hollow sphere among solid ones) and
  ``dark`` (a hypodense lesion in an organ, with bright calcifications as distractors). 3D at
  32^3 (demo 48^3), 2D at 64^2; object sizes and positions vary.
- architectures: ``cnn`` (plain stride-2 CNN), ``densenet`` (MONAI DenseNet), ``resnet`` (MONAI
  ResNet), ``unet`` (MONAI UNet segmenter), ``densenet2d``, ``demo`` (the DenseNet that ships
  with ``medcam demo``, its own weights); held out: ``classifier`` (MONAI Classifier: strided
  residual units, flatten + linear head), ``segresnet`` (MONAI SegResNet segmenter) and
  ``resnet2d``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = Path(__file__).parent / "results" / "quality_weights"

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x (n, 1, *S), y (n,), mask (n, *S)


# --------------------------------------------------------------------------------------- tasks
def _coords(size: int, dims: int) -> np.ndarray:
    ax = np.arange(size, dtype=np.float32)
    return np.stack(np.meshgrid(*[ax] * dims, indexing="ij"))  # (dims, *S)


def _place(rng, size: int, dims: int, radii: list[float]) -> list[np.ndarray]:
    """Centres for objects of ``radii``, inside the field of view, not touching each other."""
    while True:
        centres: list[np.ndarray] = []
        for r in radii:
            for _ in range(200):
                c = rng.uniform(r + 1, size - r - 2, dims)
                if all(
                    np.linalg.norm(c - o) > r + ro + 2
                    for o, ro in zip(centres, radii, strict=False)
                ):
                    centres.append(c)
                    break
        if len(centres) == len(radii):
            return centres


def _dist(p: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.sqrt(sum((p[i] - c[i]) ** 2 for i in range(len(c))))


def _sphere(p, c, r):
    return _dist(p, c) <= r


def _cube(p, c, r):
    dims = len(c)
    # same volume (area) as the sphere (disc) of radius r
    half = (r * (4 * np.pi / 3) ** (1 / 3) if dims == 3 else r * np.sqrt(np.pi)) / 2
    return np.all([np.abs(p[i] - c[i]) <= half for i in range(dims)], axis=0)


def _shell(p, c, r):
    d = _dist(p, c)
    return (d <= r) & (d >= r - 1.6)


def _stripes(p, rng, period: int = 4):
    """+-1 stripes along a random axis, ``period`` voxels (half on, half off)."""
    axis = rng.integers(len(p))
    return np.where((p[axis] + rng.integers(period)) % period < period / 2, 1.0, -1.0)


def objects_scene(kind: str, n: int, rng: np.random.Generator, size: int, dims: int) -> Batch:
    """Three objects in noise; class 1 when one of them is the target kind (its mask)."""
    p = _coords(size, dims)
    x = rng.normal(0, 0.25, (n, 1, *[size] * dims)).astype(np.float32)
    y = (rng.random(n) < 0.5).astype(np.int64)
    masks = np.zeros((n, *[size] * dims), bool)
    for i in range(n):
        radii = list(rng.uniform(0.12, 0.18, 3) * size)
        if kind == "shell":  # a hollow sphere of the solid ones' volume is bigger
            radii[0] *= 1.35
        centres = _place(rng, size, dims, radii)
        for j, (c, r) in enumerate(zip(centres, radii, strict=True)):
            target = y[i] == 1 and j == 0
            if kind == "shape" and target:
                obj, value = _cube(p, c, r), 1.0
            elif kind == "texture" and target:
                obj = _sphere(p, c, r)
                value = 1.0 + 0.9 * _stripes(p, rng)[obj]
            elif kind == "shell" and target:
                obj, value = _shell(p, c, r), 1.0
            elif kind == "texture":  # distractors: the same contrast, but incoherent
                obj = _sphere(p, c, r)
                value = 1.0 + 0.9 * rng.choice([-1.0, 1.0], int(obj.sum()))
            else:
                obj, value = _sphere(p, c, r), 1.0
            x[i, 0][obj] += value
            if target:
                masks[i] = obj
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(masks)


def anatomy_scene(kind: str, n: int, rng: np.random.Generator, size: int, dims: int) -> Batch:
    """A CT-like body: soft tissue, a bright spine (or calcifications), an organ; class 1 has a
    lesion: bright (``anatomy``) or darker than the organ around it (``dark``)."""
    p = _coords(size, dims)
    x = np.zeros((n, 1, *[size] * dims), np.float32)
    y = (rng.random(n) < 0.5).astype(np.int64)
    masks = np.zeros((n, *[size] * dims), bool)
    half = size / 2
    for i in range(n):
        cx, cy = half + rng.normal(0, 0.04 * size, 2)
        rx, ry = rng.uniform(0.36, 0.46) * size, rng.uniform(0.26, 0.34) * size
        body = ((p[0] - cx) / rx) ** 2 + ((p[1] - cy) / ry) ** 2 <= 1
        if dims == 3:  # the body covers a random range of slices
            z0, z1 = rng.integers(0, size // 6), size - rng.integers(0, size // 6)
            body &= (p[2] >= z0) & (p[2] < z1)
        vol = np.where(body, 0.4, 0.0)
        spine_c = np.array([cx, cy - 0.6 * ry])
        spine = (((p[0] - spine_c[0]) ** 2 + (p[1] - spine_c[1]) ** 2) <= (0.07 * size) ** 2) & body
        organ_c = np.array([cx - 0.35 * rx, cy + 0.15 * ry, *([half] * (dims - 2))])
        organ_r = np.array([0.45 * rx, 0.55 * ry, *([0.3 * size] * (dims - 2))])
        organ = np.sum([((p[k] - organ_c[k]) / organ_r[k]) ** 2 for k in range(dims)], 0) <= 1
        organ &= body
        if kind == "anatomy":
            vol = np.where(spine, 1.6, vol)
            vol = np.where(organ, 0.55, vol)
        else:  # dark: a bright organ and a few bright calcifications, no spine
            vol = np.where(organ, 0.8, vol)
            for _ in range(3):
                c = np.array(
                    [
                        cx + rng.uniform(-0.7, 0.7) * rx,
                        cy + rng.uniform(-0.7, 0.7) * ry,
                        *rng.uniform(0.2 * size, 0.8 * size, dims - 2),
                    ]
                )
                vol = np.where(_sphere(p, c, 0.04 * size + 0.5) & body, 1.6, vol)
        if y[i]:
            r = rng.uniform(0.07, 0.12) * size
            for _ in range(500):
                if kind == "anatomy":  # anywhere in the body, away from the spine
                    c = np.array(
                        [
                            cx + rng.uniform(-0.65, 0.65) * rx,
                            cy + rng.uniform(-0.3, 0.7) * ry,
                            *rng.uniform(0.25 * size, 0.75 * size, dims - 2),
                        ]
                    )
                    ok = np.linalg.norm(c[:2] - spine_c) > r + 0.1 * size
                else:  # inside the organ
                    c = organ_c + rng.uniform(-0.55, 0.55, dims) * organ_r
                    ok = True
                lesion = _sphere(p, c, r)
                if ok and (lesion <= body).all() and lesion.sum() > 4:
                    break
            value = 1.0 if kind == "anatomy" else 0.25
            vol = np.where(lesion, value + rng.normal(0, 0.05), vol)
            masks[i] = lesion
        x[i, 0] = vol + rng.normal(0, 0.12, vol.shape)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(masks)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    dims: int
    size: int
    held_out: bool
    description: str

    def make(self, n: int, seed: int) -> Batch:
        rng = np.random.default_rng(seed)
        if self.kind == "demo":  # the shipped demo's own data generator (model space)
            from medcam.data.demo import model_space_batch

            x, y, m = model_space_batch(n, rng)
            return x, y, m.bool()
        scene = anatomy_scene if self.kind in ("anatomy", "dark") else objects_scene
        return scene(self.kind, n, rng, self.size, self.dims)


_DESCRIPTIONS = {
    "shape": "a cube among spheres of equal volume and intensity (class 0: three spheres)",
    "texture": "a striped sphere among spheres with the same contrast in random voxels",
    "anatomy": "a lesion in a CT-like body with a brighter spine and an organ",
    "shell": "a hollow sphere among solid spheres",
    "dark": "a lesion darker than the organ it sits in; bright calcifications as distractors",
}


def _tasks() -> dict[str, Task]:
    out = {}
    for kind, held in (
        ("shape", False),
        ("texture", False),
        ("anatomy", False),
        ("shell", True),
        ("dark", True),
    ):
        out[kind] = Task(kind, kind, 3, 32, held, _DESCRIPTIONS[kind] + ", 32^3")
        out[f"{kind}2d"] = Task(f"{kind}2d", kind, 2, 64, held, _DESCRIPTIONS[kind] + ", 64^2")
    return out


TASKS = _tasks()
TASKS["demo"] = Task(
    "demo",
    "demo",
    3,
    48,
    False,
    "the demo's CT-like body (4 mm voxels): a lesion of radius 2-4 voxels away from the bright "
    "spine, 48^3",
)


# ------------------------------------------------------------------------------- architectures
def plain_cnn(dims: int) -> nn.Module:
    """Conv stride 2, then conv blocks with max-pooling: the grid is 1/8 of the input at the end."""
    conv, bn, pool = (
        (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)
        if dims == 3
        else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
    )
    gap = nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1)

    def block(i, o):
        return [conv(i, o, 3, padding=1), bn(o), nn.ReLU()]

    return nn.Sequential(
        conv(1, 8, 3, stride=2, padding=1),
        bn(8),
        nn.ReLU(),
        *block(8, 16),
        pool(2),
        *block(16, 32),
        pool(2),
        *block(32, 32),
        gap,
        nn.Flatten(),
        nn.Linear(32, 2),
    )


def _densenet(dims: int) -> nn.Module:
    from monai.networks.nets import DenseNet

    return DenseNet(dims, 1, 2, init_features=8, growth_rate=8, block_config=(2, 2, 2), bn_size=2)


def _resnet(dims: int) -> nn.Module:
    from monai.networks.nets import ResNet

    widths = [4, 8, 16, 32] if dims == 3 else [8, 16, 32, 64]
    return ResNet(
        "basic",
        [1, 1, 1, 1],
        widths,
        spatial_dims=dims,
        n_input_channels=1,
        num_classes=2,
        conv1_t_size=3,
    )


def _unet(dims: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(dims, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


def _classifier(dims: int) -> nn.Module:
    from monai.networks.nets import Classifier

    size = 32 if dims == 3 else 64
    return Classifier(
        (1, *[size] * dims), 2, channels=(8, 16, 16, 32), strides=(2, 2, 2, 2), num_res_units=1
    )


def _segresnet(dims: int) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(
        dims,
        init_filters=8,
        in_channels=1,
        out_channels=2,
        blocks_down=(1, 1, 1),
        blocks_up=(1, 1),
        num_groups=4,
    )


def _demo_classifier(dims: int) -> nn.Module:
    from medcam.data.demo import demo_classifier

    return demo_classifier()


@dataclass(frozen=True)
class Arch:
    name: str
    factory: Callable[[int], nn.Module]
    dims: int
    segmentation: bool
    held_out: bool
    description: str
    shipped: str | None = None  # weights that ship with medcam (never trained here)

    def build(self) -> nn.Module:
        return self.factory(self.dims)


ARCHS = {
    a.name: a
    for a in [
        Arch("cnn", plain_cnn, 3, False, False, "plain CNN, conv stride 2 + 2 max-pools (1/8)"),
        Arch("densenet", _densenet, 3, False, False, "MONAI DenseNet, 3 blocks (1/16)"),
        Arch("resnet", _resnet, 3, False, False, "MONAI ResNet, 4 basic blocks (1/16)"),
        Arch("unet", _unet, 3, True, False, "MONAI UNet segmenter, 2 strides"),
        Arch("densenet2d", _densenet, 2, False, False, "MONAI DenseNet 2D (1/16)"),
        Arch(
            "classifier",
            _classifier,
            3,
            False,
            True,
            "MONAI Classifier, 4 strided residual units, flatten + linear (1/16)",
        ),
        Arch("segresnet", _segresnet, 3, True, True, "MONAI SegResNet segmenter, 2 strides"),
        Arch("resnet2d", _resnet, 2, False, True, "MONAI ResNet 2D (1/16)"),
        Arch(
            "demo",
            _demo_classifier,
            3,
            False,
            False,
            "`medcam demo`'s classifier: MONAI DenseNet, 2 blocks (1/8), the weights that ship",
            shipped="classifier",
        ),
    ]
}

TUNING = [
    ("cnn", "shape"),
    ("cnn", "texture"),
    ("cnn", "anatomy"),
    ("densenet", "shape"),
    ("densenet", "texture"),
    ("densenet", "anatomy"),
    ("resnet", "texture"),
    ("resnet", "anatomy"),
    ("unet", "shape"),
    ("unet", "anatomy"),
    ("densenet2d", "shape2d"),
    ("densenet2d", "texture2d"),
    ("densenet2d", "anatomy2d"),
    ("demo", "demo"),
]
HELD_OUT = [
    ("classifier", "shell"),
    ("classifier", "dark"),
    ("segresnet", "shell"),
    ("segresnet", "dark"),
    ("resnet2d", "shell2d"),
    ("resnet2d", "dark2d"),
]


# ------------------------------------------------------------------------------------ training
BATCH = 16
MAX_STEPS = 3000
MIN_STEPS = 400
TARGET = {False: 0.99, True: 0.90}  # validation accuracy (classifiers) / Dice (segmenters)


def _train_seed(arch: str, task: str) -> int:
    return sum(ord(ch) for ch in f"{arch}/{task}")


def train(arch: Arch, task: Task, max_steps: int = MAX_STEPS, log=print) -> tuple[nn.Module, dict]:
    """Adam (cosine learning rate from 2e-3), batch 16, fresh synthetic data every step. Every
    100 steps from step 400 the model is validated on 128 fixed inputs (after the batch-norm
    recalibration it gets when saved); training stops once the
    validation accuracy (classifiers) or Dice of the evidence class (segmenters) reaches
    ``TARGET`` (0.99 / 0.90), or after ``max_steps``."""
    seed = _train_seed(arch.name, task.name)
    torch.manual_seed(seed)
    model = arch.build()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_steps, eta_min=1e-5)
    if arch.segmentation:
        from monai.losses import DiceCELoss

        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    t0 = time.perf_counter()
    val = 0.0
    for step in range(max_steps):
        x, y, m = task.make(BATCH, seed=100_000 + BATCH * step + seed)
        out = model(x)
        if arch.segmentation:
            loss = dice_ce(out, m[:, None].float())
        else:
            loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 and step + 1 >= MIN_STEPS:
            probe = copy.deepcopy(model)  # validated as it will be saved
            recalibrate_batchnorm(probe, task, seed)
            probe.eval()
            val = model_quality(probe, arch, task, n=128, seed=800_000)
            log(
                f"    {arch.name}/{task.name} step {step + 1}: "
                f"loss {loss.item():.3f}, val {val:.3f}"
            )
            if val >= TARGET[arch.segmentation]:
                break
    recalibrate_batchnorm(model, task, seed)
    model.eval()
    info = {
        "steps": step + 1,
        "train_seconds": round(time.perf_counter() - t0),
        "validation": round(val, 4),
    }
    return model, info


def recalibrate_batchnorm(model: nn.Module, task: Task, seed: int, batches: int = 12) -> None:
    """Replace batch-norm running statistics by plain averages over fresh batches: the
    exponential averages lag the weights after a short training."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(task.make(8, seed=700_000 + 8 * i + seed)[0])
    for m in norms:
        m.momentum = 0.1


def model_quality(model: nn.Module, arch: Arch, task: Task, n: int = 256, seed: int = 900_000):
    """Accuracy (classifiers) or Dice of the evidence class (segmenters) on ``n`` inputs never
    trained on (the default ``seed`` is the test set; training validates on another)."""
    x, y, m = task.make(n, seed=seed)
    with torch.no_grad():
        out = torch.cat([model(x[i : i + 16]) for i in range(0, n, 16)])
    if arch.segmentation:
        pred = out.argmax(1).bool()
        return float(2 * (pred & m).sum() / (pred.sum() + m.sum()).clamp_min(1))
    return float((out.argmax(1) == y).float().mean())


def load_or_train(
    arch_name: str, task_name: str, *, retrain: bool = False, log=print
) -> tuple[nn.Module, dict]:
    """The trained model (cached weights) and its record (training steps, test quality)."""
    arch, task = ARCHS[arch_name], TASKS[task_name]
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    key = f"{arch_name}-{task_name}"
    path, record_path = WEIGHTS / f"{key}.pt", WEIGHTS / f"{key}.json"
    if arch.shipped:
        from medcam.data.demo import load_demo_weights

        model = load_demo_weights(arch.build(), arch.shipped)
        record = {
            "quality": round(model_quality(model, arch, task), 4),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "shipped": f"medcam/data/weights/demo_{arch.shipped}.pt",
        }
        return model, record
    if path.exists() and record_path.exists() and not retrain:
        model = arch.build()
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model, json.loads(record_path.read_text())
    model, info = train(arch, task, log=log)
    info["quality"] = round(model_quality(model, arch, task), 4)
    info["parameters"] = int(sum(p.numel() for p in model.parameters()))
    torch.save(model.state_dict(), path)
    record_path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    log(f"  trained {key}: {info}")
    return model, info


if __name__ == "__main__":  # train (or retrain) models: python quality_zoo.py [--retrain] a:t ...
    import sys

    torch.set_num_threads(1)
    retrain = "--retrain" in sys.argv
    for pair in [a for a in sys.argv[1:] if a != "--retrain"]:
        load_or_train(*pair.split(":"), retrain=retrain)
