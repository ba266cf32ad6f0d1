"""The third-party packages of the ``test`` extra (Lightning, accelerate, timm), imported for the
integration tests: skipped where missing, except in CI (``CI`` set) where the README's install
command must have installed them; timm skipped where it cannot import here."""

from __future__ import annotations

import importlib
import os

import pytest


def require(module: str):
    """Import a package of the test extra: skip without it, except in CI where it must be."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("CI"):
            pytest.fail(f"{module} must be installed in CI (the README's install command): {err}")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]'): {err}")


def fresh_accelerate():
    """accelerate, with its process-wide state cleared (one ``Accelerator`` configuration per
    process otherwise: a second one with another ``mixed_precision`` is refused)."""
    accelerate = require("accelerate")
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    return accelerate


def import_timm():
    """timm, or a skip saying why it cannot run here."""
    try:
        import timm
        import timm.optim
        import timm.scheduler
    except ImportError as err:
        pytest.skip(
            f"timm cannot be imported here ({type(err).__name__}: {err}): it needs torchvision, "
            "and PyPI's torchvision wheels do not load beside the CPU torch 2.13 wheel; the test "
            "runs where timm imports (a CUDA torch with torchvision)"
        )
    except Exception as err:  # torchvision present but broken ("torchvision::nms")
        pytest.skip(
            f"timm cannot be imported here ({type(err).__name__}: {err}): PyPI's torchvision "
            "wheels do not load beside the CPU torch 2.13 wheel"
        )
    return timm
