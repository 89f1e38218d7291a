"""Weights that are not data, cannot be read or do not fit: a clear ModelError naming the file,
through every way weights come in (`--weights`, a bundle's models/model.pt with `--bundle` and
`load_bundle`, the bundle's CheckpointLoader under `python -m monai.bundle run`)."""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medcam.cli import main
from medcam.data.demo import demo_classifier, demo_segmenter
from medcam.errors import ModelError
from medcam.runner import load_model

ROOT = Path(__file__).parent.parent
MODEL = "medcam.data.demo:demo_classifier"


class _Touch:
    """Unpickling this runs code: it creates ``marker`` (a stand-in for any payload)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _reference() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return demo_classifier().state_dict()


def _write(kind: str, path: Path, marker: Path) -> Path:
    """A weights file of one class of bad input for demo_classifier."""
    good = _reference()
    if kind == "code":
        torch.save({"state_dict": good, "payload": _Touch(marker)}, path)
    elif kind == "whole-module":
        torch.save(demo_classifier(), path)
    elif kind == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not weights\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "empty-dict":
        torch.save({}, path)
    elif kind == "other-network":
        torch.save(demo_segmenter().state_dict(), path)
    elif kind == "missing":
        torch.save({k: v for k, v in good.items() if not k.startswith("class_layers")}, path)
    elif kind == "unexpected":
        torch.save({**good, "extra.weight": torch.zeros(2)}, path)
    elif kind == "shape":
        name = next(k for k in good if k.endswith("out.weight"))
        torch.save({**good, name: torch.zeros(5, good[name].shape[1])}, path)
    else:
        raise AssertionError(kind)
    return path


# what the error must say, per class of bad weights
EXPECTED = {
    "code": ["Refused to load the weights", "weights_only=True", "state_dict()"],
    "whole-module": ["Refused to load the weights", "state_dict()"],
    "truncated": ["Cannot read the weights", "truncated"],
    "empty": ["Cannot read the weights"],
    "text": ["Cannot read the weights"],
    "tensor": ["holds a Tensor, not a state dict"],
    "empty-dict": ["holds an empty dict, not a state dict"],
    "other-network": ["do not fit", "missing key(s): features.conv0.weight", "unexpected key(s)"],
    "missing": ["do not fit", "missing key(s): class_layers"],
    "unexpected": ["do not fit", "1 unexpected key(s): extra.weight"],
    "shape": ["do not fit", "1 shape mismatch(es): class_layers.out.weight (file (5,"],
}


def test_the_malicious_pickle_is_live():
    """The 'code' file really runs code when loaded without weights_only (so refusing it is
    what keeps the marker from appearing)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "ran"
        path = _write("code", Path(tmp) / "w.pt", marker)
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_weights_with_model_are_a_model_error(tmp_path, kind):
    marker = tmp_path / "ran"
    path = _write(kind, tmp_path / "w.pt", marker)
    with pytest.raises(ModelError) as info:
        load_model(model=MODEL, weights=path)
    message = str(info.value)
    assert str(path) in message
    for part in EXPECTED[kind]:
        assert part in message, message
    assert not marker.exists()


def test_weights_that_fit_are_loaded_exactly(tmp_path):
    """A plain state dict, a checkpoint wrapping it, and keys with DataParallel's `module.`
    prefix all load the same numbers."""
    good = _reference()
    files = {
        "plain.pt": good,
        "wrapped.pt": {"state_dict": good, "epoch": 3},
        "parallel.pt": {f"module.{k}": v for k, v in good.items()},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        network = load_model(model=MODEL, weights=tmp_path / name).network
        for key, value in network.state_dict().items():
            assert torch.equal(value, good[key]), (name, key)


def _bundle(tmp_path: Path, kind: str | None, marker: Path) -> Path:
    bundle = tmp_path / "classify3d"
    shutil.copytree(ROOT / "examples" / "bundles" / "classify3d", bundle)
    if kind is not None:
        _write(kind, bundle / "models" / "model.pt", marker)
    return bundle


@pytest.mark.parametrize("kind", ["code", "truncated", "other-network", "shape"])
def test_bad_weights_in_a_bundle_through_the_api_and_the_cli(tmp_path, kind):
    from medcam.bundle import load_bundle

    marker = tmp_path / "ran"
    bundle = _bundle(tmp_path, kind, marker)
    weights = bundle / "models" / "model.pt"
    with pytest.raises(ModelError) as info:
        load_bundle(bundle)
    assert str(weights) in str(info.value)
    for part in EXPECTED[kind]:
        assert part in str(info.value)
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")  # never read: the model is loaded first
    for args in (["explain", str(scan), "--bundle", str(bundle), "--out", str(tmp_path / "o")],
                 ["layers", "--bundle", str(bundle)]):  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("medcam: error: "), result.output
        assert str(weights) in lines[0] and EXPECTED[kind][0] in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("kind", ["code", "whole-module", "missing", "shape"])
def test_bad_weights_on_the_command_line(tmp_path, kind):
    """`--weights` with `explain`, `layers`: exit 2, one line naming the file; `--debug` shows
    the traceback."""
    marker = tmp_path / "ran"
    path = _write(kind, tmp_path / "w.pt", marker)
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")
    for args in (["explain", str(scan), "--model", MODEL, "--weights", str(path), "--out",
                  str(tmp_path / "o")],
                 ["layers", "--model", MODEL, "--weights", str(path), "--input-size",
                  "48,48,48"]):  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], result.output
        for part in EXPECTED[kind]:
            assert part in lines[0]
    debug = CliRunner().invoke(main, ["--debug", "layers", "--model", MODEL, "--weights",
                                      str(path), "--input-size", "48,48,48"])  # fmt: skip
    assert isinstance(debug.exception, ModelError)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["code", "shape"])
def test_bad_weights_under_monai_bundle_run(tmp_path, phantom_cases, kind):
    """`python -m monai.bundle run` with configs/medcam.json: the handler checks what the
    bundle's CheckpointLoader will load before any case, and the run stops with the medcam
    error naming the file; no heatmap, no prediction is written."""
    import subprocess
    import sys

    marker = tmp_path / "ran"
    bundle = _bundle(tmp_path, kind, marker)
    out = tmp_path / "eval"
    config = [str(bundle / "configs" / "inference.json"), str(ROOT / "configs" / "medcam.json")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config),
           "--bundle_root", str(bundle), "--dataset_dir", str(phantom_cases[0]),
           "--output_dir", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "medcam.errors.ModelError" in done.stderr, done.stderr[-3000:]
    assert str(bundle / "models" / "model.pt") in done.stderr
    for part in EXPECTED[kind]:
        assert part in done.stderr
    assert not marker.exists()
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
