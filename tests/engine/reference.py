"""The reference libraries medcam's maps are checked against, as installed.

- Captum and MONAI install normally (``pip install -e ".[dev]"``).
- pytorch-grad-cam (PyPI ``grad-cam``, pinned in ``.ci/install-test-tools``) is installed
  ``--no-deps``: its ``torchvision`` requirement would replace the CPU torch wheel, and PyPI's
  torchvision wheels do not load beside ``torch==2.13.0+cpu``. It imports torchvision only for
  utilities these tests do not use (image preprocessing, detection box IoU), so where
  ``import torchvision`` fails a stub stands in for it *while pytorch_grad_cam is imported* and
  is removed from ``sys.modules`` right after (MONAI's optional imports must not see it). Where
  the real torchvision imports, the stub is not used.

A test that needs a library it cannot import calls :func:`tests.external.missing`: skipped on a
developer's machine, failed in CI (``MEDCAM_TEST_STRICT=1``).
"""

from __future__ import annotations

import importlib
import sys
import types

from tests.external import missing

PGC_INSTALL = "bash .ci/install-test-tools (pip install --no-deps grad-cam==1.5.7 ...)"


def _torchvision_stub() -> list[types.ModuleType]:
    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    for name in ("Compose", "Normalize", "ToTensor"):
        setattr(transforms, name, object)
    functional.resize = None
    transforms.functional = functional
    root.transforms = transforms
    root.ops = ops
    root.__medcam_stub__ = True
    return [root, transforms, functional, ops]


def pytorch_grad_cam() -> types.ModuleType:
    """The installed ``pytorch_grad_cam`` (skip, or fail in CI, when it is not installed)."""
    if "pytorch_grad_cam" in sys.modules:
        return sys.modules["pytorch_grad_cam"]
    stubs: list[types.ModuleType] = []
    try:
        import torchvision  # noqa: F401
    except Exception:  # the CPU torch wheel + PyPI torchvision do not load together
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stubs = _torchvision_stub()
        for mod in stubs:
            sys.modules[mod.__name__] = mod
    try:
        return importlib.import_module("pytorch_grad_cam")
    except ImportError as err:
        missing(f"pytorch-grad-cam is not importable ({err}); install it with {PGC_INSTALL}")
        raise
    finally:
        for mod in stubs:
            sys.modules.pop(mod.__name__, None)


def captum_attr() -> types.ModuleType:
    """The installed ``captum.attr`` (skip, or fail in CI, when it is not installed)."""
    try:
        return importlib.import_module("captum.attr")
    except ImportError as err:
        missing(f"captum is not importable ({err}); pip install -e '.[dev]' installs it")
        raise
