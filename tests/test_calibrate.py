"""Choosing layers from labelled cases: a known answer, the engine's own maps, the scan grid,
the cross-validation guard, and refusals before the model runs."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import medcam
from medcam import evaluate as ev
from medcam.calibrate import Candidate, _calibration
from medcam.cli import main
from medcam.errors import InputError, TargetError
from tests.helpers import exploding_model, lure_cases, lure_model, lure_preprocess


@pytest.mark.parametrize("dims", [2, 3])
def test_known_answer_the_first_layer_finds_the_lesion_the_default_the_lure(dims):
    model = lure_model(dims)
    x, masks = lure_cases(8, dims=dims)
    default = medcam.explain(model, x, 1).heatmap[:, 0]
    assert ev.pointing_game(default, masks, spatial_rank=dims) == 0.0  # the lure wins there

    cal = medcam.calibrate_layers(model, x, masks, 1)
    assert cal.chosen.layers in (("stem",), ("act",))  # relu(x - 0.5): the lesion is the peak
    assert cal.chosen != cal.default and cal.n_cases == 8
    heat = medcam.explain(model, x, 1, **cal.settings()).heatmap[:, 0]
    assert ev.pointing_game(heat, masks, spatial_rank=dims) == 1.0
    assert cal.best == cal.chosen and cal.pointing_game == {"best": 1.0, "default": 0.0}
    assert cal.cross_validated == {"best": 1.0, "default": 0.0}
    assert cal.describe().startswith(f"calibrated on 8 labelled cases: {cal.chosen.method} @ ")
    assert cal.chosen.flags().startswith(f"--layer {cal.chosen.layers[0]} --method ")
    # the reason travels with the settings into the result's metadata
    meta = medcam.explain(model, x[:1], 1, **cal.settings()).metadata()
    assert meta["layers_chosen_by"] == meta["method_chosen_by"] == cal.describe()


def test_every_row_of_the_table_is_what_explain_gives():
    """The calibration assembles candidate maps from one pass per method; each must equal what
    medcam.explain computes with the candidate's settings (fusions included)."""
    model = lure_model(3)
    x, masks = lure_cases(6, seed=3)
    cal = medcam.calibrate_layers(model, x, masks, 1, methods=("gradcam", "layercam"))
    assert any(row["fusion"] for row in cal.table)  # the rules' chains are in the table
    assert {row["how"] for row in cal.table} >= {"default", "layer"}
    for row in cal.table:
        settings = {k: row[k] for k in ("layers", "method", "fusion")}
        heat = medcam.explain(model, x, 1, **settings).heatmap[:, 0]
        assert ev.pointing_game(heat, masks) == pytest.approx(row["pointing_game"]), row
        assert ev.energy_pointing_game(heat, masks) == pytest.approx(row["energy"], rel=1e-4)


def _candidates():
    return [Candidate(("deep",), "gradcam", None, "default"),
            Candidate(("stem",), "hirescam", None, "layer")]  # fmt: skip


def test_the_default_is_kept_when_the_winner_does_not_carry_over():
    # the other candidate wins on all 8 cases (0.625 vs 0.5), but leaving out any even case
    # ties them (the default is kept, missing it), leaving out case 1, 3 or 5 picks the other
    # (missing it): leave-one-out 1/8 vs 0.5
    default = [0, 1, 0, 1, 0, 1, 0, 1]
    other = [1, 0, 1, 0, 1, 0, 1, 1]
    pg = torch.tensor([default, other], dtype=torch.float32)
    cal = _calibration(pg, torch.zeros_like(pg), _candidates())
    assert cal.best.layers == ("stem",) and cal.chosen == cal.default
    assert cal.cross_validated == {"best": 0.125, "default": 0.5}
    assert "kept the default" in cal.describe()
    # when the winner carries over it is chosen: every left-out choice picks it, 7 of 8 hits
    default = [0, 1, 0, 0, 0, 1, 0, 0]
    other = [1, 1, 1, 1, 1, 0, 1, 1]
    pg = torch.tensor([default, other], dtype=torch.float32)
    cal = _calibration(pg, torch.zeros_like(pg), _candidates())
    assert cal.chosen.layers == ("stem",)
    assert cal.cross_validated == {"best": 0.875, "default": 0.25}
    # a tie goes to the default
    pg = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.float32)
    cal = _calibration(pg, torch.tensor([[0.1] * 3, [0.9] * 3]), _candidates())
    assert cal.best == cal.chosen == cal.default and "no candidate did better" in cal.describe()
    # with fewer than 4 cases nothing can be checked on cases left out: the default stays
    pg = torch.tensor([[0, 0, 1], [1, 1, 1]], dtype=torch.float32)
    cal = _calibration(pg, torch.zeros_like(pg), _candidates())
    assert cal.best.layers == ("stem",) and cal.chosen == cal.default
    assert cal.cross_validated is None and "fewer than 4 cases" in cal.describe()
    # keeping the default means explaining with "auto": its rule, then the calibration's line
    assert cal.settings() == {"layers": "auto", "method": "auto", "fusion": None,
                              "chosen_by": cal.describe()}  # fmt: skip
    model = lure_model(3)
    x, masks = lure_cases(3)
    kept = medcam.calibrate_layers(model, x, masks, 1)  # 3 cases: the default stays
    meta = medcam.explain(model, x[:1], 1, **kept.settings()).metadata()
    assert meta["layers_chosen_by"].startswith("auto: ")
    assert meta["layers_chosen_by"].endswith(f" ({kept.describe()})")
    assert meta["method_chosen_by"].endswith(f" ({kept.describe()})")


def test_refusals_come_before_the_model_runs():
    model = exploding_model()  # its forward raises: any refusal below must come first
    x = torch.zeros(2, 1, 8, 8, 8)
    with pytest.raises(InputError, match="masks must be"):
        medcam.calibrate_layers(model, x, torch.ones(2, 8, 8, 4))
    masks = torch.zeros(2, 8, 8, 8)
    masks[0, 2:4, 2:4, 2:4] = 1
    with pytest.raises(InputError, match="case 1 is empty"):
        medcam.calibrate_layers(model, x, masks)
    masks[1] = 1  # the whole image: the pointing game would say nothing
    with pytest.raises(InputError, match="case 1 covers 100 % of the image"):
        medcam.calibrate_layers(model, x, masks)
    masks[1] = 0
    masks[1, :2, :2, :2] = 2  # a second label: which one is the evidence?
    with pytest.raises(InputError, match=r"several labels \(1, 2\)"):
        medcam.calibrate_layers(model, x, masks.amax(0, keepdim=True).expand(2, -1, -1, -1))
    with pytest.raises(InputError, match="channel axis"):
        medcam.calibrate_layers(model, x[:, 0], x[:, 0])
    with pytest.raises(InputError, match="perturbation method"):
        medcam.calibrate_layers(model, x, masks, methods=["scorecam"])
    with pytest.raises(InputError, match="one mask per scan"):
        medcam.calibrate_scans(model, [x[0]], [])


def test_one_map_per_case_nothing_modified_no_hooks_left():
    model = lure_model(3).train()
    x, masks = lure_cases(4)
    x0, m0 = x.clone(), masks.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetError, match="one map per case"):
        medcam.calibrate_layers(model, x, masks, "all")
    medcam.calibrate_layers(model, x, masks, 1)
    assert torch.equal(x, x0) and torch.equal(masks, m0) and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def _write_cases(folder, n, seed=0):
    """Lure cases as NIfTI scans (2 mm voxels) with lesion masks on the same grid."""
    x, masks = lure_cases(n, seed=seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-16.0, -20.0, 10.0]
    rows = []
    for i in range(n):
        scan, mask = folder / f"scan{i}.nii.gz", folder / f"mask{i}.nii.gz"
        nib.save(nib.Nifti1Image(x[i, 0].numpy(), affine), scan)
        nib.save(nib.Nifti1Image(masks[i].numpy().astype(np.uint8), affine), mask)
        rows.append((scan, mask))
    return rows


def test_scans_are_scored_on_their_own_grid(tmp_path):
    """Through a preprocessing that reorients and pads: every candidate map is put back on the
    scan grid and scored against the mask there, as explain_scan would put it."""
    model, pre = lure_model(3), lure_preprocess()
    rows = _write_cases(tmp_path, 5)
    cal = medcam.calibrate_scans(model, [r[0] for r in rows], [r[1] for r in rows], 1,
                                 preprocess=pre)  # fmt: skip
    assert cal.chosen.layers in (("stem",), ("act",)) and cal.n_cases == 5
    for settings, expected in ((cal.settings(), 1.0), (cal.default.settings(), 0.0)):
        hits = []
        for scan, mask in rows:
            ex = medcam.explain_scan(model, scan, preprocess=pre, target=1, **settings)
            on_grid = medcam.load_scan(mask).image[0] > 0
            hits.append(ev.pointing_game(ex.heatmap[0], on_grid))
        assert np.mean(hits) == expected
    # a mask on another grid is refused before the model runs
    shifted = tmp_path / "shifted.nii.gz"
    img = nib.load(rows[0][1])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine + np.eye(4) * 0.5), shifted)
    with pytest.raises(InputError, match=r"case 0: the mask .* not on the scan.s grid: voxel size"):
        medcam.calibrate_scans(exploding_model(), [rows[0][0]], [shifted])


def test_cli_calibrate_then_explain_with_the_printed_flags(tmp_path):
    rows = _write_cases(tmp_path, 4, seed=1)
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scan", "mask"])
        w.writerows([(s.name, m.name) for s, m in rows])  # relative to the CSV
    model = ["--model", "tests.helpers:lure_model", "--preprocess", "tests.helpers:lure_preprocess"]
    saved = tmp_path / "calibration.json"
    result = CliRunner().invoke(main, ["layers", *model, "--calibrate", str(cases), "--target",
                                       "1", "--save", str(saved)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "calibrated on 4 labelled cases: " in result.output
    assert "pointing game 1.00 on these cases, 1.00 on cases left out" in result.output
    use = next(line for line in result.output.splitlines() if line.startswith("use: "))
    record = json.loads(saved.read_text())
    assert record["layers"] in (["stem"], ["act"]) and record["n_cases"] == 4
    assert record["default"]["layers"] == ["deep"] and len(record["table"]) > 10
    # the printed flags work, and the written map points at the lesion
    flags = use.split("medcam explain ... ")[1].split()
    out = tmp_path / "out"
    run = CliRunner().invoke(main, ["explain", str(rows[0][0]), "--out", str(out), *model,
                                    "--target", "1", *flags])  # fmt: skip
    assert run.exit_code == 0, run.output
    (nifti,) = out.rglob("*.nii.gz")
    heat = np.asarray(nib.load(nifti).dataobj).squeeze()
    assert ev.pointing_game(heat, np.asarray(nib.load(rows[0][1]).dataobj) > 0) == 1.0
    # or the saved file itself: the same map, and the sidecar says why these layers
    again = tmp_path / "again"
    run = CliRunner().invoke(main, ["explain", str(rows[0][0]), "--out", str(again), *model,
                                    "--target", "1", "--calibration", str(saved)])  # fmt: skip
    assert run.exit_code == 0, run.output
    (nifti2,) = again.rglob("*.nii.gz")
    assert np.array_equal(np.asarray(nib.load(nifti2).dataobj).squeeze(), heat)
    (sidecar,) = again.rglob("*.json")
    meta = json.loads(sidecar.read_text())["explanation"]
    assert meta["layers"] == record["layers"] and meta["method"] == record["method"]
    assert meta["layers_chosen_by"] == record["chosen_by"]
    assert record["chosen_by"].startswith("calibrated on 4 labelled cases: ")
    args = ["explain", str(rows[0][0]), "--out", str(tmp_path / "x"), *model]
    both = CliRunner().invoke(main, [*args, "--calibration", str(saved), "--layer", "deep"])
    assert both.exit_code == 2 and "not both" in both.output and not (tmp_path / "x").exists()


def test_cli_calibrate_refuses_a_bad_case_list(tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("scan,label\na.nii.gz,b.nii.gz\n")
    model = ["--model", "tests.helpers:exploding_model"]
    result = CliRunner().invoke(main, ["layers", *model, "--calibrate", str(cases)])
    assert result.exit_code == 2 and "columns scan, mask" in result.output
    cases.write_text("scan,mask\nmissing.nii.gz,b.nii.gz\n")
    result = CliRunner().invoke(main, ["layers", *model, "--calibrate", str(cases)])
    assert result.exit_code == 2 and "line 2: scan" in result.output
    result = CliRunner().invoke(main, ["layers", *model, "--save", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "go with --calibrate" in result.output


def test_a_saved_calibration_is_checked_when_read(tmp_path):
    good = {"layers": ["a", "b"], "method": "hirescam", "fusion": "product", "chosen_by": "why"}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(good))
    assert medcam.load_calibration(path) == good
    for bad, match in (
        ({**good, "layers": []}, "needs 'layers'"),
        ({**good, "layers": "a"}, "needs 'layers'"),
        ({**good, "method": "magic"}, "unknown method 'magic'"),
        ({**good, "fusion": None}, "fusion must be"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=match):
            medcam.load_calibration(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="Cannot read the calibration"):
        medcam.load_calibration(path)


def test_bundle_handler_takes_a_calibration(tmp_path):
    from medcam.bundle import CAMHandler
    from medcam.errors import MedcamError

    saved = {"layers": ["stem"], "method": "hirescam", "fusion": None, "chosen_by": "calibrated: x"}
    (tmp_path / "calibration.json").write_text(json.dumps(saved))
    handler = CAMHandler(calibration="calibration.json", bundle_root=tmp_path,
                         trusted=[str(tmp_path)])  # fmt: skip
    assert (handler.layers, handler.method, handler.chosen_by) == (["stem"], "hirescam",
                                                                   "calibrated: x")  # fmt: skip
    with pytest.raises(MedcamError, match="not both"):
        CAMHandler(calibration=tmp_path / "calibration.json", layers=["deep"])


def test_mask_values_methods_and_grids_users_bring(tmp_path):
    """A resampled (interpolated) mask, a label image with --mask-label, only LayerCAM asked
    for (the default's Grad-CAM is still scored), a mask on the same voxels stored flipped."""
    model = lure_model(3)
    x, masks = lure_cases(4, seed=5)
    blurred = masks.float() * 0.9 + 1e-4  # interpolation noise around a binary mask
    cal = medcam.calibrate_layers(model, x, blurred, 1, methods=["LayerCAM"])
    assert cal.chosen.method == "layercam" and cal.default.method == "gradcam"
    assert cal.pointing_game["best"] == 1.0
    assert {row["method"] for row in cal.table} == {"layercam", "gradcam"}

    rows = _write_cases(tmp_path, 4, seed=5)
    # label images: 1 = the lure (an organ, say), 2 = the lesion
    labelled = []
    for i, (scan, mask) in enumerate(rows):
        img = nib.load(mask)
        data = np.asarray(img.dataobj).astype(np.uint8) * 2
        data[np.asarray(nib.load(scan).dataobj) == np.float32(0.7)] = 1
        path = tmp_path / f"labels{i}.nii.gz"
        # stored with the first axis reversed: the same voxels, another array order
        flipped = img.affine @ np.array([[-1, 0, 0, 15], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(data[::-1].copy(), flipped), path)
        labelled.append(path)
    scans = [r[0] for r in rows]
    with pytest.raises(InputError, match="several labels"):
        medcam.calibrate_scans(model, scans, labelled, 1, preprocess=lure_preprocess())
    lesion = medcam.calibrate_scans(model, scans, labelled, 1, preprocess=lure_preprocess(),
                                    label=2)  # fmt: skip
    lure = medcam.calibrate_scans(model, scans, labelled, 1, preprocess=lure_preprocess(),
                                  label=1)  # fmt: skip
    assert lesion.chosen.layers in (("stem",), ("act",)) and lesion.pointing_game["best"] == 1
    assert lure.chosen == lure.default and lure.pointing_game["default"] == 1.0  # the lure wins


def test_cli_case_lists_as_spreadsheets_write_them(tmp_path):
    rows = _write_cases(tmp_path, 4, seed=2)
    model = ["--model", "tests.helpers:lure_model", "--preprocess", "tests.helpers:lure_preprocess"]
    body = "".join(f"{s.name};{m.name}\r\n" + ("\r\n" if i == 1 else "")
                   for i, (s, m) in enumerate(rows))  # fmt: skip
    cases = tmp_path / "excel.csv"
    cases.write_bytes(("\ufeffScan ; Mask\r\n" + body).encode("utf-8"))  # BOM, ';', blank line
    result = CliRunner().invoke(main, ["layers", *model, "--calibrate", str(cases), "--target",
                                       "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "calibrated on 4 labelled cases" in result.output
    lines = ["scan,mask", f"{rows[0][0].name},{rows[0][1].name}", "", f"{rows[1][0].name},"]
    cases.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["layers", *model, "--calibrate", str(cases)])
    assert result.exit_code == 2 and "line 4: the mask cell is empty" in result.output
    lines[3] = lines[1]
    cases.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["layers", *model, "--calibrate", str(cases)])
    assert result.exit_code == 2 and "line 4 repeats line 2" in result.output
    # a case's own problem is named by its line and its mask
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), nib.load(rows[0][1]).affine), empty)
    lines[3] = f"{rows[1][0].name},{empty.name}"
    cases.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["layers", *model, "--calibrate", str(cases)])
    assert result.exit_code == 2, result.output
    assert f"line 4: the mask {empty} (scan {rows[1][0]}) is empty" in result.output


def test_scores_equal_medcam_evaluate_in_any_memory_order():
    """Calibration scores scan-sized maps in their memory order; the numbers must be those of
    medcam.evaluate's pointing game and energy pointing game."""
    from medcam.calibrate import _hits

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 7, 6, 5, generator=g) - 0.2  # some negative mass
    maps[0, 1] = 0.0
    maps[0, 1, 6, 0, 0] = maps[0, 1, 0, 5, 4] = 1.0  # a tie: C order and memory order differ
    maps[1, 2] = 0.0  # a constant map: every voxel is a maximum
    stored = maps.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)  # first axis fastest
    masks = torch.rand(2, 7, 6, 5, generator=g) > 0.8
    masks[0, 0, 5, 4] = True
    masks[0, 6, 0, 0] = False  # medcam.evaluate takes (0, 5, 4), the first in C order: a hit
    pg, energy = _hits(stored, masks)
    assert pg[1, 0] == 1.0
    for j in range(3):
        assert pg[j].tolist() == ev.pointing_game(maps[:, j], masks, reduce=False)
        expected = ev.energy_pointing_game(maps[:, j], masks, reduce=False)
        assert energy[j].tolist() == pytest.approx(expected, rel=1e-5)


def test_a_calibration_is_refused_for_other_weights(tmp_path):
    rows = _write_cases(tmp_path, 4, seed=1)
    model = lure_model(3)
    cal = medcam.calibrate_scans(model, [r[0] for r in rows], [r[1] for r in rows], 1,
                                 preprocess=lure_preprocess())  # fmt: skip
    saved = tmp_path / "calibration.json"
    saved.write_text(json.dumps(cal.record()))
    assert medcam.load_calibration(saved, model)["layers"] == list(cal.chosen.layers)
    other = lure_model(3)
    with torch.no_grad():
        other.head.bias.fill_(0.1)  # retrained, say
    with pytest.raises(InputError, match="made for another model"):
        medcam.load_calibration(saved, other)
    # the cohort runner takes it too, and every case records why these layers
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("case_id,input\n" + "".join(f"c{i},{s}\n" for i, (s, _) in
                                                    enumerate(rows[:2])))  # fmt: skip
    out = tmp_path / "cohort"
    args = ["cohort", "run", "--manifest", str(manifest), "--out", str(out), "--model",
            "tests.helpers:lure_model", "--preprocess", "tests.helpers:lure_preprocess",
            "--target", "1", "--format", "nifti,json", "--calibration", str(saved)]  # fmt: skip
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0 and "2 done" in run.output, run.output
    sidecars = [p for p in out.rglob("*.json") if p.name != "medcam.json"]
    assert len(sidecars) == 2
    for p in sidecars:
        assert json.loads(p.read_text())["explanation"]["layers_chosen_by"] == cal.describe()


def test_a_container_and_the_child_it_returns_are_one_candidate():
    """`block` returns `block.1`'s tensor: one map whatever the method, so one row, named by
    the container; a sibling that is not returned stays its own candidate."""
    from collections import OrderedDict

    from torch import nn

    model = nn.Sequential(OrderedDict(
        block=nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU()),
        down=nn.AvgPool3d(2),
        deep=nn.Conv3d(2, 2, 1),
        pool=nn.AdaptiveAvgPool3d(1), flat=nn.Flatten(), head=nn.Linear(2, 2),
    ))  # fmt: skip
    x, masks = lure_cases(4)
    cal = medcam.calibrate_layers(model, x, masks, 1, methods=["gradcam"])
    singles = {row["layers"][0]: row["how"] for row in cal.table if row["how"].startswith("layer")}
    assert singles["block"] == "layer (same output: block.1)"
    assert "block.1" not in singles and "block.0" in singles
