"""Shared test fixtures: where the real media lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MSAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test media not found at {SHARED_DATA} (set MSAFLOW_SHARED_DATA)")
    return SHARED_DATA
