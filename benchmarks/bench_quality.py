"""Explanation quality over several architectures and tasks; the evidence for the default layer.

    python benchmarks/bench_quality.py               # ~5 min on 2 CPU cores (weights cached)
    python benchmarks/bench_quality.py --quick       # 3 models, fewer samples: a smoke run
    python benchmarks/bench_quality.py --retrain     # retrain every model (~1 h on 2 cores)

Models and tasks are in ``quality_zoo.py``: small MONAI / plain CNNs (2D and 3D classifiers
and segmenters) trained seeded on synthetic tasks whose evidence has a known mask. The models
are split into a **tuning** set, on which the candidate layer rules are compared and the
default is chosen, and a **held-out** set (other architectures and other tasks), evaluated only.

For every model, on held-out evidence-present inputs:

1. **Layer sweep**: every candidate layer, every gradient method: pointing game (strict / +-1
   voxel), energy pointing game, top-voxel IoU. The best single layer is the (layer, method)
   with the highest strict pointing game over the sweep methods (an oracle: chosen on the
   test set).
2. **Rule candidates**: "the deepest layer" and "fuse the deepest layer with the deepest layer
   whose grid is at least f of the input per axis" for several f, fusions and methods, computed
   from the sweep's maps with :func:`medcam.engine.auto.auto_choice`.
3. **Full rows** for every method at the default layers (``layers="auto"``, end to end through
   :class:`medcam.Explainer`), the default, the old default (``layers="last"``), the best single
   layer, and the random and input-intensity baselines: the four localisation metrics plus
   deletion / insertion AUC and the model-randomisation check (Spearman between the maps of the
   trained and of a re-initialised model; low is good).

Classifiers explain the evidence class (1); segmenters ``SegmentationTarget(1)`` over their
predicted region. Results go to ``results/quality.json`` and ``results/quality.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import quality_zoo as zoo

import medcam
from medcam import evaluate as ev
from medcam.engine.auto import auto_choice
from medcam.engine.layers import list_layers
from medcam.engine.postprocess import fuse_maps, upsample

RESULTS = Path(__file__).parent / "results"
SWEEP_METHODS = ("gradcam", "hirescam", "layercam")
ALL_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "cam")


def _rules() -> dict[str, dict]:
    """Rule candidates: ``auto_choice`` settings by name (``last``: the deepest layer alone)."""
    out: dict[str, dict] = {"last": {"min_fraction": 0}}
    for fine in ("f=1/2", "f=1/4", "f=1/8", "stage-1"):
        how = {"stages_back": 1} if fine == "stage-1" else {"min_fraction": Fraction(fine[2:])}
        out[f"{fine} single"] = {**how, "fusion": None}
        for fusion in ("mean", "product"):
            out[f"{fine} pair {fusion}"] = {**how, "fusion": fusion, "chain": False}
            if fine == "stage-1":
                continue
            for blocks in ("", " blocks"):
                chain = {**how, "fusion": fusion, "chain": True, "block_outputs": bool(blocks)}
                out[f"{fine} chain {fusion}{blocks}"] = chain
                for low in ("1/4", "1/8"):
                    if Fraction(low) < Fraction(fine[2:]):
                        out[f"{fine} chain {fusion}{blocks} to {low}"] = {
                            **chain,
                            "coarsest": Fraction(low),
                        }
    return out


RULES = _rules()
DEFAULT_RULE = "f=1/4 chain product | auto"  # what layers="auto", method="auto" do
BATCH = 8


# ------------------------------------------------------------------------------------- helpers
def target_for(arch: zoo.Arch):
    return medcam.SegmentationTarget(1) if arch.segmentation else 1


_DILATED: list = [None, None]  # (masks, masks dilated by one voxel)


def loc_metrics(heat: torch.Tensor, masks: torch.Tensor, rank: int) -> dict:
    # PG +-1 = strict PG against the mask dilated by one voxel; dilate each mask set once
    if _DILATED[0] is not masks:
        pool = torch.nn.functional.max_pool3d if rank == 3 else torch.nn.functional.max_pool2d
        _DILATED[:] = [masks, pool(masks[:, None].float(), 3, stride=1, padding=1)[:, 0].bool()]
    return {
        "pg": ev.pointing_game(heat, masks, spatial_rank=rank),
        "pg1": ev.pointing_game(heat, _DILATED[1], spatial_rank=rank),
        "energy": ev.energy_pointing_game(heat, masks, spatial_rank=rank),
        "iou": ev.top_iou(heat, masks, spatial_rank=rank),
    }


def sweep(model, arch, x, names) -> dict[str, dict[str, torch.Tensor]]:
    """Raw maps ``(N, *S_layer)`` of every layer for every sweep method (feature resolution)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for method in SWEEP_METHODS:
        explainer = medcam.Explainer(model, names, method)
        parts = [
            explainer(x[i : i + BATCH], target_for(arch), upsample_to_input=False).raw
            for i in range(0, len(x), BATCH)
        ]
        out[method] = {n: torch.cat([p[n][:, 0] for p in parts]) for n in names}
    return out


def combine(raw: dict[str, torch.Tensor], layers: list[str], fusion, spatial) -> torch.Tensor:
    """``(N, *spatial)`` map of ``layers`` (fused when several) from sweep maps."""
    maps = [upsample(raw[name][:, None], spatial) for name in layers]
    if len(maps) == 1:
        return maps[0][:, 0]
    return fuse_maps(maps, fusion)[:, 0]


def score_fns(model, arch, x):
    """Per-sample ``batch -> score`` for deletion / insertion curves."""
    if not arch.segmentation:
        return [lambda b: model(b).softmax(1)[:, 1] for _ in range(len(x))]
    with torch.no_grad():
        regions = torch.cat(
            [model(x[i : i + BATCH]).argmax(1) == 1 for i in range(0, len(x), BATCH)]
        )

    def make(region):
        def fn(b):
            p = model(b).softmax(1)[:, 1]
            return (p * region).flatten(1).sum(1) / region.sum().clamp_min(1)

        return fn

    return [make(r.float()) for r in regions]


def randomisation(model, arch, x, kw) -> float:
    """Mean Spearman between the maps of the trained and of a re-initialised model.

    Segmenters explain the class-1 score summed over the whole volume for both models: a
    region target (the trained model's prediction) would confine the gradient, hence any
    element-wise map, to that region for the re-initialised model too, and the check would
    measure the target instead of the model."""
    if not arch.segmentation:
        values = ev.randomization_spearman(model, x, target=1, **kw)
        return _nanmean(values)
    target = medcam.SegmentationTarget(1, mask=torch.ones(x.shape[:1] + x.shape[2:]))
    trained = medcam.explain(model, x, target, **kw).heatmap[:, 0]
    rand = medcam.explain(ev.randomized_copy(model), x, target, **kw).heatmap[:, 0]
    return _nanmean([ev.spearman(a, b) for a, b in zip(trained, rand, strict=True)])


def _nanmean(values) -> float | None:
    """Mean over the defined values (Spearman is undefined when a map is constant, e.g. all
    zero for a re-initialised model); ``None`` when none is defined."""
    v = np.asarray(values, float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else None


def full_row(name, heat, x, masks, rank, fns, args, *, kw=None, model=None, arch=None) -> dict:
    row = {"config": name, **loc_metrics(heat, masks, rank)}
    n = min(args.n_curve, len(x))
    kw_curve = {"steps": args.curve_steps, "batch_size": args.curve_steps + 1}
    row["deletion"] = float(
        np.mean([ev.deletion_auc(fns[i], x[i], heat[i], **kw_curve) for i in range(n)])
    )
    row["insertion"] = float(
        np.mean([ev.insertion_auc(fns[i], x[i], heat[i], **kw_curve) for i in range(n)])
    )
    row["randomisation"] = (
        randomisation(model, arch, x[: args.n_rand], kw) if kw is not None else None
    )
    return row


def explain_all(model, arch, x, **kw) -> tuple[torch.Tensor, medcam.CAMResult]:
    explainer = medcam.Explainer(
        model, kw.get("layers", "auto"), kw.get("method", "auto"), fusion=kw.get("fusion")
    )
    results = [explainer(x[i : i + BATCH], target_for(arch)) for i in range(0, len(x), BATCH)]
    return torch.cat([r.heatmap[:, 0] for r in results]), results[0]


# ---------------------------------------------------------------------------------- one model
def evaluate_model(arch_name: str, task_name: str, args, log) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    arch, task = zoo.ARCHS[arch_name], zoo.TASKS[task_name]
    model, record = zoo.load_or_train(arch_name, task_name, retrain=args.retrain, log=log)
    rank = task.dims
    xs, ys, ms = task.make(4 * args.n_test, seed=500_000)
    x, masks = xs[ys == 1][: args.n_test], ms[ys == 1][: args.n_test]
    spatial = tuple(x.shape[2:])
    infos = list_layers(model, x[:1])
    with torch.no_grad():
        out_shape = tuple(model(x[:1]).shape)
    default = auto_choice(infos, spatial, out_shape)
    method = medcam.explain(model, x[:1], target_for(arch)).method  # what method="auto" uses
    names = [i.name for i in infos if i.is_candidate and i.output_shape != out_shape]
    grids = {i.name: list(i.feature_shape) for i in infos if i.name in names}

    # 1. layer sweep
    raw = sweep(model, arch, x, names)
    layer_rows = {
        m: {n: loc_metrics(combine(raw[m], [n], None, spatial), masks, rank) for n in names}
        for m in SWEEP_METHODS
    }
    # 2. rule candidates
    rules = {}
    for m in SWEEP_METHODS:
        for key, how in RULES.items():
            ch = auto_choice(infos, spatial, out_shape, **how)
            heat = combine(raw[m], ch.layers, ch.fusion, spatial)
            rules[f"{key} | {m}"] = {"layers": ch.layers, **loc_metrics(heat, masks, rank)}
    for key in RULES:
        rules[f"{key} | auto"] = rules[f"{key} | {method}"]
    # 3. full rows
    best_method, best_layer = max(
        ((m, n) for m in SWEEP_METHODS for n in names),
        key=lambda mn: (layer_rows[mn[0]][mn[1]]["pg"], layer_rows[mn[0]][mn[1]]["energy"]),
    )
    if args.dump_raw:  # for exploring further rules offline
        Path(args.dump_raw).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "raw": raw,
                "masks": masks,
                "infos": infos,
                "out_shape": out_shape,
                "method": method,
                "held_out": arch.held_out or task.held_out,
            },
            Path(args.dump_raw) / f"{arch_name}-{task_name}.pt",
        )
    fns = score_fns(model, arch, x)
    rows = []
    chosen_by = None
    for m in ALL_METHODS:
        kw = {"layers": "auto", "method": m}
        try:
            heat, _ = explain_all(model, arch, x, **kw)
        except medcam.MedcamError as err:
            rows.append({"config": f"{m} @ default layers", "error": str(err).split(";")[0]})
            continue
        name = f"{m} @ default layers" + (" = **default** (auto)" if m == method else "")
        rows.append(full_row(name, heat, x, masks, rank, fns, args, kw=kw, model=model, arch=arch))
        if m == method:
            auto = explain_all(model, arch, x[:BATCH])[1]  # layers="auto", method="auto"
            assert auto.layers == default.layers and auto.method == method
            chosen_by = auto.metadata()["layers_chosen_by"]
    # what a user with a few labelled cases gets: medcam.calibrate_layers on other inputs
    cx, cy, cm = task.make(4 * args.n_calib, seed=600_000)
    cx, cm = cx[cy == 1][: args.n_calib], cm[cy == 1][: args.n_calib]
    t_cal = time.perf_counter()
    cal = medcam.calibrate_layers(model, cx, cm, target_for(arch))
    calibration = {**cal.chosen.settings(), "how": cal.chosen.how, "chosen_by": cal.describe(),
                   "n_cases": cal.n_cases, "candidates": len(cal.table),
                   "seconds": round(time.perf_counter() - t_cal, 2), "fewer_cases": {}}  # fmt: skip
    for n in (4, 8):  # the same with the first n of those cases: test PG only
        if n < len(cx):
            few = medcam.calibrate_layers(model, cx[:n], cm[:n], target_for(arch))
            heat, _ = explain_all(model, arch, x, **few.chosen.settings())
            calibration["fewer_cases"][str(n)] = ev.pointing_game(heat, masks, spatial_rank=rank)
    for name, kw in (
        ("last layer, gradcam (old default)", {"layers": "last", "method": "gradcam"}),
        (
            f"best single layer ({best_layer}, {best_method})",
            {"layers": best_layer, "method": best_method},
        ),
        (f"calibrated on {cal.n_cases} labelled cases", cal.chosen.settings()),
    ):
        heat, _ = explain_all(model, arch, x, **kw)
        rows.append(full_row(name, heat, x, masks, rank, fns, args, kw=kw, model=model, arch=arch))
    gen = torch.Generator().manual_seed(0)
    rows.append(
        full_row(
            "baseline: random map",
            torch.rand(x[:, 0].shape, generator=gen),
            x,
            masks,
            rank,
            fns,
            args,
        )
    )
    rows.append(
        full_row("baseline: input intensity", x[:, 0].clamp_min(0), x, masks, rank, fns, args)
    )
    n = min(args.n_curve, len(x))
    kw_curve = {"steps": args.curve_steps, "batch_size": args.curve_steps + 1, "order": "random"}
    rand_order = {
        "deletion": float(
            np.mean([ev.deletion_auc(fns[i], x[i], x[i, 0], **kw_curve) for i in range(n)])
        ),
        "insertion": float(
            np.mean([ev.insertion_auc(fns[i], x[i], x[i, 0], **kw_curve) for i in range(n)])
        ),
    }
    result = {
        "arch": arch_name,
        "task": task_name,
        "held_out": arch.held_out or task.held_out,
        "arch_description": arch.description,
        "task_description": task.description,
        "segmentation": arch.segmentation,
        "record": record,
        "input": list(spatial),
        "n_test": len(x),
        "default_layers": default.layers,
        "default_fusion": default.fusion,
        "default_method": method,
        "layers_chosen_by": chosen_by,
        "grids": grids,
        "best_single_layer": best_layer,
        "best_single_method": best_method,
        "calibration": calibration,
        "layer_sweep": layer_rows,
        "rules": rules,
        "rows": rows,
        "random_order": rand_order,
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
    }
    d = next(r for r in rows if "default**" in r["config"])
    b = next(r for r in rows if r["config"].startswith("best single"))
    o = next(r for r in rows if r["config"].startswith("last layer"))
    log(
        f"{arch_name}/{task_name}: quality {record.get('quality', float('nan')):.2f}; PG default "
        f"{d['pg']:.2f}, best single {b['pg']:.2f} ({best_layer}, {best_method}), old default "
        f"{o['pg']:.2f}; "
        f"{result['seconds']:.0f} s, CPU {result['cpu_seconds']:.0f} s"
    )
    return result


# ----------------------------------------------------------------------------- rule selection
def rule_table(models: list[dict]) -> list[dict]:
    """Every rule candidate over ``models``: mean / min strict PG, share of models meeting the
    targets (>= 0.9 x the best single layer of any sweep method and >= 0.8), mean energy PG."""
    keys = list(models[0]["rules"])
    bests = [
        max(v["pg"] for sweep in m["layer_sweep"].values() for v in sweep.values()) for m in models
    ]
    out = []
    for key in keys:
        pgs, ok, energy = [], 0, []
        for m, best in zip(models, bests, strict=True):
            r = m["rules"][key]
            pgs.append(r["pg"])
            energy.append(r["energy"])
            ok += r["pg"] >= 0.9 * best - 1e-9 and r["pg"] >= 0.8
        out.append(
            {
                "rule": key,
                "mean_pg": float(np.mean(pgs)),
                "min_pg": float(np.min(pgs)),
                "meets_targets": ok,
                "n": len(models),
                "mean_energy": float(np.mean(energy)),
            }
        )
    out.sort(key=lambda r: (-r["meets_targets"], -r["mean_pg"], -r["min_pg"]))
    return out


# ------------------------------------------------------------------------------------- report
def _round(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x) for x in v]
    return v


def _compact_json(report: dict) -> str:
    """One line per model and per top-level entry (the layer sweeps make it long otherwise)."""
    parts = []
    for key, value in report.items():
        if key == "models":
            rows = ",\n  ".join(json.dumps(_round(m)) for m in value)
            parts.append(f'"models": [\n  {rows}\n ]')
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(_round(value))}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _f(v, digits=2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def write_report(report: dict) -> None:
    (RESULTS / "quality.json").write_text(_compact_json(report))
    lines = [
        "# Explanation quality: several architectures and tasks",
        "",
        f"Written by `benchmarks/bench_quality.py` ({report['seconds']} s wall on a machine "
        f"shared with other jobs; {report['cpu_seconds']} s of CPU time: on "
        f"{report['threads']} dedicated cores between {report['cpu_seconds'] / 60 / 2:.0f} "
        f"and {report['cpu_seconds'] / 60:.0f} min; torch {report['torch']}, "
        f"{report['threads']} threads). Models: `benchmarks/quality_zoo.py`; "
        f"{report['n_test']} evidence-present test inputs per model (localisation), "
        f"{report['n_curve']} for deletion / insertion ({report['curve_steps']} steps), "
        f"{report['n_rand']} for the randomisation check. PG = pointing game (strict / ±1 "
        "voxel), energy = energy pointing game, IoU = top-voxel IoU, del ↓ / ins ↑ = "
        "deletion / insertion AUC, rand ↓ = Spearman between maps of the trained and a "
        "re-initialised model.",
        "",
        f'Default (`layers="auto"`, `method="auto"`): {report["default_rule"]}.',
        "",
        *([report["note"], ""] if report.get("note") else []),
        "## Summary: strict pointing game per model",
        "",
        "| set | architecture | task | quality | default | best single layer | old default "
        "(last layer) | intensity | default ≥ 0.9 × best and ≥ 0.8 | energy > intensity "
        f"| calibrated ({report['n_calib']} cases) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for m in report["models"]:
        d = next(r for r in m["rows"] if "default**" in r["config"])
        b = next(r for r in m["rows"] if r["config"].startswith("best single"))
        o = next(r for r in m["rows"] if r["config"].startswith("last layer"))
        i = next(r for r in m["rows"] if r["config"].endswith("intensity"))
        c = next(r for r in m["rows"] if r["config"].startswith("calibrated on"))
        ok = d["pg"] >= 0.9 * b["pg"] - 1e-9 and d["pg"] >= 0.8
        q = m["record"].get("quality")
        qn = ("Dice " if m["segmentation"] else "acc ") + _f(q)
        lines.append(
            f"| {'held out' if m['held_out'] else 'tuning'} | {m['arch']} | {m['task']} | {qn} "
            f"| {d['pg']:.2f} | {b['pg']:.2f} | {o['pg']:.2f} | {i['pg']:.2f} | "
            f"{'yes' if ok else '**no**'} | {'yes' if d['energy'] > i['energy'] else '**no**'} "
            f"| {c['pg']:.2f} |"
        )
    for label, key in (("tuning", "tuning_summary"), ("held-out", "held_out_summary")):
        s = report[key]
        if not s:
            continue
        lines.append("")
        lines.append(
            f"{label.capitalize()} set, {s['n']} models: mean strict PG default {s['default']:.2f}"
            f", best single layer {s['best']:.2f}, old default {s['old']:.2f}, intensity "
            f"{s['intensity']:.2f}; targets met by {s['ok']} of {s['n']}, energy PG above the "
            f"intensity baseline on {s['energy_ok']} of {s['n']}. Mean deletion AUC default "
            f"{s['del_default']:.3f} vs old default {s['del_old']:.3f} (default lower or equal on "
            f"{s['del_ok']} of {s['n']}), insertion {s['ins_default']:.3f} vs "
            f"{s['ins_old']:.3f} (higher or equal on {s['ins_ok']}); randomisation Spearman, mean "
            f"default {_f(s['rand_default'])} vs old {_f(s['rand_old'])}, mean of absolute "
            f"values default {_f(s['rand_abs_default'])} vs old {_f(s['rand_abs_old'])} (best "
            f"single layer {_f(s['rand_abs_best'])}: a layer that localises keeps more of the "
            "input's structure in a re-initialised network than the last layer). "
            f"The best single layer reaches 0.8 on {s['reachable']} of {s['n']} (the absolute "
            f"target is out of reach of any one layer on the others). Calibrated on "
            f"{report['n_calib']} labelled cases (`medcam.calibrate_layers`, other inputs than "
            f"the test): mean strict PG {s['calibrated']:.2f}, targets met by {s['cal_ok']} of "
            f"{s['n']}, not below the default on {s['cal_not_worse']} of {s['n']}, energy PG "
            f"above the intensity baseline on {s['cal_energy_ok']}, deletion "
            f"{s['del_cal']:.3f}, insertion {s['ins_cal']:.3f}, mean |randomisation Spearman| "
            f"{_f(s['rand_abs_cal'])}, {s['cal_seconds'][0]:.1f}–{s['cal_seconds'][1]:.1f} s "
            "per model"
            + "".join(
                f"; with {n} cases mean PG {pg:.2f}, targets met by {ok}"
                for n, (pg, ok) in s["fewer"].items()
            )
            + "."
        )
    lines += [
        "",
        "## Choosing the rule (tuning set only)",
        "",
        "Each candidate: `f=… | method`: the fine layer is the deepest layer whose grid is at "
        "least f of the input per axis (`stage-1`: the deepest layer one resolution stage finer "
        "than the deepest feature layer); `single`: the fine layer alone; `pair`: the fine and "
        "the deepest layer fused (`mean` / `product`); `chain`: the deepest layer of every grid "
        "from the fine to the deepest layer fused; `blocks`: the same with each stage's block "
        "output instead of its deepest layer; `to 1/8`: grids coarser than 1/8 of the input "
        "left out of the chain; `last`: the deepest layer alone; `auto`: Grad-CAM "
        "for classifiers, LayerCAM for segmenters. Targets: strict PG ≥ 0.9 × the model's best "
        "single layer (any sweep method) and ≥ 0.8. Ordered by models meeting the targets, "
        f"then mean and min PG; the default ranks {_rank(report)} of "
        f"{len(report['rule_selection'])}. The top 15, the default and the old default:",
        "",
        "| rule | models meeting targets | mean PG | min PG | mean energy PG |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    table = report["rule_selection"]
    shown = table[:15] + [r for r in table[15:] if r["rule"] in ("last | gradcam", DEFAULT_RULE)]
    for r in shown:
        lines.append(
            f"| {r['rule']} | {r['meets_targets']} / {r['n']} | {r['mean_pg']:.2f} | "
            f"{r['min_pg']:.2f} | {r['mean_energy']:.3f} |"
        )
    lines += [
        "",
        "The same candidates on the held-out set (evaluated, not used to choose):",
        "",
        "| rule | models meeting targets | mean PG | min PG | mean energy PG |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    held = {r["rule"]: r for r in report["rule_check_held_out"]}
    for r in shown:
        h = held.get(r["rule"])
        if h:
            lines.append(
                f"| {h['rule']} | {h['meets_targets']} / {h['n']} | {h['mean_pg']:.2f} "
                f"| {h['min_pg']:.2f} | {h['mean_energy']:.3f} |"
            )
    lines += ["", "## Per model", ""]
    header = (
        "| config | PG | PG ±1 | energy | IoU | del ↓ | ins ↑ | rand ↓ |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for m in report["models"]:
        rec = m["record"]
        lines += [
            f"### {m['arch']} / {m['task']} ({'held out' if m['held_out'] else 'tuning'})",
            "",
            f"{m['arch_description']}; {m['task_description']}. {rec.get('parameters', '?')} "
            f"parameters, {'Dice' if m['segmentation'] else 'accuracy'} "
            f"{_f(rec.get('quality'))}. Default: {', '.join(m['default_layers'])} "
            f"(grids {', '.join('x'.join(map(str, m['grids'][n])) for n in m['default_layers'])}"
            f"{', ' + m['default_fusion'] if m['default_fusion'] else ''}). Random-order "
            f"deletion {m['random_order']['deletion']:.3f}, insertion "
            f"{m['random_order']['insertion']:.3f}. Calibration ({m['calibration']['how']}): "
            f"{m['calibration']['chosen_by']}.",
            "",
            header,
        ]
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {r['config']} | n/a: {r['error']} | | | | | | |")
                continue
            lines.append(
                f"| {r['config']} | {r['pg']:.2f} | {r['pg1']:.2f} | {r['energy']:.3f} | "
                f"{r['iou']:.3f} | {r['deletion']:.3f} | {r['insertion']:.3f} | "
                f"{_f(r['randomisation'])} |"
            )
        lines.append("")
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")


def _rank(report: dict) -> int:
    return 1 + [r["rule"] for r in report["rule_selection"]].index(DEFAULT_RULE)


def _nan(v):
    return np.nan if v is None else v


def summarise(models: list[dict]) -> dict:
    def pick(m, prefix):
        return next(r for r in m["rows"] if r["config"].startswith(prefix) or prefix in r["config"])

    if not models:
        return {}
    d = [pick(m, "default**") for m in models]
    b = [pick(m, "best single") for m in models]
    o = [pick(m, "last layer") for m in models]
    i = [pick(m, "baseline: input intensity") for m in models]
    c = [pick(m, "calibrated on") for m in models]
    return {
        "n": len(models),
        "default": float(np.mean([r["pg"] for r in d])),
        "best": float(np.mean([r["pg"] for r in b])),
        "old": float(np.mean([r["pg"] for r in o])),
        "intensity": float(np.mean([r["pg"] for r in i])),
        "ok": int(
            sum(
                x["pg"] >= 0.9 * y["pg"] - 1e-9 and x["pg"] >= 0.8
                for x, y in zip(d, b, strict=True)
            )
        ),
        "energy_ok": int(sum(x["energy"] > y["energy"] for x, y in zip(d, i, strict=True))),
        "reachable": int(sum(y["pg"] >= 0.8 for y in b)),
        "calibrated": float(np.mean([r["pg"] for r in c])),
        "cal_ok": int(
            sum(
                x["pg"] >= 0.9 * y["pg"] - 1e-9 and x["pg"] >= 0.8
                for x, y in zip(c, b, strict=True)
            )
        ),
        "cal_not_worse": int(sum(x["pg"] >= y["pg"] for x, y in zip(c, d, strict=True))),
        "cal_energy_ok": int(sum(x["energy"] > y["energy"] for x, y in zip(c, i, strict=True))),
        "del_cal": float(np.mean([r["deletion"] for r in c])),
        "ins_cal": float(np.mean([r["insertion"] for r in c])),
        "rand_abs_cal": _nanmean([abs(_nan(r["randomisation"])) for r in c]),
        "rand_abs_best": _nanmean([abs(_nan(r["randomisation"])) for r in b]),
        "cal_seconds": [
            min(m["calibration"]["seconds"] for m in models),
            max(m["calibration"]["seconds"] for m in models),
        ],
        "fewer": {
            n: (
                float(np.mean([m["calibration"]["fewer_cases"][n] for m in models])),
                int(
                    sum(
                        m["calibration"]["fewer_cases"][n] >= 0.9 * y["pg"] - 1e-9
                        and m["calibration"]["fewer_cases"][n] >= 0.8
                        for m, y in zip(models, b, strict=True)
                    )
                ),
            )
            for n in models[0]["calibration"]["fewer_cases"]
        },
        "del_default": float(np.mean([r["deletion"] for r in d])),
        "del_old": float(np.mean([r["deletion"] for r in o])),
        "del_ok": int(sum(x["deletion"] <= y["deletion"] for x, y in zip(d, o, strict=True))),
        "ins_default": float(np.mean([r["insertion"] for r in d])),
        "ins_old": float(np.mean([r["insertion"] for r in o])),
        "ins_ok": int(sum(x["insertion"] >= y["insertion"] for x, y in zip(d, o, strict=True))),
        "rand_default": _nanmean([_nan(r["randomisation"]) for r in d]),
        "rand_old": _nanmean([_nan(r["randomisation"]) for r in o]),
        "rand_abs_default": _nanmean([abs(_nan(r["randomisation"])) for r in d]),
        "rand_abs_old": _nanmean([abs(_nan(r["randomisation"])) for r in o]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="retrain even if cached")
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--n-curve", type=int, default=4, help="samples for deletion/insertion")
    parser.add_argument("--curve-steps", type=int, default=10)
    parser.add_argument("--n-rand", type=int, default=8, help="samples for randomisation")
    parser.add_argument(
        "--n-calib", type=int, default=16, help="labelled cases for medcam.calibrate_layers"
    )
    parser.add_argument("--only", nargs="*", help="arch:task pairs (default: all)")
    parser.add_argument("--dump-raw", help="also save each model's sweep maps in this folder")
    parser.add_argument("--quick", action="store_true", help="3 models, fewer samples")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: keep the other models' results from results/quality.json (same "
        "settings) and rewrite the report over all of them",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite quality.md from quality.json"
    )
    args = parser.parse_args()
    if args.report_only:  # the summaries are recomputed from the stored per-model results
        report = json.loads((RESULTS / "quality.json").read_text())
        tuning = [m for m in report["models"] if not m["held_out"]]
        report["tuning_summary"] = summarise(tuning)
        report["held_out_summary"] = summarise([m for m in report["models"] if m["held_out"]])
        write_report(report)
        return
    if args.quick:
        args.only = args.only or ["cnn:shape", "unet:shape", "resnet2d:dark2d"]
        args.n_test, args.n_curve, args.n_rand, args.n_calib = 8, 2, 2, 4
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    pairs = zoo.TUNING + zoo.HELD_OUT
    if args.only:
        pairs = [tuple(p.split(":")) for p in args.only]
    t0, cpu0 = time.perf_counter(), time.process_time()
    models = [evaluate_model(a, t, args, print) for a, t in pairs]
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    if args.merge:
        old = json.loads((RESULTS / "quality.json").read_text())
        settings = ("n_test", "n_curve", "curve_steps", "n_rand", "n_calib")
        if any(old[k] != getattr(args, k) for k in settings):
            raise SystemExit("--merge: results/quality.json was written with other settings")
        done = {(m["arch"], m["task"]) for m in models}
        kept = [m for m in old["models"] if (m["arch"], m["task"]) not in done]
        order = {p: i for i, p in enumerate(zoo.TUNING + zoo.HELD_OUT)}
        models = sorted(kept + models, key=lambda m: order.get((m["arch"], m["task"]), 99))
        seconds = sum(m["seconds"] for m in models)
        cpu_seconds = sum(m["cpu_seconds"] for m in models)
    tuning = [m for m in models if not m["held_out"]]
    held = [m for m in models if m["held_out"]]
    report = {
        "default_rule": "product fusion of the deepest layer of every resolution stage, from the "
        "deepest feature layer back to the deepest layer whose grid is at least 1/4 of the input "
        "per axis (the deepest layer alone when it is that fine); Grad-CAM for classifiers "
        "(HiResCAM when the linear layer reads the flattened feature map), LayerCAM for "
        "segmentation outputs",
        "n_test": args.n_test,
        "n_curve": args.n_curve,
        "curve_steps": args.curve_steps,
        "n_rand": args.n_rand,
        "n_calib": args.n_calib,
        "rule_selection": rule_table(tuning) if tuning else [],
        "rule_check_held_out": rule_table(held) if held else [],
        "tuning_summary": summarise(tuning),
        "held_out_summary": summarise(held),
        "models": models,
        "seconds": round(seconds),
        "cpu_seconds": round(cpu_seconds),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_report(report)
    print((RESULTS / "quality.md").read_text().split("## Choosing")[0])


if __name__ == "__main__":
    main()
