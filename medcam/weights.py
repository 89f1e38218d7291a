"""Loading a network's weights from a file: as data only, and a clear error when they do not fit.

Weights come from ``--weights`` (with ``--model``) or a bundle's ``models/model.pt``. They are
read with ``torch.load(weights_only=True)``: a pickle that would construct other objects (and
so could run code) is refused, never executed. Weights that do not fit the network are refused
with the keys and shapes that differ, before the model runs.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medcam.errors import ModelError

__all__ = [
    "as_state_dict",
    "check_fits",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
]

_WRAPPERS = ("state_dict", "model", "network")
_SHOWN = 5


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_checkpoint(path: str | Path) -> Any:
    """What ``path`` holds, read as data only (``torch.load(weights_only=True)``).

    Raises
    ------
    ModelError
        The file cannot be read as a PyTorch file, or it is a pickle that needs more than
        tensors and plain containers (``weights_only=True`` refuses it: it could run code).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if needs is None:  # not a pickle torch can read at all: a damaged or foreign file
            detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
            raise ModelError(
                f"Cannot read the weights {path}: not a PyTorch file "
                f"({detail.group(1).strip() if detail else _first_line(err)}). It should be "
                "written by torch.save(model.state_dict(), path); check that it is complete "
                "(not truncated) and is the right file."
            ) from err
        raise ModelError(
            f"Refused to load the weights {path}: the file is a pickle that needs "
            f"{needs.group(1)}, not only tensors, and unpickling such objects can run arbitrary "
            "code, so medcam loads weights as data only (torch.load(weights_only=True)). Save "
            "the state dict alone where the file was made: torch.save(model.state_dict(), "
            "path). If you trust the file, load the network yourself and pass it to the API."
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError) as err:
        detail = _first_line(err).rstrip(".")
        raise ModelError(
            f"Cannot read the weights {path}: {type(err).__name__}: {detail}. It "
            "should be a PyTorch file written by torch.save(model.state_dict(), path); check "
            "that it is complete (not truncated) and is the right file."
        ) from err


def as_state_dict(state: Any, path: str | Path, unwrap: bool = True) -> dict[str, Any]:
    """``state`` as a state dict (parameter names -> tensors), else a :class:`ModelError`
    naming ``path``; with ``unwrap``, a checkpoint holding one under ``state_dict``, ``model``
    or ``network`` gives that one."""
    if unwrap and isinstance(state, Mapping):
        for key in _WRAPPERS:
            inner = state.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                state = inner
                break
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(k, str) and _is_value(k, v) for k, v in state.items())
    ):
        what = "an empty dict" if isinstance(state, Mapping) and not state else (
            f"a {type(state).__name__}" if not isinstance(state, Mapping)
            else f"a dict with keys {sorted(map(str, state))[:_SHOWN]}"
        )  # fmt: skip
        raise ModelError(
            f"The weights file {path} holds {what}, not a state dict (parameter names -> "
            "tensors). Save it with torch.save(model.state_dict(), path), or a checkpoint with "
            "the state dict under 'state_dict', 'model' or 'network'."
        )
    return dict(state)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read as data only.

    Accepts a plain state dict (``torch.save(model.state_dict(), path)``) or a checkpoint
    holding one under ``state_dict``, ``model`` or ``network``.

    Raises
    ------
    ModelError
        The file is refused or unreadable (see :func:`read_checkpoint`), or it holds no state
        dict.
    """
    return as_state_dict(read_checkpoint(path), path)


def _is_value(key: str, value: Any) -> bool:
    return isinstance(value, torch.Tensor) or key.endswith("_extra_state")


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix ``DataParallel`` / DDP put on every key, when that makes the
    keys the network's."""
    prefix = "module."
    if (
        state
        and all(k.startswith(prefix) for k in state)
        and not any(k.startswith(prefix) for k in expected)
    ):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(network: torch.nn.Module, path: str | Path, what: str) -> torch.nn.Module:
    """Load the state dict in ``path`` into ``network`` (in place) after checking it fits.

    Parameters
    ----------
    network:
        The eager network the weights are for.
    path:
        A state-dict file (see :func:`read_state_dict`).
    what:
        How the network is named in errors, e.g. ``"--model pkg.mod:make_net"``.

    Raises
    ------
    ModelError
        The file is refused or unreadable (:func:`read_state_dict`), or its keys or shapes
        differ from the network's: the error lists the missing and unexpected keys and the
        shape mismatches.
    """
    path = Path(path)
    own = network.state_dict()
    state = _strip_prefix(read_state_dict(path), set(own))
    check_fits(network, state, path, what)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:  # e.g. a dtype a parameter cannot take
        raise ModelError(f"The weights in {path} do not fit {what}: {_first_line(err)}") from err
    return network


def check_fits(
    network: torch.nn.Module, state: Mapping[str, Any], path: str | Path, what: str
) -> None:
    """Raise a :class:`ModelError` listing the missing and unexpected keys and the shape
    mismatches of ``state`` (read from ``path``) against ``network``; nothing is loaded."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, network {tuple(own[k].shape)})"
        for k in own
        if k in state
        and isinstance(state[k], torch.Tensor)
        and isinstance(own[k], torch.Tensor)
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_some(shapes)}")
        raise ModelError(
            f"The weights in {path} do not fit {what}: {'; '.join(parts)}. The file was saved "
            "from another network or configuration: check that the network is built with the "
            "settings it was trained with (layer sizes, channels, number of classes) and that "
            "this is the right weights file."
        )
