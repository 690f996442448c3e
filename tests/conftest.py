"""Shared test helpers: where the paper authors' reference tensors live (beside the checkout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.requires import unavailable

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
REFERENCE_DIR = SHARED / "reference" / "dclgan"
DATA_DIR = SHARED / "data" / "horse2zebra"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        unavailable(f"reference tensors not found at {REFERENCE_DIR} (../shared is absent in a user's clone)")
    return REFERENCE_DIR
