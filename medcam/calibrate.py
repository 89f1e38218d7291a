"""Choose the layers and method from a few labelled cases, when the default does not localise.

``layers="auto"`` is a shape-only rule chosen on ``benchmarks/bench_quality.py``; on models it
was not tuned on it can point away from the evidence (see docs/engine.md, "Choosing a layer").
With labelled cases (inputs and masks of the evidence, e.g. lesion segmentations) you can
measure instead of trusting it:

- :func:`calibrate_layers`: model-space inputs ``(N, C, *S)`` and masks ``(N, *S)``;
- :func:`calibrate_scans`: scans and masks on the scans' grids, through the model's
  preprocessing; every candidate map is put back on the scan grid before it is scored.

Every candidate is explained for every case: each target layer alone (a container and the
child whose output it returns are one candidate), the shape rules of
:func:`medcam.engine.auto.auto_choice` (the default among them), each with every method in
``methods``. A candidate's score is its strict pointing game (ties: energy pointing game) over
the cases; the best candidate wins, the default on a tie. Because the winner is chosen on the
same cases it is scored on, its score is optimistic: leave-one-out (choose on all cases but
one, score the one left out, for each case) estimates how well choosing this way carries to new
cases, and the best candidate replaces the default only when that estimate beats the default's
pointing game. With fewer than four cases there is no estimate and the default is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcam.engine.auto import auto_choice
from medcam.engine.core import Explainer
from medcam.engine.layers import model_device, trace_layers
from medcam.engine.postprocess import fuse_maps, upsample
from medcam.errors import InputError, LayerError, MedcamError, TargetError
from medcam.io.mask import evidence

__all__ = ["Calibration", "Candidate", "calibrate_layers", "calibrate_scans", "load_calibration"]

METHODS = ("gradcam", "hirescam", "layercam")
_RULES: dict[str, dict[str, Any]] = {
    "the deepest layer": {"min_fraction": 0, "fusion": None},
    **{
        f"the deepest layer with a grid >= 1/{d} of the input": {
            "min_fraction": Fraction(1, d),
            "fusion": None,
        }
        for d in (2, 4, 8)
    },
    **{
        f"chain product back to 1/{d} of the input": {"min_fraction": Fraction(1, d)}
        for d in (2, 4, 8)
    },
}
_CHUNK_BYTES = 256 * 2**20  # candidate maps on the masks' grid held at a time (float32)


@dataclass(frozen=True)
class Candidate:
    """One way to explain: ``layers`` fused with ``fusion`` (``None``: one layer), by ``method``.

    ``how`` says where it comes from: ``"default"``, ``"rule: <rule>"`` or ``"layer"``.
    """

    layers: tuple[str, ...]
    method: str
    fusion: str | None
    how: str

    def settings(self) -> dict[str, Any]:
        """Keyword arguments for :class:`medcam.Explainer` / :func:`medcam.explain_scan`."""
        return {"layers": list(self.layers), "method": self.method, "fusion": self.fusion}

    def flags(self) -> str:
        """The same as ``medcam explain`` options."""
        out = " ".join(f"--layer {name}" for name in self.layers) + f" --method {self.method}"
        return out + (f" --fusion {self.fusion}" if self.fusion else "")


@dataclass
class Calibration:
    """What :func:`calibrate_layers` / :func:`calibrate_scans` found.

    Attributes
    ----------
    chosen:
        What to use: ``best``, or ``default`` when ``best`` did not carry over.
    best, default:
        The best candidate on the cases and what ``layers="auto"``, ``method="auto"`` use.
    n_cases:
        Number of labelled cases.
    pointing_game, energy:
        ``{"best": float, "default": float}``: mean strict / energy pointing game over all
        cases (the best one's is optimistic: it was chosen on these cases).
    cross_validated:
        ``{"best": float, "default": float}`` with four or more cases: leave-one-out, the
        pointing game on each case of the best candidate on the other cases (``"default"``
        needs no choice: its pointing game); ``None`` with fewer cases.
    table:
        Every candidate, best first: ``{"layers", "method", "fusion", "how", "pointing_game",
        "energy"}``.
    """

    chosen: Candidate
    best: Candidate
    default: Candidate
    n_cases: int
    pointing_game: dict[str, float]
    energy: dict[str, float]
    cross_validated: dict[str, float] | None
    table: list[dict[str, Any]] = field(repr=False)
    model: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """What to explain with, as :class:`medcam.Explainer` keyword arguments: the chosen
        layers, method and fusion with ``chosen_by=describe()`` (what the results' metadata
        records); ``layers="auto"``, ``method="auto"`` when the default was kept (so that it
        keeps adapting to input sizes and sliding windows; its rule is recorded, followed by
        the calibration's line)."""
        if self.chosen == self.default:
            return {"layers": "auto", "method": "auto", "fusion": None,
                    "chosen_by": self.describe()}  # fmt: skip
        return {**self.chosen.settings(), "chosen_by": self.describe()}

    def record(self) -> dict[str, Any]:
        """JSON-ready summary (what ``medcam layers --calibrate --save`` writes; read back by
        :func:`load_calibration`)."""
        return {
            **self.settings(),
            "calibration": self.describe(),
            "model": self.model,
            "n_cases": self.n_cases,
            "pointing_game": self.pointing_game,
            "energy_pointing_game": self.energy,
            "cross_validated_pointing_game": self.cross_validated,
            "default": self.default.settings(),
            "table": self.table,
        }

    def describe(self) -> str:
        """One line: what was chosen and on what evidence."""
        pg, cv, best = self.pointing_game, self.cross_validated, self.best
        head = f"calibrated on {self.n_cases} labelled case{'s' * (self.n_cases != 1)}: "
        name = f"{best.method} @ {' + '.join(best.layers)}"
        if self.chosen != self.default:
            return (f"{head}{name}: pointing game {pg['best']:.2f} on these cases, "
                    f"{cv['best']:.2f} on cases left out of the choice (default "
                    f"{pg['default']:.2f})")  # fmt: skip
        if best == self.default:
            return (f"{head}kept the default (pointing game {pg['default']:.2f}): no candidate "
                    "did better")  # fmt: skip
        if cv is None:
            return (f"{head}kept the default (pointing game {pg['default']:.2f}): the best on "
                    f"these cases, {name} ({pg['best']:.2f}), cannot be checked on cases left "
                    "out with fewer than 4 cases")  # fmt: skip
        return (f"{head}kept the default (pointing game {pg['default']:.2f}): the best on these "
                f"cases, {name} ({pg['best']:.2f}), scored {cv['best']:.2f} on cases left out "
                "of the choice")  # fmt: skip


# ------------------------------------------------------------------------------ candidates
def _check_methods(methods: Sequence[str]) -> list[str]:
    """The canonical names of ``methods``, checked."""
    from medcam.engine.methods import get_method

    if isinstance(methods, str) or not methods:
        raise InputError("methods must be a non-empty list of method names, e.g. "
                         "['gradcam', 'hirescam', 'layercam'].")  # fmt: skip
    for m in methods:
        if get_method(m).perturbation:
            raise InputError(f"Calibration tries gradient methods; {m!r} is a perturbation "
                             "method (one pass per candidate would be too slow).")  # fmt: skip
    return [get_method(m).name for m in methods]


def _explainers(model, cands: list[Candidate]) -> dict[str, Explainer]:
    """One explainer per method over every candidate layer (the default's method included)."""
    names = sorted({n for c in cands for n in c.layers})
    return {m: Explainer(model, names, m) for m in dict.fromkeys(c.method for c in cands)}


def _aliases(model: torch.nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, list]:
    """``{layer: [inner layers returning the very same tensor]}``: a container and the child
    whose output it returns (``layer1`` and ``layer1.0``, a Sequential and its last module)
    give the same map with every method, so only the outermost is a candidate."""
    from medcam.engine.layers import eval_mode

    modules = dict(model.named_modules())
    seen: dict[int, list[str]] = {}
    keep: list = []  # the outputs stay alive during the pass, so their ids stay unique

    def hook(name):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor):
                keep.append(output)
                seen.setdefault(id(output), []).append(name)

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad(), eval_mode(model, True):
            model(x)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, list] = {}
    for group in seen.values():
        group = sorted(set(group), key=len)
        outer = group[0]
        inner = [n for n in group[1:] if n.startswith(outer + ".")]
        if inner:
            out[outer] = inner
    return out


def _candidates(
    infos, spatial, out_shape, methods: Sequence[str], aliases=None, default_method="gradcam"
) -> list[Candidate]:
    default = auto_choice(infos, spatial, out_shape)
    found: dict[tuple, Candidate] = {}

    def add(layers, fusion, method, how):
        key = (tuple(layers), fusion if len(layers) > 1 else None, method)
        found.setdefault(key, Candidate(key[0], method, key[1], how))

    add(default.layers, default.fusion, default_method, "default")
    for method in methods:
        add(default.layers, default.fusion, method, f"rule: {default.rule}")
        for rule, how in _RULES.items():
            try:
                ch = auto_choice(infos, spatial, out_shape, **how)
            except LayerError:
                continue
            add(ch.layers, ch.fusion, method, f"rule: {rule}")
        inner = {n for group in (aliases or {}).values() for n in group}
        for info in infos:
            if info.is_candidate and info.output_shape != out_shape and info.name not in inner:
                same = (aliases or {}).get(info.name)
                add([info.name], None, method,
                    f"layer (same output: {', '.join(same)})" if same else "layer")  # fmt: skip
    return list(found.values())


def _maps(raw: dict[str, dict[str, torch.Tensor]], cands, spatial) -> torch.Tensor:
    """``(B, len(cands), *spatial)`` maps of the candidates from the per-method raw maps."""
    out = []
    for c in cands:
        maps = [upsample(raw[c.method][name][:, :1].float(), spatial) for name in c.layers]
        out.append(maps[0] if c.fusion is None else fuse_maps(maps, c.fusion))
    return torch.cat(out, dim=1)


def _score(
    cases: Iterable[tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]],
    explainers: dict[str, Explainer],
    target: Any,
    cands: list[Candidate],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strict and energy pointing game ``(len(cands), N)`` over ``cases``: ``(x (B, C, *S),
    masks (B, *M), place)``, ``place`` putting ``(B, k, *S)`` maps on the masks' grid."""
    pg, energy = [], []
    for x, masks, place in cases:
        raw = {}
        for method, explainer in explainers.items():
            result = explainer(x, target, upsample_to_input=False)  # one map: see _trace
            raw[method] = {name: m.detach() for name, m in result.raw.items()}
        spatial = tuple(x.shape[2:])
        case_pg = torch.empty(len(cands), len(x))
        case_en = torch.empty(len(cands), len(x))
        step = max(1, min(32, _CHUNK_BYTES // (4 * masks.numel())))
        for start in range(0, len(cands), step):
            chunk = cands[start : start + step]
            maps = place(_maps(raw, chunk, spatial))
            case_pg[start : start + len(chunk)], case_en[start : start + len(chunk)] = _hits(
                maps, masks.to(maps.device)
            )
        pg.append(case_pg)
        energy.append(case_en)
    return torch.cat(pg, dim=1), torch.cat(energy, dim=1)


def _hits(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strict and energy pointing game ``(k, B)`` of ``maps: (B, k, *M)`` against boolean
    ``masks: (B, *M)``, as :func:`medcam.evaluate.pointing_game` / ``energy_pointing_game``
    compute them (first maximum; positive mass), without their per-map copies (a scan-sized
    grid holds tens of millions of voxels)."""
    b, k = maps.shape[:2]
    # both in the maps' memory order (the scan grid is stored first axis fastest): no copy
    nd = maps.ndim - 2
    order = sorted(range(nd), key=lambda d: -maps.stride(2 + d))
    stored = tuple(maps.shape[2 + d] for d in order)
    flat = maps.permute(0, 1, *[2 + d for d in order]).reshape(b, k, -1)
    inside = masks.permute(0, *[1 + d for d in order]).reshape(b, -1)
    peak = flat.amax(dim=2, keepdim=True)
    pg = torch.zeros(k, b)
    for i in range(b):
        for j in range(k):
            # the first maximum in C order, as medcam.evaluate takes it (ties: plateaus)
            at = (flat[i, j] == peak[i, j]).nonzero()[:, 0]
            if len(at) > 4096:  # a wide plateau (a constant map): find it in a C-order copy
                first = int(maps[i, j].contiguous().reshape(-1).argmax())
                pg[j, i] = float(masks[i].reshape(-1)[first])
                continue
            if len(at) > 1:
                index = torch.stack(torch.unravel_index(at, stored))  # (nd, n) stored order
                c_order = torch.zeros_like(at)
                for d in range(nd):  # ravel in the maps' own axis order
                    c_order = c_order * maps.shape[2 + d] + index[order.index(d)]
                at = at[c_order.argmin()][None]
            pg[j, i] = float(inside[i, at[0]])
    energy = torch.zeros(k, b)
    for i in range(b):
        where = inside[i].nonzero()[:, 0]
        mass_in = flat[i][:, where].clamp_min(0).sum(dim=1)
        total = torch.stack([flat[i, j].clamp_min(0).sum() for j in range(k)])
        energy[:, i] = torch.where(total > 0, mass_in / total.clamp_min(1e-30), 0.0).cpu()
    return pg, energy


def _ranking(pg: torch.Tensor, energy: torch.Tensor, cases: Sequence[int], cands) -> list[int]:
    """Candidate indices, best first on ``cases``: pointing game, then the default, then
    energy (ties keep the candidates' order)."""
    idx = torch.as_tensor(list(cases))
    mean_pg = pg[:, idx].mean(dim=1).tolist()
    mean_en = energy[:, idx].mean(dim=1).tolist()
    return sorted(
        range(len(cands)),
        key=lambda i: (round(mean_pg[i], 9), cands[i].how == "default", mean_en[i]),
        reverse=True,
    )


def _best(pg: torch.Tensor, energy: torch.Tensor, cases: Sequence[int], cands) -> int:
    """Index of the best candidate on ``cases`` (see :func:`_ranking`)."""
    return _ranking(pg, energy, cases, cands)[0]


def _calibration(pg, energy, cands, model: dict | None = None) -> Calibration:
    n = pg.shape[1]
    all_cases = range(n)
    order = _ranking(pg, energy, all_cases, cands)
    chosen = order[0]
    default = next(i for i, c in enumerate(cands) if c.how == "default")
    cv = None
    if n >= 4:  # leave one out: choose on the other cases, score on the one left out
        hits = [float(pg[_best(pg, energy, [j for j in all_cases if j != i], cands), i])
                for i in all_cases]  # fmt: skip
        cv = {"best": float(sum(hits) / n), "default": float(pg[default].mean())}
    best = chosen
    if cv is None or cv["best"] <= cv["default"]:
        chosen = default  # the winner on these cases does not carry over better than the default
    table = [
        {**cands[i].settings(), "how": cands[i].how,
         "pointing_game": float(pg[i].mean()), "energy": float(energy[i].mean())}
        for i in order
    ]  # fmt: skip
    return Calibration(
        chosen=cands[chosen],
        best=cands[best],
        default=cands[default],
        n_cases=n,
        pointing_game={"best": float(pg[best].mean()), "default": float(pg[default].mean())},
        energy={"best": float(energy[best].mean()), "default": float(energy[default].mean())},
        cross_validated=cv,
        table=table,
        model=model or {},
    )


def _check_masks(masks: Sequence[torch.Tensor], what: Sequence[str]) -> None:
    """Each mask has evidence and is not most of the image; ``what`` names each mask."""
    for mask, name in zip(masks, what, strict=True):
        if not bool(mask.any()):
            raise InputError(
                f"{name} is empty. Calibration needs the evidence (e.g. the lesion) drawn in "
                "every case; leave out cases without it."
            )
        share = float(mask.float().mean())
        if share > 0.5:
            raise InputError(
                f"{name} covers {100 * share:.0f} % of the image: any map points "
                "inside it, so the pointing game would say nothing. Give the evidence (e.g. the "
                "lesion), not the body or the scan itself (are scan and mask the right way "
                "round?)."
            )


def _trace(model, x, target):
    """One forward pass: the layers, the output shape, and the target checked on it (one map
    per case) before anything is explained; and the method ``method="auto"`` uses."""
    from medcam.engine.targets import as_target

    infos, out = trace_layers(model, x)
    if not isinstance(out, torch.Tensor):
        raise MedcamError(
            "Calibration needs a model whose output is one tensor of logits; wrap the model so "
            "that it returns the logits."
        )
    with torch.no_grad():
        classes = as_target(target)(out.detach())[1]
    if classes.shape[1] != 1:
        raise TargetError(
            f"Calibration scores one map per case, but the target gives {classes.shape[1]}; "
            "give one class (target=1, --target 1)."
        )
    # what method="auto" uses on the default layers (for a classifier, it depends on how the
    # head reads the map: see medcam.engine.auto.FlattenedHead), from one explained input
    method = Explainer(model)(x, target).method
    return infos, tuple(out.shape), method


def _identity(model, x) -> dict[str, Any]:
    from medcam.writers.sidecar import model_identity

    return {**model_identity(model), "input_shape": list(x.shape[1:])}


# ------------------------------------------------------------------------------------- API
def calibrate_layers(
    model: torch.nn.Module,
    x: torch.Tensor,
    masks: torch.Tensor,
    target: Any = "pred",
    *,
    methods: Sequence[str] = METHODS,
    batch_size: int = 8,
    label: int | None = None,
) -> Calibration:
    """Choose layers and method by the pointing game on labelled model-space cases.

    Parameters
    ----------
    model:
        The network (eager ``nn.Module``, on the device it should run on; never modified).
    x:
        ``(N, C, *S)`` model inputs, 2D or 3D, already preprocessed.
    masks:
        ``(N, *S)`` the evidence in each input (nonzero = evidence), on the inputs' grid.
    target:
        As in :func:`medcam.explain`, one map per case (``"pred"``, a class index, a
        :class:`medcam.SegmentationTarget`).
    methods:
        Gradient methods tried at every candidate (the default's own method is always
        scored).
    batch_size:
        Cases per forward / backward pass.
    label:
        Which value of the masks is the evidence (default: nonzero voxels of one-label masks,
        ``>= 0.5`` of resampled ones; see :func:`medcam.io.mask.evidence`).

    Returns
    -------
    Calibration
        Use ``medcam.explain(model, x, **calibration.settings())``.

    Raises
    ------
    InputError
        Inputs and masks that do not match, or an empty mask (before the model runs).
    """
    methods = _check_methods(methods)
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5) or len(x) == 0:
        raise InputError("x must be a (N, C, H, W) or (N, C, D, H, W) tensor of model inputs, "
                         "N >= 1.")  # fmt: skip
    if isinstance(masks, (list, tuple)):
        masks = torch.stack([torch.as_tensor(np.asarray(m)) for m in masks])
    masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if tuple(masks.shape) != (x.shape[0], *x.shape[2:]):
        no_channel = masks.ndim == x.ndim and tuple(masks.shape) == tuple(x.shape)
        hint = " x seems to lack its channel axis: give x[:, None]." if no_channel else ""
        raise InputError(
            f"masks must be (N, *spatial) = {(x.shape[0], *x.shape[2:])} to match x "
            f"{tuple(x.shape)}, not {tuple(masks.shape)}; draw each mask on its input's "
            f"grid.{hint}"
        )
    masks = torch.stack([evidence(m, label, f"The mask of case {i}") for i, m in enumerate(masks)])
    _check_masks(list(masks), [f"The mask of case {i}" for i in range(len(masks))])
    device = model_device(model, x)
    infos, out_shape, auto = _trace(model, x[:1].to(device), target)
    aliases = _aliases(model, x[:1].to(device), [i.name for i in infos if i.is_candidate])
    cands = _candidates(infos, tuple(x.shape[2:]), out_shape, methods, aliases, auto)
    explainers = _explainers(model, cands)

    def cases():
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], masks[i : i + batch_size], lambda maps: maps

    pg, energy = _score(cases(), explainers, target, cands)
    return _calibration(pg, energy, cands, _identity(model, x))


def calibrate_scans(
    model: torch.nn.Module,
    scans: Sequence[Any],
    masks: Sequence[Any],
    target: Any = "pred",
    *,
    preprocess: Any = None,
    methods: Sequence[str] = METHODS,
    expect: Any = None,
    label: int | None = None,
    names: Sequence[str] | None = None,
) -> Calibration:
    """Choose layers and method by the pointing game on labelled scans.

    Each scan goes through ``preprocess`` to the model, every candidate map is put back on the
    scan's grid (as :func:`medcam.explain_scan` does) and scored against the mask there.

    Parameters
    ----------
    model:
        The network (eager ``nn.Module``; never modified).
    scans:
        :class:`medcam.Scan` objects or anything :func:`medcam.load_scan` reads.
    masks:
        One per scan, on that scan's grid (see :func:`medcam.io.mask.mask_on_scan`): a
        :class:`medcam.Scan` / path of a label image or of a DICOM SEG, or an array in the
        scan's array order ``scan.image.shape[1:]`` (for DICOM and pictures that is (columns,
        rows[, slices]), the transpose of pydicom's / PIL's arrays: prefer files). Evidence:
        nonzero voxels of a one-label mask, ``>= 0.5`` of a resampled (non-integer) mask, or the
        voxels equal to ``label`` (a SEG's segment number).
    target, methods:
        As in :func:`calibrate_layers`.
    label:
        Which value of the masks is the evidence (for label images with several structures).
    preprocess, expect:
        As in :func:`medcam.explain_scan`. The whole preprocessed input is explained in one
        forward pass (no sliding windows).
    names:
        How error messages name each case (default ``"case <i>"``, from 0; the command line
        gives the CSV line).

    Returns
    -------
    Calibration
    """
    from medcam.io import Scan, load_scan
    from medcam.io.mask import mask_on_scan
    from medcam.space import invert_to_source, preprocess_scan

    methods = _check_methods(methods)
    if len(scans) != len(masks) or not scans:
        raise InputError(f"Give one mask per scan ({len(scans)} scans, {len(masks)} masks).")
    names = list(names) if names is not None else [f"case {i}" for i in range(len(scans))]
    device = None

    def load(i: int):
        """Scan ``i`` and its model input (loaded again when used: one case in memory)."""
        nonlocal device
        scan = scans[i]
        if not isinstance(scan, Scan):
            try:
                scan = load_scan(scan)
            except MedcamError as err:
                raise type(err)(f"{names[i]}: the scan {scan}: {err}") from err
        device = device or model_device(model, scan.image)
        return scan, preprocess_scan(scan, preprocess, device, expect)

    # every check before the model runs: masks on their scans' grids, one input size
    grids, shapes, first = [], {}, None
    for i, mask in enumerate(masks):
        scan, model_input = load(i)
        source = mask if isinstance(mask, (str, Path)) else type(mask).__name__
        what = f"{names[i]}: the mask {source} (scan {scan.source or 'tensor'})"
        grids.append(mask_on_scan(mask, scan, label, what=f"{names[i]}: the mask"))
        _check_masks(grids[-1:], [what])
        shapes.setdefault(tuple(model_input.shape[1:]), i)
        if first is None:
            first = torch.as_tensor(_plain(model_input))[None]
    if len(shapes) > 1:
        raise InputError(
            "The preprocessing gives inputs of different sizes: "
            + ", ".join(f"{list(s)} ({names[i]})" for s, i in shapes.items())
            + "; layers are chosen for one input size, so make the preprocessing give one "
            "(e.g. ResizeWithPadOrCrop)."
        )
    infos, out_shape, auto = _trace(model, first, target)
    aliases = _aliases(model, first, [i.name for i in infos if i.is_candidate])
    cands = _candidates(infos, tuple(first.shape[2:]), out_shape, methods, aliases, auto)
    explainers = _explainers(model, cands)

    def cases() -> Iterator:
        for i, grid in enumerate(grids):
            scan, model_input = load(i)

            def place(maps, scan=scan, model_input=model_input):
                return invert_to_source(maps[0], model_input, preprocess, scan)[None]

            yield torch.as_tensor(_plain(model_input))[None], grid[None], place

    pg, energy = _score(cases(), explainers, target, cands)
    return _calibration(pg, energy, cands, _identity(model, first))


def _plain(t):
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def load_calibration(path: str | Any, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Read a calibration saved by ``medcam layers --calibrate --save`` (or
    :meth:`Calibration.record`) as :class:`medcam.Explainer` keyword arguments ``{"layers",
    "method", "fusion", "chosen_by"}`` (``"auto"`` layers and method when the calibration kept
    the default).

    With ``model``, the calibration must have been made for these weights (the SHA-256 of the
    state dict it records): layers chosen for one model say nothing about another.

    Raises
    ------
    InputError
        A file that is not such a calibration (missing or malformed keys), or one made for
        another model, naming what is wrong.
    """
    import json

    from medcam.engine.methods import METHODS as KNOWN

    p = Path(path)
    try:
        record = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"Cannot read the calibration {p}: {err}.") from err
    layers = record.get("layers") if isinstance(record, dict) else None
    named = isinstance(layers, list) and all(isinstance(n, str) and n for n in layers)
    if not (layers == "auto" or (layers and named)):
        raise InputError(
            f"{p} is not a medcam calibration: it needs 'layers', a list of layer names or "
            "'auto' (write one with medcam layers --calibrate ... --save)."
        )
    method, fusion = record.get("method"), record.get("fusion")
    if method not in KNOWN and not (method == "auto" and layers == "auto"):
        raise InputError(f"{p}: unknown method {method!r}; one of {', '.join(KNOWN)}.")
    several = isinstance(layers, list) and len(layers) > 1
    if fusion not in (None, "mean", "product") or (fusion is None and several):
        raise InputError(f"{p}: fusion must be 'mean' or 'product' for several layers, not "
                         f"{fusion!r}.")  # fmt: skip
    made_for = (record.get("model") or {}).get("state_dict_sha256")
    if model is not None and made_for:
        from medcam.writers.sidecar import model_identity

        have = model_identity(model)["state_dict_sha256"]
        if have != made_for:
            raise InputError(
                f"{p} was made for another model (weights SHA-256 {made_for[:12]}..., these are "
                f"{have[:12]}...): the layers that localise depend on the weights. Calibrate "
                "this model: medcam layers ... --calibrate cases.csv --save FILE."
            )
    why = record.get("chosen_by")
    why = why if isinstance(why, str) and why else f"calibration {p.name}"
    return {"layers": layers, "method": method, "fusion": fusion, "chosen_by": why}
