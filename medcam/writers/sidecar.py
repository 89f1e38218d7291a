"""The JSON sidecar: what was explained, with which model and settings, and what was written."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from medcam import __version__
from medcam.writers.registry import CaseOutput, register_format

__all__ = ["model_identity", "sidecar_record", "write_json"]


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Class, parameter count and SHA-256 of the state dict (weights identify the model)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "state_dict_sha256": h.hexdigest(),
    }


def versions() -> dict[str, str]:
    """Versions of medcam and the libraries behind the numbers."""
    import importlib.metadata as md

    out = {"medcam-monai": __version__}
    for pkg in ("torch", "monai", "numpy", "pydicom", "highdicom", "nibabel", "SimpleITK"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def sidecar_record(out: CaseOutput) -> dict[str, Any]:
    """The sidecar's content for a case whose other formats are written."""
    scan = out.scan
    return {
        "case": out.stem,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {
            "kind": scan.kind,
            "sha256": scan.sha256,
            "shape": list(scan.spatial_shape),
            "affine_ras": scan.affine_ras.tolist(),
            "files": len(scan.input_files),
        },
        "model": model_identity(out.model) if out.model is not None else None,
        "explanation": out.explanation.metadata(),
        "outputs": {
            "seg_threshold_fraction_of_peak": out.options.get("seg_threshold")
            if "dicom-seg" in out.formats
            else None,
            "files": {f: [p.name for p in v] for f, v in out.written.items() if f != "json"},
        },
        "versions": versions(),
    }


@register_format("json", order=100, description="JSON sidecar: provenance and settings")
def write_json(out: CaseOutput) -> list[Path]:
    """``<stem>.json``: input hash, model weights hash, layer, feature grid, versions, files."""
    text = json.dumps(sidecar_record(out), indent=2, default=str, allow_nan=False)
    return [out.folder.write_file(f"{out.stem}.json", lambda p: p.write_text(text))]
