"""Skip on a user's machine, fail in CI: for tests whose missing prerequisite would hide a proof.

CI runs ``.ci/run`` with ``CI=true`` and installs every prerequisite (``../shared``, Chromium,
Prometheus, the Docker engine); there, a missing one means the run proved nothing and must fail.
A user's fresh clone may lack them, and then the test skips with the printed reason.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str, allow_module_level: bool = False) -> NoReturn:
    """``pytest.fail`` under CI, ``pytest.skip`` elsewhere, with the same reason."""
    if in_ci():
        pytest.fail(f"required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def require_module(name: str, hint: str, allow_module_level: bool = False) -> ModuleType:
    """``import name``, or :func:`unavailable` with ``hint`` (how to install it) when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"{name} cannot be imported ({exc}): {hint}", allow_module_level=allow_module_level)
