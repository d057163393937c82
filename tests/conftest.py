"""Shared fixtures. Real data lives in ../shared/data (or $MTLIB_DATA_DIR); tests that need it skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MTLIB_DATA_DIR", REPO.parent / "shared" / "data"))
CENSUS = DATA_DIR / "census-income" / "census-income.test.gz"
ALIEXPRESS = DATA_DIR / "aliexpress" / "aliexpress_test_sample.csv"


@pytest.fixture
def census_path() -> Path:
    if not CENSUS.exists():
        pytest.skip(f"Census-Income file not found at {CENSUS}")
    return CENSUS


@pytest.fixture
def aliexpress_path() -> Path:
    if not ALIEXPRESS.exists():
        pytest.skip(f"AliExpress sample not found at {ALIEXPRESS}")
    return ALIEXPRESS
