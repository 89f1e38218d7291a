"""Label-free alternatives to the default layer rule, scored offline on the quality benchmark.

    python benchmarks/bench_quality.py --dump-raw /tmp/qdump    # the sweep's maps, ~5 min
    python benchmarks/explore_rules.py /tmp/qdump               # seconds

``bench_quality.py`` compares shape-only rules (which layers, which fusion, which method). This
script tries the other kinds of label-free choice that come up when its default misses, from the
same per-layer maps (32 evidence-present test inputs per model, see ``quality_zoo.py``):

- **finest chains**: the product or mean fusion of one layer per grid from the *finest* grid
  (not 1/4 of the input) to the deepest, with Grad-CAM, HiResCAM or LayerCAM;
- **mixed methods**: the default chain extended to the finest grid, element-wise HiResCAM /
  LayerCAM on grids of at least 1/2 or 1/4 of the input and the default method on coarser ones;
- **gated**: the finest layer's map inside the region where the default map is at least
  ``tau`` of its peak (the deep layers say where to look, the fine layer picks the voxel);
- **ensembles**: the mean or product of the default and finest-chain maps, and a per-input
  **medoid** (of those maps, the one whose peak the others support most);
- **a failure flag**: whether the default map's fused peak value (how much the fused layers
  agree at the spot shown) predicts, per input, that the default missed (AUROC).

Targets as in ``bench_quality.py``: strict pointing game >= 0.9 x the model's best single layer
and >= 0.8. Writes ``results/explore_rules.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import quality_zoo as zoo

from medcam import evaluate as ev
from medcam.engine.auto import _at_least, _chain, auto_choice, candidates
from medcam.engine.postprocess import fuse_maps, upsample

RESULTS = Path(__file__).parent / "results"
Rule = Callable[[dict, str], torch.Tensor]  # (model dump, method) -> maps (N, *S)


def spatial(d: dict) -> tuple[int, ...]:
    return tuple(d["masks"].shape[1:])


def layer_map(d: dict, method: str, name: str) -> torch.Tensor:
    return upsample(d["raw"][method][name][:, None], spatial(d))[:, 0]


def fuse(maps: list[torch.Tensor], how: str) -> torch.Tensor:
    if len(maps) == 1:
        return maps[0]
    return fuse_maps([m[:, None] for m in maps], how)[:, 0]


def pointing(d: dict, heat: torch.Tensor) -> float:
    return ev.pointing_game(heat, d["masks"], spatial_rank=len(spatial(d)))


def stage_layers(d: dict, fraction: Fraction | None) -> list[str]:
    """One layer per grid, from the deepest layer whose grid is at least ``fraction`` of the
    input (``None``: the finest grid) to the deepest layer, as ``auto_choice`` chains them."""
    cands = candidates(d["infos"], d["out_shape"])
    if fraction is None:
        finest = max(cands, key=lambda i: np.prod(i.feature_shape)).feature_shape
        fine = next(i for i in reversed(cands) if i.feature_shape == finest)
    else:
        fine = next(i for i in reversed(cands) if _at_least(i.feature_shape, spatial(d), fraction))
    if fine is cands[-1]:
        return [fine.name]
    return [i.name for i in _chain(cands, fine, lambda i: i)]


def default(d: dict, method: str) -> torch.Tensor:
    choice = auto_choice(d["infos"], spatial(d), d["out_shape"])
    return fuse([layer_map(d, method, n) for n in choice.layers], choice.fusion or "product")


def chain(fraction: Fraction | None, how: str, method: str | None = None) -> Rule:
    def rule(d, m):
        return fuse([layer_map(d, method or m, n) for n in stage_layers(d, fraction)], how)

    return rule


def mixed(fine_method: str, at_least: Fraction) -> Rule:
    def rule(d, m):
        maps = []
        for n in stage_layers(d, None):
            grid = d["raw"][m][n].shape[1:]
            use = fine_method if _at_least(grid, spatial(d), at_least) else m
            maps.append(layer_map(d, use, n))
        return fuse(maps, "product")

    return rule


def gated(tau: float) -> Rule:
    def rule(d, m):
        region = default(d, m)
        peak = region.flatten(1).amax(1).view(-1, *[1] * (region.ndim - 1))
        fine = layer_map(d, m, stage_layers(d, None)[0]).clamp_min(0)
        return fine * (region >= tau * peak) + 1e-6 * region  # ties broken by the default

    return rule


def ensemble(how: str) -> Rule:
    def rule(d, m):
        return fuse([default(d, m), chain(None, "product", "layercam")(d, m)], how)

    return rule


def medoid(d: dict, m: str) -> torch.Tensor:
    maps = [default(d, m), chain(None, "product", "layercam")(d, m), chain(Fraction(1, 2),
            "product", "hirescam")(d, m)]  # fmt: skip
    maps = [x / x.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (x.ndim - 1)) for x in maps]
    out = []
    for i in range(len(maps[0])):
        support = [sum(b[i].flatten()[a[i].flatten().argmax()] for b in maps) for a in maps]
        out.append(maps[int(np.argmax(support))][i])
    return torch.stack(out)


def rules() -> dict[str, Rule]:
    out: dict[str, Rule] = {"default (layers=auto, method=auto)": default}
    for method in ("gradcam", "hirescam", "layercam"):
        for how in ("product", "mean"):
            out[f"finest chain, {how}, {method}"] = chain(None, how, method)
    for method in ("hirescam", "layercam"):
        for f in (Fraction(1, 2), Fraction(1, 4)):
            name = f"finest chain, {method} on grids >= {f}, default method coarser"
            out[name] = mixed(method, f)
    for tau in (0.5, 0.7, 0.9):
        out[f"finest layer inside default >= {tau} x peak"] = gated(tau)
    for how in ("mean", "product"):
        out[f"{how} of default and finest LayerCAM chain"] = ensemble(how)
    out["per-input medoid of default, finest LayerCAM chain, 1/2 HiResCAM chain"] = medoid
    return out


def auroc(score: np.ndarray, hit: np.ndarray) -> float:
    pos, neg = score[hit], score[~hit]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def flag(models: dict[str, dict]) -> list[str]:
    """Per-input AUROC of the default map's fused peak value for 'the default hit'."""
    lines, scores, hits = [], [], []
    for key, d in models.items():
        choice = auto_choice(d["infos"], spatial(d), d["out_shape"])
        if len(choice.layers) == 1:
            continue
        heat = default(d, d["method"])
        peak = heat.flatten(1).amax(1).numpy()
        one = [{**d, "masks": d["masks"][i : i + 1]} for i in range(len(heat))]
        hit = np.array([pointing(one[i], heat[i : i + 1]) == 1.0 for i in range(len(heat))])
        scores.append(peak)
        hits.append(hit)
        lines.append(f"| {key} | {hit.mean():.2f} | {peak.mean():.2f} | {auroc(peak, hit):.2f} |")
    pooled = auroc(np.concatenate(scores), np.concatenate(hits))
    return [
        f"Pooled over every input of the fused models: AUROC {pooled:.2f}. `nan`: every test "
        "input of that model is a hit (or every one a miss), so there is nothing to separate.",
        "",
        "| model | PG default | mean fused peak | AUROC (per input) |",
        "| --- | ---: | ---: | ---: |",
        *lines,
    ]


def per_model_table(order: list[str], best: dict, per_model: dict) -> list[str]:
    """Strict PG per model of the default and of every rule meeting the targets on as many
    tuning models as the default, with the oracle best single layer."""
    name = "default (layers=auto, method=auto)"

    def met(pg, keys):
        return sum(pg[k] >= 0.9 * best[k] - 1e-9 and pg[k] >= 0.8 for k in keys)

    tuning = [k for k in order if k in order[: len(zoo.TUNING)]]
    ties = [r for r, pg in per_model.items() if r != name
            and met(pg, tuning) >= met(per_model[name], tuning)]  # fmt: skip
    cols = [name, *ties]
    lines = [
        "| model | best single layer | " + " | ".join(cols) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for k in order:
        cells = " | ".join(f"{per_model[c][k]:.2f}" for c in cols)
        lines.append(f"| {k} | {best[k]:.2f} | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", help="the folder bench_quality.py --dump-raw wrote")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    order = [f"{a}-{t}" for a, t in zoo.TUNING + zoo.HELD_OUT]
    models = {k: torch.load(Path(args.dump) / f"{k}.pt", weights_only=False) for k in order}
    best = {
        k: max(pointing(d, layer_map(d, m, n)) for m in d["raw"] for n in d["raw"][m])
        for k, d in models.items()
    }
    rows, per_model = [], {}
    for name, rule in rules().items():
        pg = {k: pointing(d, rule(d, d["method"])) for k, d in models.items()}
        per_model[name] = pg
        cells = []
        for held in (False, True):
            keys = [k for k in order if models[k]["held_out"] == held]
            ok = sum(pg[k] >= 0.9 * best[k] - 1e-9 and pg[k] >= 0.8 for k in keys)
            cells += [f"{ok} / {len(keys)}", f"{np.mean([pg[k] for k in keys]):.2f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    text = [
        "# Label-free alternatives to the default rule",
        "",
        "Written by `benchmarks/explore_rules.py` from the maps of `bench_quality.py "
        "--dump-raw` (32 test inputs per model). Targets: strict pointing game >= 0.9 x the "
        "model's best single layer and >= 0.8. Tuning set: 14 models; held out: 6.",
        "",
        "| rule | tuning: targets met | tuning: mean PG | held out: targets met | "
        "held out: mean PG |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "## Per model: the default and the rules that tie with it on targets met",
        "",
        *per_model_table(order, best, per_model),
        "",
        "## Does the fused peak flag a miss?",
        "",
        *flag(models),
        "",
    ]
    (RESULTS / "explore_rules.md").write_text("\n".join(text))
    print("\n".join(text[-2 * len(models) - 14 :]))


if __name__ == "__main__":
    main()
